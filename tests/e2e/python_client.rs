//! The Python client (`clients/python`) against the real daemon: installed with pip from the
//! checkout into a directory of its own (no network: `--no-build-isolation --no-deps`), its
//! unit tests and its tests against this daemon (a host VM with NBD exports on) run with
//! `python3 -m unittest`, its README example runs as written, and every command it put on the
//! broker is checked against `schemas/command.schema.json`.

use std::path::Path;

use cloudstack_sim::DEMO_VMS;
use schema::Topology;
use tokio::process::Command as Process;

use crate::exports;
use crate::go_client::save_valid;
use crate::helpers::{AMQP_URL, EventTap};

const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python");

/// The tests that must have run and passed (`unittest` passes when it ran none, too).
const PY_TESTS: &[&str] = &[
    "test_every_kind_encodes_as_the_command_schema_describes",
    "test_each_refusal_names_its_field",
    "test_what_the_client_refuses_the_schema_refuses_too",
    "test_create_attach_to_the_host_detach_delete",
    "test_an_event_that_arrives_before_the_wait_is_kept",
    "test_a_duplicate_command_gets_the_original_event",
    "test_a_failed_command_raises_its_code_retryable_and_hint",
    "test_a_missing_topology_and_an_unroutable_command_are_errors",
    "test_invalid_commands_are_refused_before_anything_is_sent",
    "test_subscribe_with_explicit_acks",
    "test_a_commands_trace_comes_back_on_its_event",
    "test_the_read_api_reports_the_daemon_and_unknown_ids",
    "test_the_readme_example_runs_as_written",
];

#[tokio::test]
async fn the_python_client_passes_its_tests_against_the_daemon() {
    let (env, _nbd, _exports) = exports::exporting_env().await;
    let topology = Topology::new(env.prefix.clone());
    let mut commands = EventTap::bound(&env.prefix, &topology.commands_exchange(), "#").await;
    let site = env.sysfs.join("python-site");
    // Built from a copy: setuptools writes `build/` and `*.egg-info` next to the sources.
    let copy = env.sysfs.join("python-package");
    let copied = Process::new("cp")
        .arg("-r")
        .arg(PACKAGE)
        .arg(&copy)
        .status()
        .await
        .expect("cp runs");
    assert!(copied.success(), "copying clients/python");
    let installed = Process::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-build-isolation", "--no-deps", "--target"])
        .arg(&site)
        .arg(&copy)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        installed.status.success(),
        "pip install clients/python (scripts/test installs pika, jsonschema and setuptools): {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert!(
        site.join("volume_daemon_client/py.typed").exists(),
        "typed package installed"
    );

    let api = format!("http://{}", env.http_addr);
    let vm = DEMO_VMS[0].to_string();
    let host = env.host_vm.expect("host vm").to_string();
    let out = Process::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(Path::new(PACKAGE).join("tests"))
        // The installed package, never the source tree.
        .current_dir(&env.sysfs)
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("AMQP_URL", AMQP_URL)
        .env("AMQP_PREFIX", &env.prefix)
        .env("VOLUME_API_URL", &api)
        .env("VM_ID", &vm)
        .env("HOST_VM_ID", &host)
        .env(
            "VOLUME_SCHEMAS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas"),
        )
        .output()
        .await
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "python -m unittest:\n{text}");
    for name in PY_TESTS {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.ends_with(" ok")),
            "{name} did not pass:\n{text}"
        );
    }

    let published = save_valid(&mut commands, "command", &env.sysfs.join("from-python")).await;
    assert!(
        published >= 12,
        "the Python tests published {published} commands\n{text}"
    );
}
