//! The deployment files (`deploy/`): the systemd unit verifies, and the Grafana dashboard and
//! the Prometheus alert rules name only metrics that a real scrape of the daemon has.

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
        let missing: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
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

/// `systemd-analyze verify` accepts the unit (pointed at the binary this suite built).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(deploy("volume-daemon.service")).expect("unit");
    assert!(unit.contains("User=volume-daemon") && !unit.contains("User=root"));
    let dir = std::env::temp_dir().join(format!("vd-unit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("volume-daemon.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/volume-daemon",
            env!("CARGO_BIN_EXE_volume-daemon"),
        ),
    )
    .expect("write");
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
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The nbdkit unit docs/migrating.md starts verifies too (nbdkit as installed by Debian).
#[test]
fn the_nbdkit_unit_verifies() {
    let unit = std::fs::read_to_string(deploy("nbdkit-volume-daemon.service")).expect("unit");
    assert!(unit.contains("file dir=/var/lib/volume-daemon/exports"));
    let dir = std::env::temp_dir().join(format!("vd-unit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("nbdkit-volume-daemon.service");
    std::fs::write(&path, unit).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
