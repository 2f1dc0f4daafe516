//! The deployment files (`deploy/`): the systemd unit verifies; the Grafana dashboard and
//! the Prometheus alert rules name only metrics that a real scrape of the daemon has; the rules
//! pass promtool's checks and their tests, whose inputs are series a real active and standby
//! serve.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use cloudstack_sim::SimConfig;

use crate::helpers::{TestEnv, cmd};

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// Every `volume_daemon_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("volume_daemon_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The sample names of a scrape (`volume_daemon_operations_total`, `..._bucket`, ...).
fn sample_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_name_only_metrics_of_a_real_scrape() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let host = env.host_vm.expect("host VM");
    // Some work, so that the families with labels have series.
    let created = env.execute(&cmd::create("deploy-0", "1GiB")).await;
    let volume = created.data.volume_id.expect("volume");
    env.execute(&cmd::attach(volume, host)).await;
    env.execute(&schema::Command::reconcile(None)).await;
    let scrape = crate::helpers::get_text(env.http_addr, "/metrics").await;
    let served = sample_names(&scrape);

    for file in ["grafana/volume-daemon.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy(file)).expect("deploy file");
        let used = metric_names(&text);
        assert!(
            used.len() >= 6,
            "{file} names only {used:?}: is the scan right?"
        );
        // A family with labels only a refusal gives has no series before one: the rule tests'
        // own check makes a refusal and finds it in a real scrape.
        let shown_elsewhere = ["volume_daemon_events_refused_total"];
        let missing: Vec<&String> = used
            .iter()
            .filter(|n| !served.contains(*n) && !shown_elsewhere.contains(&n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics a scrape does not have: {missing:?}\nserved: {served:?}"
        );
    }
    // The dashboard is JSON with a query per panel.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/volume-daemon.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.iter().all(|p| {
        p["targets"].as_array().is_some_and(|t| {
            t.iter().all(|t| {
                t["expr"]
                    .as_str()
                    .is_some_and(|e| e.contains("volume_daemon_"))
            })
        })
    }));
    // The scan itself catches a name that does not exist.
    assert!(!served.contains("volume_daemon_no_such_metric"));
    assert!(
        metric_names("rate(volume_daemon_no_such_metric[5m])")
            .contains("volume_daemon_no_such_metric")
    );
}

/// `systemd-analyze verify` on `unit` written as `name` in a directory of its own: what it
/// said when it failed or said anything.
fn verify_unit(name: &str, unit: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("vd-unit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, unit).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (scripts/test installs systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// `systemd-analyze verify` accepts the unit (pointed at the binary this suite built).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(deploy("volume-daemon.service")).expect("unit");
    assert!(unit.contains("User=volume-daemon") && !unit.contains("User=root"));
    let unit = unit.replace(
        "/usr/local/bin/volume-daemon",
        env!("CARGO_BIN_EXE_volume-daemon"),
    );
    if let Err(said) = verify_unit("volume-daemon.service", &unit) {
        panic!("{said}");
    }
}

/// The nbdkit unit docs/migrating.md starts verifies too (nbdkit as installed by Debian).
#[test]
fn the_nbdkit_unit_verifies() {
    let unit = std::fs::read_to_string(deploy("nbdkit-volume-daemon.service")).expect("unit");
    assert!(unit.contains("file dir=/var/lib/volume-daemon/exports"));
    if let Err(said) = verify_unit("nbdkit-volume-daemon.service", &unit) {
        panic!("{said}");
    }
}

/// `promtool` on `deploy/prometheus`: the rules and the scrape configuration check, the rule
/// tests pass, and they fail when the "no active instance" rule is put back to the sum over
/// every appliance it once was (blind to an appliance whose instances are all down, and to one
/// appliance among several without an active).
#[test]
fn the_alert_rules_pass_promtool_and_their_tests_catch_the_old_no_active_rule() {
    let promtool = |dir: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("promtool runs (scripts/test installs Debian's prometheus package)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let here = deploy("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["check", "config", "prometheus.yml"],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, said) = promtool(&here, args);
        assert!(ok, "promtool {args:?}:\n{said}");
    }

    let dir = std::env::temp_dir().join(format!("vd-rules-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rules = std::fs::read_to_string(here.join("alerts.yml")).expect("rules");
    let start = rules
        .find("        expr: |\n          (\n            sum by (appliance) (volume_daemon_role")
        .expect("the no-active rule's expression");
    let end = start + rules[start..].find("        for: 1m").expect("its `for`");
    let old = format!(
        "{}        expr: sum(volume_daemon_role{{role=\"active\"}}) < 1\n{}",
        &rules[..start],
        &rules[end..]
    );
    std::fs::write(dir.join("alerts.yml"), old).expect("write");
    std::fs::copy(here.join("alerts_test.yml"), dir.join("alerts_test.yml")).expect("copy");
    let (ok, said) = promtool(&dir, &["test", "rules", "alerts_test.yml"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "the tests pass with the old rule:\n{said}");
    assert!(
        said.contains("VolumeDaemonNoActiveInstance"),
        "the failure names the rule:\n{said}"
    );
}

/// One input series of the rule tests: its name and labels, the target labels (`job`,
/// `appliance`, `instance`) left out.
#[derive(Debug)]
struct InputSeries {
    name: String,
    labels: BTreeSet<(String, String)>,
    instance: String,
}

/// The input series of `alerts_test.yml` (lines `- series: '<name>{<labels>}'`).
fn input_series(text: &str) -> Vec<InputSeries> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- series: '"))
        .map(|s| {
            let s = s.trim_end_matches('\'');
            let (name, rest) = s.split_once('{').expect("a series with labels");
            let mut labels = BTreeSet::new();
            let mut instance = String::new();
            for pair in rest.trim_end_matches('}').split(',') {
                let (k, v) = pair.trim().split_once('=').expect("label=value");
                let v = v.trim_matches('"').to_owned();
                match k {
                    "instance" => instance = v,
                    "job" | "appliance" => {}
                    _ => {
                        labels.insert((k.to_owned(), v));
                    }
                }
            }
            InputSeries {
                name: name.to_owned(),
                labels,
                instance,
            }
        })
        .collect()
}

/// Every sample of a scrape: name and labels.
fn scrape_series(scrape: &str) -> Vec<(String, BTreeSet<(String, String)>)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (head, _) = l.rsplit_once(' ').expect("name and value");
            let (name, labels) = head.split_once('{').unwrap_or((head, ""));
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                .collect();
            (name.to_owned(), labels)
        })
        .collect()
}

