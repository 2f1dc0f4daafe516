//! Reconcile (the command and the periodic one) racing host attaches and detaches: it is
//! serialised with them, so it never takes a fresh export for a stray nor makes a detached
//! volume's links again (docs/host.md).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cloudstack_sim::SimConfig;
use schema::event::NbdExport;
use schema::{Command, VolumeId};
use sqlx::Row;

use crate::helpers::{TestEnv, cmd};

const VOLUMES: usize = 10;
const CYCLES: usize = 20;

/// What the host files hold for `v`: its export entry and its persistent name, where present.
fn entries_of(exports: &Path, persistent: &Path, v: VolumeId) -> Vec<PathBuf> {
    let hex = v.as_uuid().simple().to_string();
    let mut found: Vec<PathBuf> = [exports.join(NbdExport::name_of(v))]
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    if let Ok(dir) = std::fs::read_dir(persistent) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("vol") && hex.starts_with(&name[3..]) {
                found.push(e.path());
            }
        }
    }
    found
}

/// 10 volumes attached to and detached from the host 20 times each while a `reconcile` command
/// goes every 300 ms and the periodic reconcile every second: after each attach event the
/// volume's export exists and leads to its backing file; after each detach event none of its
/// entries remain; at the end the export directory, the active `nbd_exports` rows and the host
/// mappings are the same set.
#[tokio::test]
async fn reconcile_racing_host_attaches_and_detaches_breaks_nothing() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(20),
        // All ten may be attached at once (CloudStack's newer hypervisors allow more than 6).
        max_data_disks: 16,
        ..SimConfig::default()
    })
    .await;
    let exports = env.sysfs.join("exports");
    let persistent = env.sysfs.join("persistent");
    std::fs::create_dir_all(&exports).expect("export dir");
    env.extra_env
        .push(("NBD_EXPORT_DIR".into(), exports.display().to_string()));
    env.extra_env
        .push(("RECONCILE_INTERVAL_S".into(), "1".into()));
    env.extra_env
        .push(("DEVICE_POLL_INTERVAL_MS".into(), "50".into()));
    env.start_daemon().await;
    let env = Arc::new(env);
    let host = env.host_vm.expect("host vm");
    let volumes: Vec<VolumeId> = (0..VOLUMES)
        .map(|i| env.sim.sim.seed_volume(&format!("race-{i}"), 16 << 20))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let reconciles = {
        let (env, stop) = (env.clone(), stop.clone());
        tokio::spawn(async move {
            let client = env.client().await;
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                client
                    .publish_only(&Command::reconcile(None))
                    .await
                    .expect("reconcile published");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            sent
        })
    };

    let mut cycles = Vec::new();
    for (i, v) in volumes.iter().copied().enumerate() {
        let (env, exports, persistent) = (env.clone(), exports.clone(), persistent.clone());
        cycles.push(tokio::spawn(async move {
            let backing = std::fs::canonicalize(cloudstack_sim::sysfs::backing_file(
                &env.sysfs,
                &v.to_string(),
            ))
            .ok();
            // Even volumes end attached: the final sets are not trivially empty.
            let attaches = if i % 2 == 0 { CYCLES + 1 } else { CYCLES };
            for n in 0..attaches {
                let event = env.execute(&cmd::attach(v, host)).await;
                assert_eq!(event.data.status.as_str(), "completed", "{event:?}");
                let export = exports.join(NbdExport::name_of(v));
                let leads_to = std::fs::canonicalize(&export).unwrap_or_else(|e| {
                    panic!(
                        "attach {n} of {v}: its export {} is not there ({e})",
                        export.display()
                    )
                });
                let want = backing.clone().unwrap_or_else(|| {
                    std::fs::canonicalize(cloudstack_sim::sysfs::backing_file(
                        &env.sysfs,
                        &v.to_string(),
                    ))
                    .expect("backing file")
                });
                assert_eq!(leads_to, want, "attach {n} of {v}: export leads elsewhere");
                if n == CYCLES {
                    break;
                }
                let event = env.execute(&cmd::detach(v)).await;
                assert_eq!(event.data.status.as_str(), "completed", "{event:?}");
                let left = entries_of(&exports, &persistent, v);
                assert!(
                    left.is_empty(),
                    "detach {n} of {v}: entries remain: {left:?}"
                );
            }
        }));
    }
    for c in cycles {
        c.await.expect("a volume's cycles");
    }
    stop.store(true, Ordering::Relaxed);
    let sent = reconciles.await.expect("reconciles");
    assert!(sent > 10, "only {sent} reconcile commands went");

    // Let the last reconciles end, then compare the three sets.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pool = {
        let mut env = Arc::into_inner(env).expect("the only handle left");
        let pool = env.db().await;
        let dir: BTreeSet<String> = std::fs::read_dir(&exports)
            .expect("export dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        let rows: BTreeSet<String> =
            sqlx::query("SELECT export_name FROM nbd_exports WHERE status = 'active'")
                .fetch_all(&pool)
                .await
                .expect("nbd_exports")
                .iter()
                .map(|r| r.get("export_name"))
                .collect();
        let mapped: BTreeSet<String> =
            sqlx::query("SELECT volume_id FROM device_mappings WHERE operation_mode = 'oma'")
                .fetch_all(&pool)
                .await
                .expect("mappings")
                .iter()
                .map(|r| {
                    NbdExport::name_of(
                        VolumeId::parse(r.get::<String, _>("volume_id").as_str()).expect("id"),
                    )
                })
                .collect();
        let want: BTreeSet<String> = (volumes.iter().step_by(2))
            .map(|v| NbdExport::name_of(*v))
            .collect();
        assert_eq!(dir, want, "export directory");
        assert_eq!(rows, want, "active nbd_exports rows");
        assert_eq!(mapped, want, "host mappings");
        let failed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM volume_operations WHERE status <> 'completed'",
        )
        .fetch_one(&pool)
        .await
        .expect("statuses");
        assert_eq!(failed, 0, "every operation completed\n{}", env.daemon_log());
        pool
    };
    pool.close().await;
}
