//! The Go client (`clients/go`) against the real daemon. This test starts a daemon of its own
//! (a host VM with NBD exports on), captures real commands and events on the broker as the
//! examples of the Go client's schema check (each checked against the JSON Schemas here), then
//! runs `go vet`, `gofmt -l`, an offline `go build` and `go test` in `clients/go` against the daemon, and
//! finally checks every command the Go client published against the command schema.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudstack_sim::DEMO_VMS;
use schema::command::{Action, AttachVolume, CreateVolume};
use schema::{CloudEvent, Command, CommandId, DiskOfferingId, Topology, VolumeId};
use tokio::process::Command as Process;

use crate::helpers::{AMQP_URL, EventTap, TestEnv, cmd, schema_validator};
use crate::{exports, operator, rejections};

const MODULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/go");

/// The Go tests that must have run and passed (a `go test` that ran none passes too).
const GO_TESTS: &[&str] = &[
    "TestCreateAttachDetachDeleteOfARemoteAttachment",
    "TestAWaitStartedAfterTheEventArrivedReturnsIt",
    "TestADuplicateCommandReturnsTheOriginalEvent",
    "TestAFailedCommandReturnsItsCodeAndHint",
    "TestACommandsTraceComesBackOnItsEvent",
    "TestAReconcileOfAnUndisturbedVMReportsNoChange",
    "TestTheReadAPIShowsWhatTheCommandsDid",
    "TestMissingTopologyAndUnroutableCommandsAreErrors",
    "TestAURLListSkipsADeadAddress",
    "TestAWaitEndsWhenTheClientCloses",
    "TestInvalidCommandsAreRefusedBeforePublishingAndNameTheField",
    "TestValidCommandsEncodeAsTheWireFormatAndParseBack",
    "TestTheTypesCarryEveryFieldOfCapturedMessages",
    "TestTheReadmeExampleRunsAsWritten",
    "Example",
    "ExampleCommandError",
    "ExampleClient_Subscribe",
    "Example_testFailover",
];

#[tokio::test]
async fn the_go_client_passes_its_tests_against_the_daemon() {
    prepare_module().await;
    let (mut env, _nbd, _exports) = exports::exporting_env().await;
    let topology = Topology::new(env.prefix.clone());
    let mut commands = EventTap::bound(&env.prefix, &topology.commands_exchange(), "#").await;
    let mut events = EventTap::new(&env.prefix).await;

    capture_every_kind_of_message(&mut env).await;
    let examples = env.sysfs.join("go-examples");
    let captured = (
        save_valid(&mut commands, "command", &examples.join("commands")).await,
        save_valid(&mut events, "event", &examples.join("events")).await,
    );
    assert!(
        captured.0 >= 8 && captured.1 >= 12,
        "captured {captured:?} commands and events"
    );

    go(&["vet", "./..."], &[]).await;
    let unformatted = Process::new("gofmt")
        .args(["-l", "."])
        .current_dir(MODULE)
        .output()
        .await
        .expect("gofmt runs");
    assert!(
        unformatted.status.success() && unformatted.stdout.is_empty(),
        "gofmt -l: {unformatted:?}"
    );
    // Built with no network at all: the dependency comes from Debian's package (vendor/).
    let offline = Process::new("unshare")
        .args(["--net", "go", "build", "./..."])
        .current_dir(MODULE)
        .env("GOFLAGS", "-mod=vendor")
        .env("GOPROXY", "off")
        .output()
        .await
        .expect("unshare (util-linux) runs");
    assert!(offline.status.success(), "offline go build: {offline:?}");

    let vm = DEMO_VMS[0].to_string();
    // The test-failover example: snapshots of the appliance's (running) volumes, and a stopped
    // test VM without a root disk to boot from one.
    env.sim.sim.set_kvm_snapshot_enabled(true);
    let test_vm = schema::VmId::new_random();
    env.sim
        .sim
        .add_vm_with(test_vm, "go-test-failover", false, false);
    let host_vm = env.host_vm.expect("host vm").to_string();
    let test_vm = test_vm.to_string();
    let out = go(
        &["test", "-count=1", "-v", "./..."],
        &[
            ("AMQP_URL", AMQP_URL),
            ("AMQP_PREFIX", &env.prefix),
            ("VM_ID", &vm),
            ("HOST_VM_ID", &host_vm),
            ("TEST_VM_ID", &test_vm),
            ("VOLUME_EXAMPLES_DIR", &examples.display().to_string()),
            ("VOLUME_API_URL", &format!("http://{}", env.http_addr)),
        ],
    )
    .await;
    for name in GO_TESTS {
        assert!(
            out.contains(&format!("--- PASS: {name} ")),
            "{name} did not pass:\n{out}"
        );
    }

    // What the Go client put on the wire is what the schemas describe.
    let published = save_valid(&mut commands, "command", &env.sysfs.join("from-go")).await;
    assert!(
        published >= 15,
        "the Go tests published {published} commands"
    );
}

/// Installs nothing (scripts/services.sh does): checks that `go` runs and points `vendor/`
/// at Debian's amqp091-go.
async fn prepare_module() {
    let vendor = Process::new("sh")
        .arg(Path::new(MODULE).join("vendor-debian.sh"))
        .output()
        .await
        .expect("sh runs");
    assert!(
        vendor.status.success(),
        "clients/go/vendor-debian.sh (scripts/test installs golang-go and golang-github-rabbitmq-amqp091-go-dev): {}",
        String::from_utf8_lossy(&vendor.stderr)
    );
}

