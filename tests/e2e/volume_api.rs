//! The rest of the volume API (docs/wire.md): `snapshot`, `revert_snapshot`,
//! `delete_snapshot` and `resize`, their events, rows and refusals; a lost answer and a SIGKILL
//! that cost no second CloudStack call; a host-attached volume that grows under a running copy;
//! a boot volume attached at device 0.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use cloudstack_sim::{DEMO_VMS, SimConfig};
use schema::event::AttachMode;
use schema::{CloudEvent, ErrorCode, OperationStatus, SnapshotId, VmId, VolumeId};

use crate::exports::exporting_env;
use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);
const GIB: u64 = 1 << 30;

fn completed(event: &CloudEvent, what: &str) {
    assert_eq!(
        event.data.status,
        OperationStatus::Completed,
        "{what}: {:?}",
        event.data.error
    );
}

fn failed(event: &CloudEvent, code: ErrorCode, what: &str) -> schema::EventError {
    assert_eq!(event.data.status, OperationStatus::Failed, "{what}");
    let error = event.data.error.clone().expect("an error");
    assert_eq!(error.code, code, "{what}: {}", error.message);
    error
}

/// A volume attached once to `vm` (so CloudStack made its storage: `Ready`).
async fn ready_volume(env: &TestEnv, name: &str, size: u64, vm: VmId) -> VolumeId {
    let volume = env.sim.sim.seed_volume(name, size);
    completed(&env.execute(&cmd::attach(volume, vm)).await, "attach");
    volume
}

fn snapshot_of(event: &CloudEvent) -> schema::SnapshotInfo {
    event.data.snapshot.clone().expect("the event's snapshot")
}

/// Acceptance 1 (events, rows, idempotency) for the three snapshot commands on a volume whose
/// VM is stopped: snapshot, revert, delete, delete again (`already_absent`); a duplicate of
/// each answers with the same event and no second call.
#[tokio::test]
async fn snapshot_revert_and_delete_end_with_their_events_rows_and_one_call_each() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = ready_volume(&env, "snap-me", GIB, vm).await;
    assert!(env.sim.sim.set_vm_running(vm, false), "VM stopped");

    let take = schema::Command::snapshot(volume, Some("before-test".into()));
    let taken = env.execute(&take).await;
    completed(&taken, "snapshot");
    assert_eq!(taken.event_type, "volume.snapshot.completed");
    let snap = snapshot_of(&taken);
    assert_eq!(snap.volume_id, volume);
    assert_eq!(snap.state, "BackedUp");
    assert!(
        snap.name.contains(take.command_id.as_str()) && snap.name.starts_with("before-test"),
        "{}",
        snap.name
    );
    assert_eq!(
        env.sim.sim.snapshots_of(volume),
        vec![(snap.id, "BackedUp".to_owned())]
    );
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["snapshots"][0]["id"], json!(snap.id), "{view}");
    assert_eq!(
        view["snapshots"][0]["operation_id"],
        json!(take.command_id.as_str())
    );
    let again = env.execute(&take).await;
    assert_eq!(
        again.id, taken.id,
        "a duplicate answers with the same event"
    );
    assert_eq!(env.sim.sim.call_count("createSnapshot"), 1);

    let revert = schema::Command::revert_snapshot(volume, snap.id);
    let reverted = env.execute(&revert).await;
    completed(&reverted, "revert");
    assert_eq!(snapshot_of(&reverted).id, snap.id);
    assert_eq!(env.execute(&revert).await.id, reverted.id);
    assert_eq!(env.sim.sim.call_count("revertSnapshot"), 1);

    let delete = schema::Command::delete_snapshot(volume, snap.id);
    let deleted = env.execute(&delete).await;
    completed(&deleted, "delete_snapshot");
    assert_eq!(deleted.data.snapshot_id, Some(snap.id));
    assert_eq!(deleted.data.already_absent, Some(false));
    assert!(env.sim.sim.snapshots_of(volume).is_empty());
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["snapshots"], json!([]), "{view}");
    let gone = env
        .execute(&schema::Command::delete_snapshot(volume, snap.id))
        .await;
    completed(&gone, "second delete_snapshot");
    assert_eq!(gone.data.already_absent, Some(true));
    assert_eq!(env.sim.sim.call_count("deleteSnapshot"), 1);
}

