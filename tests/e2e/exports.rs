//! The host appliance end to end (docs/host.md), with a real NBD server (`nbdkit file dir=`)
//! and the real `libnbd` tools: persistent names, exports that appear and vanish with host
//! attachments only, bytes written through `export → persistent name → by-id → backing file`,
//! and the repair of the directory and the table at start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cloudstack_sim::{DEMO_VMS, SimConfig};
use schema::VolumeId;
use schema::event::NbdExport;
use sqlx::Row;
use tokio::process::{Child, Command};

use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);

/// `nbdkit file dir=<dir>` on a port of its own, stopped when dropped.
pub(crate) struct NbdServer {
    child: Child,
    pub(crate) url: String,
}

impl NbdServer {
    pub(crate) async fn start(dir: &Path) -> Self {
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().expect("addr").port()
            };
            let mut child = Command::new("nbdkit")
                .args(["-f", "--ip-addr", "127.0.0.1", "--port", &port.to_string()])
                .arg("file")
                .arg(format!("dir={}", dir.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("nbdkit runs (scripts/test installs the nbdkit package)");
            for _ in 0..50 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Self {
                        child,
                        url: format!("nbd://127.0.0.1:{port}"),
                    };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken meanwhile: another one
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill().await;
        }
        panic!("nbdkit did not start");
    }

