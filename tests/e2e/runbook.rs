//! The runbook (`docs/troubleshooting.md`): every alert links to one of its sections, and every
//! `volumectl`, `curl` and `mysql` command it shows runs against a real appliance (an active, a
//! standby, a failed operation, a dead letter). `systemctl` and `journalctl` blocks are marked
//! as not run here.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::helpers::{TestEnv, cmd, volumectl};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fenced blocks of a Markdown text: (language, lines).
fn blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut open: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_owned(), Vec::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, lines)), None) => lines.push(line.to_owned()),
            (None, None) => {}
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, spaces to dashes, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

const RUN_HERE: [&str; 3] = ["volumectl", "curl", "mysql"];
const NOT_HERE: [&str; 2] = ["systemctl", "journalctl"];

/// The first word of a command line.
fn program(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

#[test]
fn every_alert_links_to_a_section_of_the_runbook() {
    let runbook = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).expect("runbook");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(slug)
        .collect();
    let rules =
        std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).expect("rules");
    let alerts = rules.matches("- alert: ").count();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(|u| u.trim_matches('"'))
        .collect();
    assert!(alerts >= 10, "{alerts} alerts");
    assert_eq!(links.len(), alerts, "one runbook_url per alert");
    for link in links {
        let (page, anchor) = link.split_once('#').expect("an anchor");
        assert_eq!(
            page, "file:///usr/share/doc/volume-daemon/troubleshooting.md",
            "where the package installs the runbook"
        );
        assert!(
            anchors.contains(anchor),
            "{link}: no section `{anchor}` in docs/troubleshooting.md ({anchors:?})"
        );
    }
    // The scan itself: a heading with punctuation.
    assert_eq!(slug("Host VM mismatch"), "host-vm-mismatch");
    assert_eq!(
        slug("Database of another appliance"),
        "database-of-another-appliance"
    );
}

/// Every command of a `sh` block runs, exit status 0, against an appliance with an active and
/// a standby, a completed and a failed operation and a dead letter; the blocks that hold
/// `systemctl` or `journalctl` are `text` and say they are not run here.
#[tokio::test]
async fn every_command_the_runbook_shows_runs() {
    let runbook = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).expect("runbook");
    let mut commands = Vec::new();
    for (lang, lines) in blocks(&runbook) {
        let lines: Vec<&String> = lines
            .iter()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .collect();
        let programs: BTreeSet<&str> = lines.iter().map(|l| program(l)).collect();
        if lang == "sh" {
            for l in &lines {
                assert!(
                    RUN_HERE.contains(&program(l)),
                    "a `sh` block of the runbook holds `{l}`: only {RUN_HERE:?} run here; put others in a `text` block"
                );
            }
            commands.extend(lines.into_iter().cloned());
        } else {
            assert!(
                programs.iter().all(|p| !RUN_HERE.contains(p)),
                "a `{lang}` block holds a command that must run: make it `sh`: {lines:?}"
            );
            if programs.iter().any(|p| NOT_HERE.contains(p)) {
                assert!(
                    runbook.contains("(systemd; not run by the test suite)"),
                    "systemd blocks say they are not run"
                );
            }
        }
    }
    let used: BTreeSet<&str> = commands.iter().map(|c| program(c)).collect();
    assert_eq!(
        used,
        RUN_HERE.into_iter().collect(),
        "the runbook uses all three"
    );
    assert!(commands.len() >= 20, "{} commands", commands.len());

    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let standby = env.spawn_other().await;
    let created = env.execute(&cmd::create("runbook", "1GiB")).await;
    let volume = created.data.volume_id.expect("volume");
    let failed = env
        .execute(&cmd::attach(
            volume,
            schema::VmId::parse(&uuid::Uuid::new_v4().to_string()).expect("id"),
        ))
        .await;
    assert_eq!(failed.data.status.as_str(), "failed", "{failed:?}");
    crate::rejections::publish_raw(
        &env.prefix,
        "volume.create",
        b"{not json",
        Some("runbook-bad"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bin_dir = volumectl().parent().expect("dir").to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for command in &commands {
        let out = tokio::process::Command::new("bash")
            .args(["-c", command])
            .env_clear()
            .env("PATH", &path)
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("AMQP_URL", &env.client_amqp_url)
            .env("AMQP_PREFIX", &env.prefix)
            .env("VOLUME_API_URL", format!("http://{}", env.http_addr))
            .env("STANDBY_API_URL", format!("http://{standby}"))
            .env("DB", &env.db_name)
            .env("OP", failed.data.operation_id.as_str())
            .env("VOLUME", volume.to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("bash runs");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "the runbook's `{command}` failed ({}):\n{said}",
            out.status
        );
        // `mysql` prints nothing for a query with no rows (an empty outbox backlog).
        if program(command) != "mysql" {
            assert!(!out.stdout.is_empty(), "`{command}` printed nothing");
        }
    }
}