/// Acceptance 2: each refusal is a failed event with a specific code and hint, and nothing
/// changed at the cloud.
#[tokio::test]
async fn refusals_name_their_cause_and_change_nothing_at_the_cloud() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = ready_volume(&env, "refused", 2 * GIB, vm).await;

    // KVM without kvm.snapshot.enabled: a running VM's volume cannot be snapshotted.
    let kvm = env.execute(&schema::Command::snapshot(volume, None)).await;
    let error = failed(&kvm, ErrorCode::CloudstackJobFailed, "kvm setting");
    assert!(!error.retryable);
    assert!(
        error.hint.contains("kvm.snapshot.enabled"),
        "{}",
        error.hint
    );

    env.sim.sim.set_kvm_snapshot_enabled(true);
    let snap = snapshot_of(&env.execute(&schema::Command::snapshot(volume, None)).await);
    let reverts = env.sim.sim.call_count("revertSnapshot");
    // The VM runs: CloudStack would refuse the revert; the daemon says which condition.
    let running = env
        .execute(&schema::Command::revert_snapshot(volume, snap.id))
        .await;
    let error = failed(&running, ErrorCode::VolumeInUse, "revert on a running VM");
    assert!(!error.retryable);
    assert!(error.hint.contains("detach volume"), "{}", error.hint);
    // Another volume's snapshot, an unknown one.
    let other = ready_volume(&env, "other", GIB, vm).await;
    for id in [snap.id, SnapshotId::new_random()] {
        let wrong = env
            .execute(&schema::Command::revert_snapshot(other, id))
            .await;
        failed(&wrong, ErrorCode::SnapshotNotFound, "not that volume's");
    }
    assert_eq!(
        env.sim.sim.call_count("revertSnapshot"),
        reverts,
        "no revert sent"
    );

    // A snapshot of an unknown volume; of one never attached.
    let unknown = env
        .execute(&schema::Command::snapshot(VolumeId::new_random(), None))
        .await;
    failed(&unknown, ErrorCode::VolumeNotFound, "unknown volume");
    let fresh = env.sim.sim.seed_volume("never-attached", GIB);
    let allocated = env.execute(&schema::Command::snapshot(fresh, None)).await;
    let error = failed(
        &allocated,
        ErrorCode::CloudstackInvalidParameter,
        "Allocated",
    );
    assert!(
        error.hint.contains("attach the volume once"),
        "{}",
        error.hint
    );

    // A shrink without the flag: an operation (row and event), no resizeVolume.
    let shrink = schema::Command::resize(volume, "1GiB".parse().expect("size"), false);
    let refused = env.execute(&shrink).await;
    let error = failed(&refused, ErrorCode::InvalidCommand, "shrink");
    assert!(error.hint.contains("shrink_ok"), "{}", error.hint);
    let row = env
        .operation(shrink.command_id.as_str())
        .await
        .expect("a row, not a dead letter");
    assert_eq!(row.status, "failed");
    // The same size after rounding: completed with no call.
    let same = env
        .execute(&schema::Command::resize(
            volume,
            "1800MiB".parse().expect("size"),
            false,
        ))
        .await;
    completed(&same, "same size");
    assert_eq!(same.data.previous_size, Some(2 * GIB));
    assert_eq!(env.sim.sim.call_count("resizeVolume"), 0);
    assert_eq!(
        env.sim.sim.volume_type_and_size(volume).map(|t| t.1),
        Some(2 * GIB)
    );
}