/// The series the rule tests feed promtool, each checked against a real scrape of an active
/// and of a standby daemon (the instance's name says which): same name, same labels (the values
/// of `exchange` and `routing_key` are the test's own). The standby serves none of the
/// database's figures, so a sum over both counts them once.
#[tokio::test]
async fn every_series_the_rule_tests_use_is_served_by_a_real_active_or_standby() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let standby = env.spawn_other().await;
    // A subscriber queue that refuses everything, so that a refused event is counted.
    let topology = schema::Topology::new(&env.prefix);
    let conn = lapin::Connection::connect(
        crate::helpers::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let refusing = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            crate::refusals::refusing(0),
        )
        .await
        .expect("refusing queue");
    ch.queue_bind(
        refusing.name().as_str().into(),
        topology.events_exchange().as_str().into(),
        "#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("bind");
    env.execute(&cmd::create("series", "1GiB")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let active_scrape = loop {
        let scrape = crate::helpers::get_text(env.http_addr, "/metrics").await;
        if scrape.contains("volume_daemon_events_refused_total{") {
            break scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refused event counted:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let standby_scrape = crate::helpers::get_text(standby, "/metrics").await;
    let active = scrape_series(&active_scrape);
    let standby = scrape_series(&standby_scrape);

    let tests = std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).expect("tests");
    let inputs = input_series(&tests);
    assert!(inputs.len() >= 20, "read {} series", inputs.len());
    let own_values = ["exchange", "routing_key"];
    let mut checked = 0;
    for input in inputs.iter().filter(|s| s.name != "up") {
        let (served, which) = if input.instance.contains("-active") {
            (&active, "active")
        } else if input.instance.contains("-standby") {
            (&standby, "standby")
        } else {
            panic!("{input:?}: name the instance <appliance>-active or -standby");
        };
        let found = served.iter().any(|(name, labels)| {
            name == &input.name
                && labels.len() == input.labels.len()
                && input.labels.iter().all(|(k, v)| {
                    labels
                        .iter()
                        .any(|(k2, v2)| k == k2 && (v == v2 || own_values.contains(&k.as_str())))
                })
        });
        assert!(
            found,
            "{input:?} is not served by a real {which}:\n{}",
            if which == "active" {
                &active_scrape
            } else {
                &standby_scrape
            }
        );
        checked += 1;
    }
    assert!(checked >= 15, "checked {checked}");
    // The database's figures: the active's alone.
    for name in [
        "volume_daemon_outbox_backlog",
        "volume_daemon_outbox_oldest_age_seconds",
        "volume_daemon_operations_in_flight",
        "volume_daemon_mappings",
        "volume_daemon_nbd_exports",
        "volume_daemon_dead_letters",
    ] {
        assert!(
            active.iter().any(|(n, _)| n == name),
            "the active serves {name}"
        );
        assert!(
            !standby.iter().any(|(n, _)| n == name),
            "the standby serves {name}:\n{standby_scrape}"
        );
    }
    // The info metric for joins, on both.
    for scrape in [&active_scrape, &standby_scrape] {
        assert!(
            scrape.contains(&format!(
                "volume_daemon_appliance_info{{prefix=\"{}\"",
                env.prefix
            )),
            "{scrape}"
        );
    }
}