    /// The export names `nbdinfo --list` shows.
    pub(crate) async fn list(&self) -> Vec<String> {
        let out = Command::new("nbdinfo")
            .args(["--list", "--json", &self.url])
            .output()
            .await
            .expect("nbdinfo runs (scripts/test installs libnbd-bin)");
        assert!(out.status.success(), "nbdinfo --list: {out:?}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
        let mut names: Vec<String> = json["exports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["export-name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A test environment on a host VM with exports on: its own export directory and server.
pub(crate) async fn exporting_env() -> (TestEnv, NbdServer, PathBuf) {
    exporting_env_with(|_| {}).await
}

/// [`exporting_env`], with `adjust` applied to the environment before its daemon starts.
pub(crate) async fn exporting_env_with(
    adjust: impl FnOnce(&mut TestEnv),
) -> (TestEnv, NbdServer, PathBuf) {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    let dir = env.sysfs.join("exports");
    std::fs::create_dir_all(&dir).expect("export dir");
    let nbd = NbdServer::start(&dir).await;
    env.extra_env
        .push(("NBD_EXPORT_DIR".into(), dir.display().to_string()));
    env.extra_env.push(("NBD_URL".into(), nbd.url.clone()));
    adjust(&mut env);
    env.start_daemon().await;
    (env, nbd, dir)
}

/// `nbd_exports` rows: volume id → (export name, target path, status).
async fn export_rows(env: &mut TestEnv) -> Vec<(String, String, String, String)> {
    let pool = env.db().await;
    sqlx::query(
        "SELECT volume_id, export_name, target_path, CAST(status AS CHAR) AS status FROM nbd_exports ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("nbd_exports")
    .into_iter()
    .map(|r| {
        (
            r.get("volume_id"),
            r.get("export_name"),
            r.get("target_path"),
            r.get("status"),
        )
    })
    .collect()
}

/// The persistent-name columns of `volume`'s mapping.
async fn persistent_columns(
    env: &mut TestEnv,
    volume: VolumeId,
) -> (Option<String>, Option<String>) {
    let pool = env.db().await;
    let row = sqlx::query(
        "SELECT persistent_device_name, symlink_path FROM device_mappings WHERE volume_id = ?",
    )
    .bind(volume.to_string())
    .fetch_one(&pool)
    .await
    .expect("mapping");
    (row.get(0), row.get(1))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn attach(env: &TestEnv, volume: VolumeId, vm: schema::VmId) -> schema::CloudEvent {
    let e = env.execute(&cmd::attach(volume, vm)).await;
    assert_eq!(
        e.event_type, "volume.attach.completed",
        "{:?}",
        e.data.error
    );
    e
}

async fn detach(env: &TestEnv, volume: VolumeId) {
    let e = env.execute(&cmd::detach(volume)).await;
    assert_eq!(
        e.event_type, "volume.detach.completed",
        "{:?}",
        e.data.error
    );
}

/// Acceptance 1: the export is listed, bytes written through it land in the backing file, and
/// the event, the mapping and `nbd_exports` agree on names and paths.
#[tokio::test]
async fn a_host_attach_is_exported_and_written_through_to_the_backing_file() {
    let (mut env, nbd, dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let v = env.sim.sim.seed_volume("exported", 64 << 20);

    let event = attach(&env, v, host).await;

    let name = NbdExport::name_of(v);
    assert_eq!(nbd.list().await, vec![name.clone()]);
    let export = event
        .data
        .nbd_export
        .clone()
        .expect("the event names the export");
    assert_eq!(export.name, name);
    assert_eq!(export.url, format!("{}/{name}", nbd.url));
    let persistent = event.data.persistent_path.clone().expect("persistent path");
    let hex = v.as_uuid().simple().to_string();
    assert!(
        persistent.ends_with(&format!("/vol{}", &hex[..8])),
        "{persistent}"
    );
    assert_eq!(
        persistent_columns(&mut env, v).await,
        (Some(format!("vol{}", &hex[..8])), Some(persistent.clone()))
    );
    assert_eq!(
        export_rows(&mut env).await,
        vec![(
            v.to_string(),
            name.clone(),
            persistent.clone(),
            "active".into()
        )]
    );
    assert_eq!(
        std::fs::read_link(dir.join(&name)).expect("export entry"),
        PathBuf::from(&persistent)
    );

    // Write a known pattern through the export; read it back from the volume's backing file.
    let pattern: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let src = env.sysfs.join("pattern.bin");
    std::fs::write(&src, &pattern).expect("pattern");
    let copied = Command::new("nbdcopy")
        .arg(&src)
        .arg(&export.url)
        .output()
        .await
        .expect("nbdcopy runs");
    assert!(copied.status.success(), "nbdcopy: {copied:?}");
    let backing = cloudstack_sim::sysfs::backing_file(&env.sysfs, &v.to_string());
    let written = std::fs::read(&backing).expect("backing file");
    assert_eq!(written.len(), 64 << 20, "the volume's size");
    assert!(
        written[..pattern.len()] == pattern[..],
        "the bytes landed in the volume"
    );

    let metrics = crate::helpers::get_text(env.http_addr, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l == "volume_daemon_nbd_exports 1"),
        "{metrics}"
    );

    // `/ready` reports the NBD server without gating on it.
    let (code, ready) = env.get_json("/ready").await;
    assert_eq!(
        (code, &ready["components"]["nbd"]),
        (200, &serde_json::json!("up"))
    );
    drop(nbd);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, ready) = env.get_json("/ready").await;
        if ready["components"]["nbd"] == "down" {
            assert_eq!(code, 200, "the NBD server does not gate readiness");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Acceptance 2: a remote attach and detach of B leaves A's export alone and makes nothing for
/// B; detaching A from the host removes its export; delete removes the persistent name.
#[tokio::test]
async fn only_host_attachments_touch_exports() {
    let (mut env, nbd, dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let a = env.sim.sim.seed_volume("a", 16 << 20);
    let b = env.sim.sim.seed_volume("b", 16 << 20);
    let persistent_dir = env.sysfs.join("persistent");
    attach(&env, a, host).await;
    let before = (
        entries(&dir),
        export_rows(&mut env).await,
        entries(&persistent_dir),
    );

    let remote = attach(&env, b, DEMO_VMS[0]).await;
    assert_eq!(
        (remote.data.persistent_path, remote.data.nbd_export),
        (None, None)
    );
    detach(&env, b).await;

    assert_eq!(
        (
            entries(&dir),
            export_rows(&mut env).await,
            entries(&persistent_dir)
        ),
        before,
        "B's remote attach and detach changed nothing of A's, and made nothing for B"
    );
    assert_eq!(nbd.list().await, vec![NbdExport::name_of(a)]);

    detach(&env, a).await;
    assert!(entries(&dir).is_empty(), "A's export entry removed");
    assert_eq!(export_rows(&mut env).await[0].3, "removed");
    assert!(nbd.list().await.is_empty());
    assert!(entries(&persistent_dir).is_empty(), "A left the host VM");

    // Deleting a volume attached to the host detaches it: export and persistent name go.
    attach(&env, a, host).await;
    assert_eq!(entries(&persistent_dir).len(), 1);
    let deleted = env.execute(&cmd::delete(a)).await;
    assert_eq!(
        deleted.event_type, "volume.delete.completed",
        "{:?}",
        deleted.data.error
    );
    assert!(
        entries(&persistent_dir).is_empty(),
        "delete removed the persistent name"
    );
    assert!(entries(&dir).is_empty());
}

/// Acceptance 3: adding and removing another export while a long copy writes to one does not
/// disturb the copy.
#[tokio::test]
async fn a_long_copy_survives_another_export_coming_and_going() {
    let (env, _nbd, _dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let a = env.sim.sim.seed_volume("copied-into", 128 << 20);
    let b = env.sim.sim.seed_volume("comes-and-goes", 16 << 20);
    let export = attach(&env, a, host).await.data.nbd_export.expect("export");

    // 64 MiB of nbdkit's pattern (each 8 bytes: their offset, big-endian), at 80 Mbit/s:
    // about 6.7 s, so B comes and goes during the copy even on a loaded machine.
    let size = 64u64 << 20;
    let mut copy = Command::new("nbdcopy")
        .args(["--", "[", "nbdkit", "--filter=rate", "pattern"])
        .arg(format!("size={size}"))
        .arg("rate=80M")
        .args(["]", &export.url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdcopy runs");
    tokio::time::sleep(Duration::from_millis(300)).await;
    attach(&env, b, host).await;
    detach(&env, b).await;
    assert!(
        copy.try_wait().expect("copy state").is_none(),
        "the copy was still running while B came and went (make it slower otherwise)"
    );

    let done = tokio::time::timeout(WAIT, copy.wait_with_output())
        .await
        .expect("the copy ends")
        .expect("copy output");
    assert!(
        done.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let backing = cloudstack_sim::sysfs::backing_file(&env.sysfs, &a.to_string());
    let bytes = std::fs::read(&backing).expect("backing");
    let wrong = bytes[..size as usize]
        .chunks_exact(8)
        .enumerate()
        .filter(|(i, c)| u64::from_be_bytes((*c).try_into().expect("8 bytes")) != (*i as u64) * 8)
        .count();
    assert_eq!(
        wrong, 0,
        "every 8-byte word is its offset: the data is intact"
    );
}

/// Acceptance 4: detached and attached again under another `vdX`, the volume keeps its
/// persistent path and export name, and they reach the new device.
#[tokio::test]
async fn a_reattach_under_another_device_name_keeps_the_persistent_path_and_export() {
    let (mut env, nbd, _dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let a = env.sim.sim.seed_volume("moves", 16 << 20);
    let other = env.sim.sim.seed_volume("takes-vdb", 16 << 20);
    let first = attach(&env, a, host).await;
    detach(&env, a).await;
    attach(&env, other, host).await; // takes A's old device name
    let second = attach(&env, a, host).await;

    assert_ne!(
        first.data.device_path, second.data.device_path,
        "another vdX"
    );
    assert_eq!(first.data.persistent_path, second.data.persistent_path);
    assert_eq!(first.data.nbd_export, second.data.nbd_export);
    let persistent = PathBuf::from(second.data.persistent_path.expect("path"));
    let reached = std::fs::canonicalize(&persistent).expect("the chain resolves");
    assert_eq!(
        reached,
        std::fs::canonicalize(cloudstack_sim::sysfs::backing_file(
            &env.sysfs,
            &a.to_string()
        ))
        .expect("backing"),
        "the persistent name reaches A's disk"
    );
    assert_eq!(
        persistent_columns(&mut env, a).await.1,
        Some(persistent.display().to_string())
    );
    assert_eq!(nbd.list().await, {
        let mut both = vec![NbdExport::name_of(a), NbdExport::name_of(other)];
        both.sort();
        both
    });
}

/// Acceptance 5: with the daemon down, an export entry deleted and a stray one added by hand;
/// at the next start the directory and the table agree again, and the log says so.
#[tokio::test]
async fn at_start_the_export_directory_and_the_table_are_made_to_agree() {
    let (mut env, nbd, dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let a = env.sim.sim.seed_volume("kept", 16 << 20);
    let b = env.sim.sim.seed_volume("entry-lost", 16 << 20);
    attach(&env, a, host).await;
    attach(&env, b, host).await;
    env.kill_daemon().await;

    std::fs::remove_file(dir.join(NbdExport::name_of(b))).expect("delete B's entry");
    let stray = dir.join("migration-vol-00000000-0000-4000-8000-000000000000");
    std::os::unix::fs::symlink("/dev/null", &stray).expect("stray entry");
    env.start_daemon().await;
    env.wait_active(WAIT).await;

    let want = {
        let mut w = vec![NbdExport::name_of(a), NbdExport::name_of(b)];
        w.sort();
        w
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while entries(&dir) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not repaired: {:?}",
            entries(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nbd.list().await, want);
    let rows = export_rows(&mut env).await;
    assert!(
        rows.iter().all(|r| r.3 == "active") && rows.len() == 2,
        "{rows:?}"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("persistent name or export entry was missing or wrong: repaired"),
        "{log}"
    );
    assert!(
        log.contains("stray export entry (no host attachment has it): removed"),
        "{log}"
    );
}

/// Issue 13 on the host appliance: an attachment to the host VM made outside the daemon is
/// recorded by `reconcile` with its device, persistent name and export (`mapping_added`,
/// `export_added`), served by the read API; detached outside the daemon, the next reconcile
/// removes both (`mapping_removed`, `export_removed`).
#[tokio::test]
async fn reconcile_records_and_then_removes_a_host_attachment_made_outside_the_daemon() {
    use schema::event::ChangeKind;
    let (mut env, nbd, _dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("outside", 16 << 20);
    let by_id = |v: VolumeId| std::collections::HashMap::from([("id".to_owned(), v.to_string())]);
    let mut attach = by_id(volume);
    attach.insert("virtualmachineid".into(), host.to_string());
    env.sim
        .sim
        .attach_volume(&attach)
        .expect("attach behind the daemon's back");
    let deadline = tokio::time::Instant::now() + WAIT;
    let name = loop {
        if let Some(name) = env.sim.sim.device_name(volume)
            && env.sysfs.join("block").join(&name).exists()
        {
            break name;
        }
        assert!(tokio::time::Instant::now() < deadline, "no guest device");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Two scans, so the monitor's table has it.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let first = env.execute(&schema::Command::reconcile(None)).await;
    let changes = first.data.changes.expect("changes");
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.what).collect();
    assert_eq!(
        kinds,
        [ChangeKind::MappingAdded, ChangeKind::ExportAdded],
        "{changes:?}"
    );
    assert!(changes.iter().all(|c| c.volume_id == volume));
    let export_name = NbdExport::name_of(volume);
    assert_eq!(changes[1].after.as_deref(), Some(export_name.as_str()));
    assert_eq!(
        nbd.list().await,
        std::slice::from_ref(&export_name),
        "the NBD server serves it"
    );

    let (status, body) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mapping"]["device_path"], format!("/dev/{name}"));
    assert_eq!(body["mapping"]["mode"], "oma");
    assert_eq!(body["nbd_export"]["name"], export_name);
    assert_eq!(
        body["nbd_export"]["url"],
        format!("{}/{export_name}", nbd.url)
    );
    let (_, exports) = env.get_json("/api/v1/exports").await;
    assert_eq!(
        exports["items"].as_array().map(Vec::len),
        Some(1),
        "{exports}"
    );
    assert_eq!(export_rows(&mut env).await[0].3, "active");

    env.sim
        .sim
        .detach_volume(&by_id(volume))
        .expect("detach behind the daemon's back");
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.sim.sim.attachment(volume).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the detach job did not end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = env.execute(&schema::Command::reconcile(None)).await;
    let kinds: Vec<ChangeKind> = second
        .data
        .changes
        .expect("changes")
        .iter()
        .map(|c| c.what)
        .collect();
    assert_eq!(
        kinds,
        [ChangeKind::MappingRemoved, ChangeKind::ExportRemoved]
    );
    assert!(nbd.list().await.is_empty(), "the export is gone");
    let (_, exports) = env.get_json("/api/v1/exports").await;
    assert_eq!(exports["items"], serde_json::json!([]));
    assert_eq!(export_rows(&mut env).await[0].3, "removed");
    let third = env.execute(&schema::Command::reconcile(None)).await;
    assert_eq!(third.data.changes, Some(vec![]));
}

/// N8: after a SIGKILL, the standby's wait and a takeover, the new active's host repair runs
/// and puts back an export removed by hand, every time (five takeovers in a row); `idle_kill`:
/// the same with MySQL 8's answer to a connection past `wait_timeout` (error 4031) in front
/// of the database.
async fn the_host_repair_runs_after_every_takeover(idle_kill: bool) {
    let (mut env, _nbd, dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let v = env
        .sim
        .sim
        .seed_volume("repaired-after-takeovers", 16 << 20);
    let attached = env.execute(&cmd::attach(v, host)).await;
    assert_eq!(attached.data.status.as_str(), "completed", "{attached:?}");
    let entry = dir.join(NbdExport::name_of(v));
    assert!(entry.exists());
    let proxy = match idle_kill {
        true => Some(
            crate::helpers::IdleKillProxy::start(
                "127.0.0.1:3306".parse().expect("addr"),
                Duration::from_secs(5),
            )
            .await,
        ),
        false => None,
    };
    let url = match &proxy {
        Some(p) => format!("mysql://root@{}/{}", p.addr, env.db_name),
        None => env.database_url(),
    };
    for round in 0..5 {
        let standby = env.spawn_other_with(&[("DATABASE_URL", url.clone())]).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while crate::helpers::get_json(standby, "/ready").await.1["role"] != "standby" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: no standby"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::fs::remove_file(&entry).expect("export removed by hand");
        env.kill_daemon().await;
        env.promote_other(0, standby);
        env.wait_active(WAIT).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::fs::symlink_metadata(&entry).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the export was not repaired after the takeover\n{}",
                env.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let log = env.daemon_log();
    assert!(
        !log.contains("cannot reconcile the host files with the tables\""),
        "a repair gave up:\n{log}"
    );
    // The activation's schema check retries a dropped connection at once: no takeover gives
    // the lease back and waits.
    assert!(
        !log.contains("the schema could not be migrated"),
        "an activation gave up on its schema check:\n{log}"
    );
    if let Some(p) = &proxy {
        // The daemon's pools close idle connections before the server would: usually none.
        eprintln!("daemon connections answered with error 4031: {}", p.kills());
        // The fault is real: a session left idle past the timeout gets 4031 and is closed.
        use sqlx::Connection;
        let mut idle = sqlx::MySqlConnection::connect(&url).await.expect("connect");
        sqlx::query("SELECT 1")
            .execute(&mut idle)
            .await
            .expect("fresh");
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let err = sqlx::query("SELECT 1")
            .execute(&mut idle)
            .await
            .expect_err("idle past the timeout");
        let code = err
            .as_database_error()
            .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(|e| e.number());
        assert_eq!(code, Some(4031), "{err}");
    }
}

#[tokio::test]
async fn the_host_repair_runs_after_five_takeovers_in_a_row() {
    the_host_repair_runs_after_every_takeover(false).await;
}

#[tokio::test]
async fn the_host_repair_runs_after_five_takeovers_behind_a_mysql8_idle_timeout() {
    the_host_repair_runs_after_every_takeover(true).await;
}

/// S5 (N5): a device claimed in one active period is free after a standby period. X attaches
/// A to the host; X loses MySQL (a frozen link) and Y takes over; Y detaches A; Y stops
/// (SIGTERM) and X, its link back, takes over again; X attaches B, which the kernel names as
/// it named A: B completes on that device within the correlation timeout, with its export.
#[tokio::test]
async fn a_device_claimed_before_a_standby_period_is_free_after_it() {
    let link = crate::helpers::TcpProxy::start("127.0.0.1:3306".parse().expect("addr")).await;
    let via_link = |env: &mut TestEnv| {
        env.daemon_database_url = Some(format!("mysql://root@{}/{}", link.addr, env.db_name));
    };
    let (mut env, nbd, dir) = exporting_env_with(via_link).await;
    let x = env.http_addr;
    let host = env.host_vm.expect("host vm");
    let a = env.sim.sim.seed_volume("claimed-by-x", 16 << 20);
    let b = env
        .sim
        .sim
        .seed_volume("after-the-standby-period", 16 << 20);
    attach(&env, a, host).await;
    let a_device = env.sim.sim.device_name(a).expect("A's device");

    let y = env
        .spawn_other_with(&[("DATABASE_URL", env.database_url())])
        .await;
    wait_for(y, "standby").await;
    link.freeze();
    wait_for(y, "active").await;
    detach(&env, a).await;
    link.restore();
    wait_for(x, "standby").await;

    let y_pid = env.others[0].id().expect("Y runs");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &y_pid.to_string()])
        .status();
    tokio::time::timeout(WAIT, env.others[0].wait())
        .await
        .expect("Y exits after SIGTERM")
        .expect("wait");
    env.wait_active(WAIT).await;

    let event = attach(&env, b, host).await;
    assert_eq!(
        env.sim.sim.device_name(b).as_deref(),
        Some(a_device.as_str()),
        "the kernel gave B A's former name (else this test shows nothing)"
    );
    assert_eq!(event.data.device_path, Some(format!("/dev/{a_device}")));
    let export = NbdExport::name_of(b);
    assert!(dir.join(&export).exists(), "B's export entry");
    assert!(nbd.list().await.contains(&export), "B's export is served");
    assert!(
        !dir.join(NbdExport::name_of(a)).exists(),
        "A's export is gone"
    );
}

async fn wait_for(addr: std::net::SocketAddr, role: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while crate::helpers::get_json(addr, "/ready").await.1["role"] != role {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon at {addr} did not become {role}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// S6 (N6): a new active whose database answers 400 ms late per round trip keeps its lease
/// while it repairs the host files. The active holds six host mappings (the most a VM takes)
/// and is SIGKILLed with commands waiting; for 10 s every answer on the standby's database
/// link is held 400 ms. The standby takes over once (the epoch rises by exactly 1), never
/// fences itself for a late renewal, keeps every export, and ends every waiting command once.
#[tokio::test]
async fn a_takeover_over_a_slow_database_link_keeps_its_lease_through_the_repair() {
    let (mut env, _nbd, dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let mut volumes = Vec::new();
    for i in 0..6 {
        let v = env
            .sim
            .sim
            .seed_volume(&format!("slow-repair-{i}"), 16 << 20);
        attach(&env, v, host).await;
        volumes.push(v);
    }
    let epoch = |pool: sqlx::MySqlPool| async move {
        sqlx::query_scalar::<_, u64>("SELECT epoch FROM execution_lease")
            .fetch_one(&pool)
            .await
            .expect("epoch")
    };
    let before = epoch(env.db().await).await;
    let slow = crate::helpers::DelayProxy::start("127.0.0.1:3306".parse().expect("addr")).await;
    let url = format!("mysql://root@{}/{}", slow.addr, env.db_name);
    let standby = env.spawn_other_with(&[("DATABASE_URL", url)]).await;
    wait_for(standby, "standby").await;

    let collector = crate::helpers::Collector::start(&env.prefix).await;
    slow.set_delay(Duration::from_millis(400));
    let slow_until = chrono::Utc::now() + chrono::TimeDelta::seconds(10);
    env.kill_daemon().await;
    let client = env.client().await;
    let waiting: Vec<schema::Command> = (0..5)
        .map(|i| cmd::create(&format!("waiting-{i}"), "1GiB"))
        .collect();
    for c in &waiting {
        client.publish_only(c).await.expect("published");
    }
    env.promote_other(0, standby);
    tokio::time::sleep(Duration::from_secs(10)).await;
    slow.set_delay(Duration::ZERO);

    let ids: Vec<String> = waiting.iter().map(|c| c.command_id.to_string()).collect();
    let events = collector.wait_all(&ids, Duration::from_secs(90)).await;
    assert!(
        events
            .iter()
            .all(|e| e.data.status == schema::OperationStatus::Completed),
        "{events:?}"
    );
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        5,
        "each create once"
    );
    assert_eq!(
        epoch(env.db().await).await,
        before + 1,
        "one takeover, no flapping"
    );
    let log = env.daemon_log();
    let took_over = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["message"] == "execution lease acquired; this instance is active"
                && l["epoch"] == before + 1
        })
        .and_then(|l| {
            l["timestamp"]
                .as_str()?
                .parse::<chrono::DateTime<chrono::Utc>>()
                .ok()
        })
        .expect("the takeover is logged");
    assert!(
        took_over < slow_until,
        "the standby took over at {took_over}, after the slow period ({slow_until}): the repair \
         never ran over the slow link\n{log}"
    );
    assert!(
        !log.contains("no lease renewal succeeded in time"),
        "the new active fenced itself:\n{log}"
    );
    for v in volumes {
        assert!(dir.join(NbdExport::name_of(v)).exists(), "export of {v}");
    }
}