/// A createSnapshot whose connection dropped after CloudStack took it is found again by its
/// name: one createSnapshot in all, one snapshot.
#[tokio::test]
async fn a_snapshot_whose_answer_was_lost_is_found_by_its_name_not_taken_twice() {
    let mut env = TestEnv::with_sim(SimConfig {
        kvm_snapshot_enabled: true,
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let volume = ready_volume(&env, "lost-answer", GIB, DEMO_VMS[1]).await;
    let mut faults = env.sim.sim.faults();
    faults.drop_next.insert("createsnapshot".into(), 1);
    env.sim.sim.set_faults(faults);

    let taken = env.execute(&schema::Command::snapshot(volume, None)).await;
    completed(&taken, "snapshot after a lost answer");
    assert_eq!(env.sim.sim.call_count("createSnapshot"), 1);
    assert_eq!(env.sim.sim.snapshots_of(volume).len(), 1, "one snapshot");
    assert_eq!(
        snapshot_of(&taken).id,
        env.sim.sim.snapshots_of(volume)[0].0
    );
}

/// SIGKILL once the snapshot's job id is stored: the next daemon waits for that job; one
/// createSnapshot in all.
#[tokio::test]
async fn a_sigkill_after_the_snapshot_job_was_stored_resumes_that_job() {
    let mut env = TestEnv::with_sim(SimConfig {
        kvm_snapshot_enabled: true,
        job_latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let volume = ready_volume(&env, "killed", GIB, DEMO_VMS[0]).await;
    let take = schema::Command::snapshot(volume, None);
    let client = env.client().await;
    let pending = client.publish(&take).await.expect("published");
    let id = take.command_id.as_str().to_owned();
    env.wait_for_operation(&id, WAIT, |r| r.cloudstack_job_id.is_some())
        .await;
    env.kill_daemon().await;
    env.start_daemon().await;
    let event = pending.wait(WAIT).await.expect("the snapshot's event");
    completed(&event, "resumed snapshot");
    assert_eq!(env.sim.sim.call_count("createSnapshot"), 1);
    assert_eq!(env.sim.sim.snapshots_of(volume).len(), 1);
}

/// Acceptance 3: a host-attached volume grows while `nbdcopy` reads its export; the copy
/// completes, a new client sees the new size, the read API and the event report it, and the
/// persistent name and export stay.
#[tokio::test]
async fn a_host_attached_volume_grows_while_a_copy_reads_its_export() {
    let (env, _nbd, _dir) = exporting_env().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("grows", GIB);
    let attached = env.execute(&cmd::attach(volume, host)).await;
    completed(&attached, "host attach");
    let export = attached.data.nbd_export.clone().expect("export");

    // The whole 1 GiB, every byte read (no extents) and written to a rate-limited sink:
    // about 4 s, so the resize lands during the copy.
    let mut copy = Command::new("nbdcopy")
        .args([
            "--no-extents",
            &export.url,
            "--",
            "[",
            "nbdkit",
            "--filter=nozero",
        ])
        .args(["--filter=rate", "null", "size=1G", "rate=2G", "]"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdcopy runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = env
        .execute(&schema::Command::resize(
            volume,
            "2GiB".parse().expect("size"),
            false,
        ))
        .await;
    completed(&grown, "resize");
    assert!(
        copy.try_wait().expect("copy state").is_none(),
        "the copy was still reading when the resize completed (make it slower otherwise)"
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

    assert_eq!(grown.data.volume.as_ref().map(|v| v.size), Some(2 * GIB));
    assert_eq!(grown.data.previous_size, Some(GIB));
    assert_eq!(grown.data.persistent_path, attached.data.persistent_path);
    assert_eq!(grown.data.nbd_export, attached.data.nbd_export);
    assert_eq!(grown.data.device_path, attached.data.device_path);
    let info = Command::new("nbdinfo")
        .args(["--json", &export.url])
        .output()
        .await
        .expect("nbdinfo runs");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("nbdinfo JSON");
    assert_eq!(info["exports"][0]["export-size"], json!(2 * GIB), "{info}");
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["mapping"]["size"], json!(2 * GIB), "{view}");
    assert_eq!(env.sim.sim.call_count("resizeVolume"), 1);
}

/// Acceptance 5: a boot volume attached at device 0 of a stopped VM without a root disk is the
/// VM's `ROOT`; a reconcile reports no change, the read API shows it on its VM, and detach and
/// delete work.
#[tokio::test]
async fn a_boot_volume_at_device_zero_is_root_and_reconcile_detach_and_delete_handle_it() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = VmId::new_random();
    env.sim
        .sim
        .add_vm_with(vm, "test-failover-vm", false, false);
    let volume = env.sim.sim.seed_volume("boot", 8 * GIB);
    let attach = schema::command::AttachVolume::new(volume, vm)
        .device_id(0)
        .map(schema::Command::from)
        .expect("device 0");
    let attached = env.execute(&attach).await;
    completed(&attached, "boot attach");
    assert_eq!(attached.data.mode, Some(AttachMode::Remote));
    assert_eq!(
        env.sim.sim.volume_type_and_size(volume).map(|t| t.0),
        Some("ROOT".to_owned())
    );

    let reconciled = env.execute(&schema::Command::reconcile(Some(vm))).await;
    completed(&reconciled, "reconcile");
    assert_eq!(reconciled.data.changes, Some(Vec::new()), "nothing drifted");
    let (_, on_vm) = env.get_json(&format!("/api/v1/vms/{vm}/volumes")).await;
    assert_eq!(on_vm["items"][0]["volume_id"], json!(volume), "{on_vm}");

    let detached = env.execute(&cmd::detach(volume)).await;
    completed(&detached, "detach of a root disk");
    assert_eq!(
        env.sim.sim.volume_type_and_size(volume).map(|t| t.0),
        Some("DATADISK".to_owned()),
        "a data disk again"
    );
    completed(&env.execute(&cmd::delete(volume)).await, "delete");
    assert!(!env.sim.sim.volumes().iter().any(|(id, _)| *id == volume));
}

/// Writes `pattern` at the start of the volume behind `url` (an NBD export).
async fn write_through(env: &TestEnv, url: &str, pattern: &[u8]) {
    let src = env.sysfs.join(format!("pattern-{}.bin", pattern[0]));
    std::fs::write(&src, pattern).expect("pattern file");
    let out = Command::new("nbdcopy")
        .arg(&src)
        .arg(url)
        .output()
        .await
        .expect("nbdcopy runs");
    assert!(out.status.success(), "nbdcopy into the export: {out:?}");
}

/// The first `len` bytes of the volume behind `url`.
async fn read_through(env: &TestEnv, url: &str, len: usize) -> Vec<u8> {
    let dst = env.sysfs.join("read-back.bin");
    let out = Command::new("nbdcopy")
        .args([url, &dst.display().to_string()])
        .output()
        .await
        .expect("nbdcopy runs");
    assert!(out.status.success(), "nbdcopy from the export: {out:?}");
    let mut bytes = std::fs::read(&dst).expect("read back");
    bytes.truncate(len);
    bytes
}

/// Acceptance 4: the test-failover recipe of docs/failover.md, twice on the same volumes (a
/// boot disk and a data disk): snapshot each disk → detach from the appliance → attach to the
/// test VM (boot disk at device 0) → the test writes → detach from the test VM → revert → attach
/// back to the appliance (same persistent name and export) → delete the snapshot. Each disk
/// then holds exactly what was written before its snapshot, and a reconcile changes nothing.
#[tokio::test]
async fn the_test_failover_recipe_runs_twice_and_gives_back_the_data_from_before_the_test() {
    let (env, _nbd, _dir) = exporting_env().await;
    env.sim.sim.set_kvm_snapshot_enabled(true);
    let host = env.host_vm.expect("host vm");
    let test_vm = VmId::new_random();
    env.sim
        .sim
        .add_vm_with(test_vm, "test-failover", false, false);
    let disks = [
        (env.sim.sim.seed_volume("boot", 64 << 20), Some(0)),
        (env.sim.sim.seed_volume("data", 64 << 20), None),
    ];
    let mut exports = Vec::new();
    for (volume, _) in &disks {
        let attached = env.execute(&cmd::attach(*volume, host)).await;
        completed(&attached, "attach to the appliance");
        exports.push(attached.data.clone());
    }
    for round in 0..2u8 {
        let patterns: Vec<Vec<u8>> = (0..disks.len())
            .map(|d| {
                (0..(1u32 << 20))
                    .map(|i| (i as u8) ^ (round * 16 + d as u8 + 1))
                    .collect()
            })
            .collect();
        let mut snapshots = Vec::new();
        for (i, (volume, _)) in disks.iter().enumerate() {
            let url = &exports[i].nbd_export.as_ref().expect("export").url;
            write_through(&env, url, &patterns[i]).await;
            let taken = env.execute(&schema::Command::snapshot(*volume, None)).await;
            completed(&taken, "snapshot");
            snapshots.push(snapshot_of(&taken).id);
            completed(
                &env.execute(&cmd::detach(*volume)).await,
                "detach from the appliance",
            );
        }
        for (volume, device) in &disks {
            let attach = schema::command::AttachVolume::new(*volume, test_vm);
            let attach = match device {
                Some(d) => attach
                    .device_id(*d)
                    .map(schema::Command::from)
                    .expect("device"),
                None => schema::Command::from(attach),
            };
            completed(&env.execute(&attach).await, "attach to the test VM");
            // The test writes over the disk.
            let backing = cloudstack_sim::sysfs::backing_file(&env.sysfs, &volume.to_string());
            std::fs::write(&backing, vec![0xEE; 1 << 20]).expect("the test's writes");
        }
        for (i, (volume, _)) in disks.iter().enumerate() {
            completed(
                &env.execute(&cmd::detach(*volume)).await,
                "detach from the test VM",
            );
            let revert = schema::Command::revert_snapshot(*volume, snapshots[i]);
            completed(&env.execute(&revert).await, "revert");
            let back = env.execute(&cmd::attach(*volume, host)).await;
            completed(&back, "attach back to the appliance");
            assert_eq!(
                back.data.persistent_path, exports[i].persistent_path,
                "same name"
            );
            assert_eq!(back.data.nbd_export, exports[i].nbd_export, "same export");
            let url = &back.data.nbd_export.as_ref().expect("export").url;
            let read = read_through(&env, url, patterns[i].len()).await;
            assert!(
                read == patterns[i],
                "round {round}, disk {i}: the data from before the test"
            );
            let delete = schema::Command::delete_snapshot(*volume, snapshots[i]);
            completed(&env.execute(&delete).await, "delete the snapshot");
        }
    }
    let reconciled = env.execute(&schema::Command::reconcile(None)).await;
    completed(&reconciled, "reconcile");
    assert_eq!(reconciled.data.changes, Some(Vec::new()), "nothing drifted");
}

/// `volumectl snapshot|snapshots|revert|delete-snapshot|resize`: each publishes its command,
/// waits for the event and exits 0; `snapshots` lists what the read API shows.
#[tokio::test]
async fn volumectl_takes_lists_reverts_deletes_snapshots_and_resizes() {
    let mut env = TestEnv::with_sim(SimConfig {
        kvm_snapshot_enabled: true,
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = ready_volume(&env, "by-volumectl", GIB, vm).await;
    let v = volume.to_string();
    let run = |args: Vec<String>| {
        let env = &env;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = crate::helpers::run_volumectl(env, &args).await;
            assert_eq!(code, 0, "volumectl {args:?}: {out}{err}");
            out
        }
    };
    let out = run(vec![
        "snapshot".into(),
        "--volume".into(),
        v.clone(),
        "--name".into(),
        "ctl".into(),
        "--wait".into(),
    ])
    .await;
    assert!(out.contains("volume.snapshot.completed"), "{out}");
    let (id, _) = env.sim.sim.snapshots_of(volume)[0].clone();
    let listed = run(vec!["snapshots".into(), v.clone()]).await;
    assert!(
        listed.contains(&id.to_string()) && listed.contains("BackedUp"),
        "{listed}"
    );
    assert!(env.sim.sim.set_vm_running(vm, false));
    let out = run(vec![
        "revert".into(),
        "--volume".into(),
        v.clone(),
        "--snapshot".into(),
        id.to_string(),
        "--wait".into(),
    ])
    .await;
    assert!(out.contains("volume.revert_snapshot.completed"), "{out}");
    let out = run(vec![
        "delete-snapshot".into(),
        "--volume".into(),
        v.clone(),
        "--snapshot".into(),
        id.to_string(),
        "--wait".into(),
    ])
    .await;
    assert!(out.contains("volume.delete_snapshot.completed"), "{out}");
    let out = run(vec![
        "resize".into(),
        "--volume".into(),
        v.clone(),
        "--size".into(),
        "3GiB".into(),
        "--wait".into(),
    ])
    .await;
    assert!(
        out.contains("volume.resize.completed") && out.contains(&format!("was {GIB} bytes")),
        "{out}"
    );
    assert_eq!(
        env.sim.sim.volume_type_and_size(volume).map(|t| t.1),
        Some(3 * GIB)
    );
    let listed = run(vec!["snapshots".into(), v]).await;
    assert!(listed.contains("no snapshots"), "{listed}");
}

/// Where a SIGKILL lands in one of the new commands.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// The command is committed (accepted); it may or may not have reached CloudStack.
    Accepted,
    /// The CloudStack call was sent and acted, its answer is held back.
    AnswerHeldBack,
    /// The job id is stored and the job still runs.
    JobStored,
    /// The job ended but the outcome could not be committed (the daemon's database link
    /// frozen from when the job id was stored).
    JobDoneNotCommitted,
}

/// Acceptance 1 (the SIGKILL part): the command of `kind` survives a SIGKILL at `at` with
/// exactly one call of `call` at CloudStack and a completed event.
async fn survives_a_sigkill(kind: &str, call: &str, at: KillAt, job_ms: u64) {
    let mut env = TestEnv::with_sim(SimConfig {
        kvm_snapshot_enabled: true,
        job_latency: Duration::from_millis(job_ms),
        ..SimConfig::default()
    })
    .await;
    let link = crate::helpers::TcpProxy::start("127.0.0.1:3306".parse().expect("addr")).await;
    if let KillAt::JobDoneNotCommitted = at {
        env.daemon_database_url = Some(format!("mysql://root@{}/{}", link.addr, env.db_name));
    }
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = ready_volume(&env, kind, GIB, vm).await;
    let needs_snapshot = matches!(kind, "revert_snapshot" | "delete_snapshot");
    let snapshot = match needs_snapshot {
        true => Some(snapshot_of(&env.execute(&schema::Command::snapshot(volume, None)).await).id),
        false => None,
    };
    assert!(
        env.sim.sim.set_vm_running(vm, false),
        "VM stopped (a revert needs it)"
    );
    let command = match kind {
        "snapshot" => schema::Command::snapshot(volume, None),
        "revert_snapshot" => schema::Command::revert_snapshot(volume, snapshot.expect("snapshot")),
        "delete_snapshot" => schema::Command::delete_snapshot(volume, snapshot.expect("snapshot")),
        _ => schema::Command::resize(volume, "2GiB".parse().expect("size"), false),
    };
    let before = env.sim.sim.call_count(call);
    if let KillAt::AnswerHeldBack = at {
        let mut faults = env.sim.sim.faults();
        let slow = cloudstack_sim::SlowCall {
            act_after_ms: 100,
            answer_after_ms: 20_000,
        };
        faults.slow_next.insert(call.to_lowercase(), slow);
        env.sim.sim.set_faults(faults);
    }
    let client = env.client().await;
    let pending = client.publish(&command).await.expect("published");
    let id = command.command_id.as_str().to_owned();
    match at {
        KillAt::Accepted => {
            env.wait_for_operation(&id, WAIT, |_| true).await;
        }
        KillAt::JobStored => {
            env.wait_for_operation(&id, WAIT, |r| r.cloudstack_job_id.is_some())
                .await;
        }
        KillAt::JobDoneNotCommitted => {
            env.wait_for_operation(&id, WAIT, |r| r.cloudstack_job_id.is_some())
                .await;
            link.freeze();
            // The job ends meanwhile; the outcome cannot reach the database.
            tokio::time::sleep(Duration::from_millis(job_ms + 1000)).await;
            let status = env.operation(&id).await.expect("row").status;
            assert_eq!(status, "executing", "the outcome was not committed");
        }
        KillAt::AnswerHeldBack => {
            let deadline = tokio::time::Instant::now() + WAIT;
            while env.sim.sim.call_count(call) == before {
                assert!(tokio::time::Instant::now() < deadline, "{call} never sent");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    env.kill_daemon().await;
    env.daemon_database_url = None;
    env.start_daemon().await;
    let event = pending
        .wait(Duration::from_secs(60))
        .await
        .expect("its event");
    completed(&event, &format!("{kind} after a SIGKILL at {at:?}"));
    let calls = env.sim.sim.call_count(call) - before;
    let resent = crate::helpers::get_text(env.http_addr, "/metrics")
        .await
        .lines()
        .any(|l| {
            l.starts_with("volume_daemon_cloudstack_retries_total{command=\"revertSnapshot\"} 1")
        });
    match (kind, at) {
        // The documented exception (docs/cloudstack.md): the new daemon takes over after the
        // old one's lease expired, when a short revert job has ended; a revert leaves nothing
        // to look at then, so it is sent once more, counted as a retry.
        ("revert_snapshot", KillAt::AnswerHeldBack) if job_ms < 5000 => {
            assert_eq!(calls, 2, "{kind}: the one documented re-send");
            assert!(resent, "the re-send is counted");
        }
        // Killed right after the accept, the revert may have been sent without its job being
        // stored: the same exception, when it happens.
        ("revert_snapshot", KillAt::Accepted) if calls == 2 => {
            assert!(resent, "the re-send is counted");
        }
        _ => assert_eq!(
            calls, 1,
            "{kind}: exactly one {call} after a SIGKILL at {at:?}"
        ),
    }
}

#[tokio::test]
async fn a_snapshot_survives_a_sigkill_while_its_answer_is_held_back() {
    survives_a_sigkill("snapshot", "createSnapshot", KillAt::AnswerHeldBack, 3000).await;
}

#[tokio::test]
async fn a_revert_survives_a_sigkill_once_its_job_is_stored() {
    survives_a_sigkill("revert_snapshot", "revertSnapshot", KillAt::JobStored, 3000).await;
}

#[tokio::test]
async fn a_revert_survives_a_sigkill_while_its_answer_is_held_back() {
    survives_a_sigkill(
        "revert_snapshot",
        "revertSnapshot",
        KillAt::AnswerHeldBack,
        3000,
    )
    .await;
}

#[tokio::test]
async fn a_delete_snapshot_survives_a_sigkill_once_its_job_is_stored() {
    survives_a_sigkill("delete_snapshot", "deleteSnapshot", KillAt::JobStored, 3000).await;
}

#[tokio::test]
async fn a_delete_snapshot_survives_a_sigkill_while_its_answer_is_held_back() {
    survives_a_sigkill(
        "delete_snapshot",
        "deleteSnapshot",
        KillAt::AnswerHeldBack,
        3000,
    )
    .await;
}

#[tokio::test]
async fn a_resize_survives_a_sigkill_once_its_job_is_stored() {
    survives_a_sigkill("resize", "resizeVolume", KillAt::JobStored, 3000).await;
}

#[tokio::test]
async fn a_resize_survives_a_sigkill_while_its_answer_is_held_back() {
    survives_a_sigkill("resize", "resizeVolume", KillAt::AnswerHeldBack, 3000).await;
}

/// The revert's job still runs when the next daemon takes over: it waits for that job
/// instead of sending the revert again.
#[tokio::test]
async fn a_revert_whose_job_still_runs_after_a_sigkill_is_not_sent_again() {
    survives_a_sigkill(
        "revert_snapshot",
        "revertSnapshot",
        KillAt::AnswerHeldBack,
        10_000,
    )
    .await;
}

#[tokio::test]
async fn a_snapshot_survives_a_sigkill_after_its_job_ended_before_its_outcome_was_committed() {
    survives_a_sigkill(
        "snapshot",
        "createSnapshot",
        KillAt::JobDoneNotCommitted,
        2000,
    )
    .await;
}

#[tokio::test]
async fn a_revert_survives_a_sigkill_after_its_job_ended_before_its_outcome_was_committed() {
    survives_a_sigkill(
        "revert_snapshot",
        "revertSnapshot",
        KillAt::JobDoneNotCommitted,
        2000,
    )
    .await;
}

#[tokio::test]
async fn a_delete_snapshot_survives_a_sigkill_after_its_job_ended_before_its_outcome_was_committed()
{
    survives_a_sigkill(
        "delete_snapshot",
        "deleteSnapshot",
        KillAt::JobDoneNotCommitted,
        2000,
    )
    .await;
}

#[tokio::test]
async fn a_resize_survives_a_sigkill_after_its_job_ended_before_its_outcome_was_committed() {
    survives_a_sigkill("resize", "resizeVolume", KillAt::JobDoneNotCommitted, 2000).await;
}

#[tokio::test]
async fn each_new_command_survives_a_sigkill_right_after_it_was_accepted() {
    for (kind, call) in [
        ("snapshot", "createSnapshot"),
        ("revert_snapshot", "revertSnapshot"),
        ("delete_snapshot", "deleteSnapshot"),
        ("resize", "resizeVolume"),
    ] {
        survives_a_sigkill(kind, call, KillAt::Accepted, 2000).await;
    }
}