/// Runs `go <args>` in the module, offline; panics with its output unless it succeeds.
async fn go(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Process::new("go")
        .args(args)
        .current_dir(MODULE)
        .env("GOFLAGS", "-mod=vendor")
        .env("GOPROXY", "off")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("go runs (scripts/test installs golang-go)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "go {}:\n{text}", args.join(" "));
    text
}

/// One of each outcome the daemon has: host and remote attaches (with exports), detaches and
/// deletes that found nothing to do, a CloudStack refusal, a failed cancel, a reconcile that
/// repaired something and one that did not, and a message of an unknown type.
async fn capture_every_kind_of_message(env: &mut TestEnv) {
    let host = env.host_vm.expect("a host VM");
    let remote = DEMO_VMS[1];
    let created = env
        .execute(
            &cmd::create("go-corpus-host", "1GiB")
                .with_metadata("purpose", "go examples")
                .with_correlation_id("go-corpus-job"),
        )
        .await;
    let a = volume(&created);
    completed(env.execute(&cmd::attach(a, host)).await);
    completed(env.execute(&cmd::detach(a)).await);
    completed(env.execute(&cmd::detach(a)).await); // already detached
    completed(env.execute(&cmd::delete(a)).await);
    completed(env.execute(&cmd::delete(a)).await); // already absent

    let b = volume(&env.execute(&cmd::create("go-corpus-remote", "2GiB")).await);
    completed(
        env.execute(&Command::new(Action::Attach(AttachVolume {
            volume_id: b,
            vm_id: remote,
            device_id: Some(5),
        })))
        .await,
    );
    // Detached behind the daemon's back: the reconcile repairs the mapping.
    env.sim
        .sim
        .detach_volume(&operator::by_id(b))
        .expect("detach in the simulator");
    operator::sim_settles(env, b, None).await;
    let repaired = completed(env.execute(&Command::reconcile(Some(remote))).await);
    assert_eq!(repaired.data.changes.map(|c| c.len()), Some(1));
    completed(env.execute(&Command::reconcile(None)).await);
    completed(env.execute(&cmd::delete(b)).await);

    let refused = env
        .execute(&Command::new(Action::Create(CreateVolume {
            name: "go-corpus-refused".into(),
            size: "1GiB".parse().expect("size"),
            disk_offering_id: Some(DiskOfferingId::new_random()),
            zone_id: None,
        })))
        .await;
    assert_eq!(refused.event_type, "volume.create.failed");
    let cancel = env
        .execute(&Command::cancel(
            CommandId::parse("go-corpus-nothing").expect("id"),
        ))
        .await;
    assert_eq!(cancel.event_type, "volume.cancel.failed");

    let mut unknown = EventTap::new(&env.prefix).await;
    rejections::publish_raw(
        &env.prefix,
        "volume.grow",
        br#"{"command_id": "go-corpus-grow", "type": "grow"}"#,
        None,
    )
    .await;
    let (_, rejected) = unknown
        .expect("the rejection's event", Duration::from_secs(30))
        .await;
    assert_eq!(rejected.event_type, "volume.unknown.failed");
}

fn volume(event: &CloudEvent) -> VolumeId {
    completed(event.clone())
        .data
        .volume_id
        .expect("a volume id")
}

fn completed(event: CloudEvent) -> CloudEvent {
    assert!(
        event.event_type.ends_with(".completed"),
        "{}: {:?}",
        event.event_type,
        event.data.error
    );
    event
}

/// Drains `tap`, checks every message against `schemas/<kind>.schema.json` and writes each
/// valid one to `dir`. The only invalid message allowed is the command of unknown type sent
/// on purpose (it is left out). Returns how many were saved.
pub(crate) async fn save_valid(tap: &mut EventTap, kind: &str, dir: &PathBuf) -> usize {
    let validator = schema_validator(&format!("{kind}.schema.json"));
    std::fs::create_dir_all(dir).expect("examples dir");
    let mut saved = 0;
    while let Some((_, body)) = tap.next_raw(Duration::from_millis(700)).await {
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        if value["type"] == "grow" {
            assert!(!errors.is_empty(), "the schema accepts type grow");
            continue;
        }
        assert!(errors.is_empty(), "{value}: {errors:?}");
        saved += 1;
        std::fs::write(dir.join(format!("{saved:03}.json")), &body).expect("write example");
    }
    saved
}

/// The Go client survives a restart of its broker (a RabbitMQ node of this test's own, never
/// the machine's shared broker): a `Pending.Wait` started before `rabbitmqctl stop_app` and
/// `start_app` returns the event (the client reconnects, listens on the events exchange too,
/// and publishes the waited-for command again), and the re-published command is not executed
/// twice: one createVolume per create.
#[tokio::test]
async fn the_go_client_survives_a_restart_of_its_broker_node() {
    prepare_module().await;
    let cluster = crate::cluster::RabbitCluster::start(1).await;
    let node = &cluster.nodes[0];
    let mut env = TestEnv::with_sim(cloudstack_sim::SimConfig {
        job_latency: Duration::from_secs(3),
        ..cloudstack_sim::SimConfig::default()
    })
    .await;
    env.daemon_amqp_url = node.url();
    env.client_amqp_url = node.url();
    env.start_daemon().await;
    let vm = DEMO_VMS[0].to_string();
    let test = "TestAWaitStartedBeforeABrokerRestartReturnsTheEvent";
    let out = go(
        &[
            "test",
            "-tags",
            "brokerrestart",
            "-count=1",
            "-v",
            "-run",
            &format!("^{test}$"),
            ".",
        ],
        &[
            ("AMQP_URL", &node.url()),
            ("AMQP_PREFIX", &env.prefix),
            ("VM_ID", &vm),
            ("RESTART_NODE", &node.name),
        ],
    )
    .await;
    assert!(out.contains(&format!("--- PASS: {test} ")), "{out}");
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        2,
        "each create executed once\n{out}"
    );
}
