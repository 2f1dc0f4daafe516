//! docs/migrating.md, walked through as written: every `sh` block runs, in order, against a
//! copy of an old installation (the production fixture, its volumes attached in the
//! simulator, nbdkit serving the export directory); the `sh not-here` blocks (systemd,
//! device-mapper, nbd-server) are the only ones skipped, and the test checks that they hold
//! nothing else. Starting the daemon, which the document does with systemd, the test does
//! itself when it meets that line.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::cutover::{LegacyDb, OLD_HOST_VOLUME, old_installation};
use crate::helpers::volumectl;

/// The document's code blocks: (info string, lines).
fn blocks(doc: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in doc.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => current = Some((info.trim().to_owned(), Vec::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, lines)), None) => lines.push(line.to_owned()),
            (None, None) => {}
        }
    }
    out
}

/// Runs one line of the document with bash and `vars`; its stdout (exit 0 asserted).
async fn run(line: &str, vars: &HashMap<String, String>) -> String {
    let out = tokio::process::Command::new("bash")
        .args(["-c", line])
        .env_clear()
        .envs(vars)
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{line}` failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn docs_migrating_md_runs_as_written() {
    let (mut env, nbd, _exports) = old_installation().await;
    let tag = format!("{}mig", &env.db_name[8..]);
    let old = LegacyDb::load(&tag, "legacy-production.sql").await;
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/migrating.md"))
            .expect("docs/migrating.md");

    let bin = Path::new(env!("CARGO_BIN_EXE_volume-daemon"));
    let ctl = volumectl();
    let path = format!(
        "{}:{}:{}",
        bin.parent().expect("dir").display(),
        ctl.parent().expect("dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut vars: HashMap<String, String> = env.daemon_env().into_iter().collect();
    vars.insert("PATH".into(), path);
    vars.insert("HOME".into(), std::env::var("HOME").unwrap_or_default());
    vars.insert("OLD_DATABASE_URL".into(), old.url());
    vars.insert("OLD_DATABASE".into(), old.name.clone());
    vars.insert("VOLUME".into(), OLD_HOST_VOLUME.into());
    vars.insert("NBD_URL".into(), nbd.url.clone());
    vars.insert("AMQP_URL".into(), env.client_amqp_url.clone());

    let (mut ran, mut skipped, mut outputs) = (0, 0, Vec::new());
    for (info, lines) in blocks(&doc) {
        match info.as_str() {
            "sh" => {
                for line in lines.iter().filter(|l| !l.trim().is_empty()) {
                    outputs.push((line.clone(), run(line, &vars).await));
                    ran += 1;
                }
            }
            "sh not-here" => {
                for line in lines.iter().filter(|l| !l.trim().is_empty()) {
                    let first = line.split_whitespace().next().unwrap_or("");
                    assert!(
                        matches!(first, "systemctl" | "dmsetup" | "rm"),
                        "a skipped line that this machine could run: {line}"
                    );
                    if line.contains("--now volume-daemon") {
                        env.start_daemon().await;
                        vars.insert("VOLUME_API_URL".into(), format!("http://{}", env.http_addr));
                    }
                    skipped += 1;
                }
            }
            other => panic!("a code block of kind {other:?}: mark it `sh` or `sh not-here`"),
        }
    }
    assert!(ran >= 6 && skipped >= 5, "ran {ran}, skipped {skipped}");
    let said = |needle: &str| outputs.iter().any(|(_, out)| out.contains(needle));
    assert_eq!(
        outputs[0].1.trim(),
        "0",
        "no unfinished operation: {outputs:?}"
    );
    assert!(said("would import 2 mapping(s)"), "{outputs:?}");
    assert!(said("rows written: 2 mapping(s)"), "{outputs:?}");
    let export = format!("migration-vol-{OLD_HOST_VOLUME}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nbd.list().await.contains(&export) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nbdkit never served {export}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        said(&export),
        "volumectl volume and nbdinfo --list show the old export name: {outputs:?}"
    );
    assert!(said("volume.reconcile.completed"), "{outputs:?}");
}
