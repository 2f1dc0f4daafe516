//! The middle of the test pyramid: one test per command type through the daemon built in this
//! process ([`TestEnv::spawn_app`]), against the real broker and database and the simulator.
//! Each checks what its command ends with: the stored `response` (docs/http.md), the event's
//! command-specific fields (docs/wire.md) and the mapping change, all made from one outcome.
//! What needs a process boundary (SIGKILL, SIGTERM, a cut TCP link) stays in the other modules.

use std::time::Duration;

use serde_json::json;

use cloudstack_sim::{DEMO_VMS, SimConfig};
use schema::event::{AttachMode, ChangeKind};
use schema::{CloudEvent, Command, OperationStatus, VmId, VolumeId};

use crate::helpers::{OperationRow, TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `command` and returns its event and its stored row.
async fn run(env: &mut TestEnv, command: &Command) -> (CloudEvent, OperationRow) {
    let event = env.execute(command).await;
    let row = env
        .operation(command.command_id.as_str())
        .await
        .expect("the operation's row");
    (event, row)
}

fn completed(event: &CloudEvent, what: &str) {
    assert_eq!(
        event.data.status,
        OperationStatus::Completed,
        "{what}: {:?}",
        event.data.error
    );
}

/// Waits until the simulator shows `volume` attached to `vm`.
async fn attached_in_sim(env: &TestEnv, volume: VolumeId, vm: VmId) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.sim.sim.attachment(volume).map(|a| a.0) != Some(vm) {
        assert!(tokio::time::Instant::now() < deadline, "never attached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mutation: `Completed::fill` without `data.volume` for a create, or a `Created` response
/// without its job: the event or the response differs.
#[tokio::test]
async fn create_stores_the_new_volume_and_its_job_in_response_and_event() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let (event, row) = run(&mut env, &cmd::create("inproc-create", "3GiB")).await;
    completed(&event, "create");
    let volume = event.data.volume.clone().expect("the event's volume");
    assert_eq!(volume.name, "inproc-create");
    assert_eq!(volume.size, 3 << 30);
    assert_eq!(event.data.volume_id, Some(volume.id));
    let job = row.cloudstack_job_id.clone().expect("the recorded job");
    assert_eq!(
        row.response,
        Some(json!({"volume": volume, "cloudstack_job_id": job}))
    );
    assert_eq!(row.volume_id, Some(volume.id.to_string()));
    assert!(env.sim.sim.volumes().iter().any(|(id, _)| *id == volume.id));
}

/// Mutation: `Completed::mapping_change` without the attachment's mapping: no remote mapping
/// is recorded.
#[tokio::test]
async fn a_remote_attach_records_a_remote_mapping_and_no_device() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let vm = DEMO_VMS[0];
    let volume = env.sim.sim.seed_volume("inproc-remote", 1 << 30);
    let (event, row) = run(&mut env, &cmd::attach(volume, vm)).await;
    completed(&event, "attach");
    assert_eq!(event.data.mode, Some(AttachMode::Remote));
    assert_eq!(event.data.vm_id, Some(vm));
    assert_eq!(event.data.device_path, None);
    assert_eq!(event.data.persistent_path, None);
    let (_, slot) = env
        .sim
        .sim
        .attachment(volume)
        .expect("attached in CloudStack");
    assert_eq!(
        row.response,
        Some(json!({"volume": {
            "id": volume, "virtualmachineid": vm, "deviceid": slot, "state": "Ready",
            "size": 1u64 << 30,
        }}))
    );
    let mapping = env.mappings().await.remove(&volume.to_string());
    let mapping = mapping.expect("a mapping");
    assert_eq!(
        (mapping.mode.as_str(), mapping.vm_id),
        ("failover", vm.to_string())
    );
    assert_eq!(mapping.device_path, None);
}

/// Mutation: a `Attached` response without `persistent_path` (or `device_path`): the stored
/// response no longer names what the event does.
#[tokio::test]
async fn a_host_attach_reports_its_device_and_persistent_path_in_response_event_and_mapping() {
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    env.spawn_app().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("inproc-host", 1 << 30);
    let (event, row) = run(&mut env, &cmd::attach(volume, host)).await;
    completed(&event, "host attach");
    let device = env.sim.sim.device_name(volume).expect("a guest device");
    let device_path = format!("/dev/{device}");
    assert_eq!(event.data.mode, Some(AttachMode::Host));
    assert_eq!(
        event.data.device_path.as_deref(),
        Some(device_path.as_str())
    );
    let persistent = event.data.persistent_path.clone().expect("persistent path");
    let response = row.response.expect("response");
    assert_eq!(response["device_path"], json!(device_path));
    assert_eq!(response["persistent_path"], json!(persistent));
    assert_eq!(response["volume"]["virtualmachineid"], json!(host));
    let mapping = &env.mappings().await[&volume.to_string()];
    assert_eq!(mapping.mode, "oma");
    assert_eq!(mapping.device_path.as_deref(), Some(device_path.as_str()));
    assert_eq!(mapping.linux_state, "present");
}

/// Mutation: `Completed::fill` with `already_detached: Some(false)` for every detach (or a
/// `Detached` response that always names `detached_from`): the second detach says otherwise.
#[tokio::test]
async fn detach_names_the_vm_it_left_and_a_second_detach_says_already_detached() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let vm = DEMO_VMS[1];
    let volume = env.sim.sim.seed_volume("inproc-detach", 1 << 30);
    completed(&run(&mut env, &cmd::attach(volume, vm)).await.0, "attach");

    let (event, row) = run(&mut env, &cmd::detach(volume)).await;
    completed(&event, "detach");
    assert_eq!(event.data.vm_id, Some(vm));
    assert_eq!(event.data.already_detached, Some(false));
    assert_eq!(
        row.response,
        Some(json!({"volume": {"id": volume, "state": "Ready"}, "detached_from": vm}))
    );
    assert!(!env.mappings().await.contains_key(&volume.to_string()));
    assert_eq!(env.sim.sim.attachment(volume), None);

    let (again, row) = run(&mut env, &cmd::detach(volume)).await;
    completed(&again, "second detach");
    assert_eq!(again.data.vm_id, None);
    assert_eq!(again.data.already_detached, Some(true));
    assert_eq!(
        row.response,
        Some(json!({"volume": {"id": volume, "state": "Ready"}, "already_detached": true}))
    );
}

/// Mutation: a `Deleted` variant whose `fill` leaves `already_absent` out, or
/// `mapping_change` that keeps the mapping of a deleted volume.
#[tokio::test]
async fn delete_detaches_first_and_a_second_delete_says_already_absent() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let vm = DEMO_VMS[0];
    let volume = env.sim.sim.seed_volume("inproc-delete", 1 << 30);
    completed(&run(&mut env, &cmd::attach(volume, vm)).await.0, "attach");

    let (event, row) = run(&mut env, &cmd::delete(volume)).await;
    completed(&event, "delete");
    assert_eq!(event.data.vm_id, Some(vm), "detached from");
    assert_eq!(event.data.already_absent, Some(false));
    assert_eq!(
        row.response,
        Some(json!({"volume": {"id": volume}, "deleted": true, "detached_from": vm}))
    );
    assert!(!env.sim.sim.volumes().iter().any(|(id, _)| *id == volume));
    assert!(!env.mappings().await.contains_key(&volume.to_string()));

    let (again, row) = run(&mut env, &cmd::delete(volume)).await;
    completed(&again, "second delete");
    assert_eq!(again.data.already_absent, Some(true));
    assert_eq!(
        row.response,
        Some(json!({"volume": {"id": volume}, "already_absent": true}))
    );
}

/// Mutation: `outcome::cancelled` without `cancelled_by` in the target's response, or a
/// `Cancelled` response without `target_type`.
#[tokio::test]
async fn cancel_ends_the_pending_target_and_records_who_cancelled_it() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    env.spawn_app().await;
    let vm = DEMO_VMS[0];
    let volume = env.sim.sim.seed_volume("inproc-cancel", 1 << 30);
    let client = env.client().await;
    // A slow attach, then a detach queued behind it on the same volume.
    let attach = cmd::attach(volume, vm);
    let attach_wait = client.publish(&attach).await.expect("attach published");
    let detach = cmd::detach(volume);
    let detach_wait = client.publish(&detach).await.expect("detach published");
    let detach_id = detach.command_id.as_str().to_owned();
    env.wait_for_operation(&detach_id, WAIT, |r| r.status == "pending")
        .await;

    let cancel = Command::cancel(detach.command_id.clone());
    let (event, row) = run(&mut env, &cancel).await;
    completed(&event, "cancel");
    assert_eq!(event.data.target.as_ref(), Some(&detach.command_id));
    assert_eq!(
        row.response,
        Some(json!({"target": detach_id, "target_type": "detach", "cancelled": true}))
    );
    let target = detach_wait.wait(WAIT).await.expect("the target's event");
    assert_eq!(target.data.status, OperationStatus::Cancelled);
    let target_row = env.operation(&detach_id).await.expect("target row");
    assert_eq!(target_row.status, "cancelled");
    assert_eq!(
        target_row.response,
        Some(json!({"cancelled_by": cancel.command_id.as_str()}))
    );
    let attached = attach_wait.wait(WAIT).await.expect("attach event");
    completed(&attached, "attach");
    attached_in_sim(&env, volume, vm).await;
}

/// Mutation: a `Reconciled` outcome whose `fill` leaves `changes` out of the event, or a
/// response other than `{"changes": [...]}`.
#[tokio::test]
async fn reconcile_records_an_attachment_made_outside_and_reports_it_in_response_and_event() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let vm = DEMO_VMS[1];
    let volume = env.sim.sim.seed_volume("inproc-reconcile", 1 << 30);
    // Attached behind the daemon's back, as another tool would.
    crate::helpers::attach_outside(&env.sim.sim, volume, vm);
    attached_in_sim(&env, volume, vm).await;

    let (event, row) = run(&mut env, &Command::reconcile(Some(vm))).await;
    completed(&event, "reconcile");
    assert_eq!(event.data.vm_id, Some(vm));
    let changes = event.data.changes.clone().expect("changes");
    assert!(
        changes
            .iter()
            .any(|c| c.volume_id == volume && c.what == ChangeKind::MappingAdded),
        "{changes:?}"
    );
    assert_eq!(row.response, Some(json!({"changes": changes})));
    let mapping = &env.mappings().await[&volume.to_string()];
    assert_eq!(mapping.vm_id, vm.to_string());

    let (again, _) = run(&mut env, &Command::reconcile(Some(vm))).await;
    assert_eq!(
        again.data.changes,
        Some(Vec::new()),
        "nothing drifted since"
    );
    env.stop_app().await;
}

/// Mutation: `Completed::snapshot_change` without the taken snapshot (the read API and the
/// `snapshots` table lose it), or a `Snapshot` response without the snapshot.
#[tokio::test]
async fn snapshot_revert_and_delete_snapshot_store_their_snapshot_in_response_event_and_table() {
    let mut env = TestEnv::with_sim(SimConfig {
        kvm_snapshot_enabled: true,
        ..SimConfig::default()
    })
    .await;
    env.spawn_app().await;
    let vm = DEMO_VMS[0];
    let volume = env.sim.sim.seed_volume("inproc-snap", 1 << 30);
    completed(&run(&mut env, &cmd::attach(volume, vm)).await.0, "attach");

    let (taken, row) = run(&mut env, &Command::snapshot(volume, None)).await;
    completed(&taken, "snapshot");
    let snapshot = taken.data.snapshot.clone().expect("the event's snapshot");
    assert_eq!(row.response, Some(json!({"snapshot": snapshot})));
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["snapshots"][0]["id"], json!(snapshot.id), "{view}");

    completed(&run(&mut env, &cmd::detach(volume)).await.0, "detach");
    let (reverted, row) = run(&mut env, &Command::revert_snapshot(volume, snapshot.id)).await;
    completed(&reverted, "revert");
    assert_eq!(
        reverted.data.snapshot.as_ref().map(|s| s.id),
        Some(snapshot.id)
    );
    assert_eq!(
        row.response.expect("response")["snapshot"]["id"],
        json!(snapshot.id)
    );

    let (deleted, row) = run(&mut env, &Command::delete_snapshot(volume, snapshot.id)).await;
    completed(&deleted, "delete_snapshot");
    assert_eq!(row.response, Some(json!({"snapshot_id": snapshot.id})));
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["snapshots"], json!([]), "{view}");
}

/// Mutation: `Completed::mapping_change` without `Resized` (the mapping keeps the old size),
/// or a `Resized` response without `previous_size`.
#[tokio::test]
async fn resize_reports_the_new_and_previous_size_and_the_mapping_follows() {
    let mut env = TestEnv::new().await;
    env.spawn_app().await;
    let vm = DEMO_VMS[1];
    let volume = env.sim.sim.seed_volume("inproc-resize", 1 << 30);
    completed(&run(&mut env, &cmd::attach(volume, vm)).await.0, "attach");
    let grow = Command::resize(volume, "2GiB".parse().expect("size"), false);
    let (event, row) = run(&mut env, &grow).await;
    completed(&event, "resize");
    let info = event.data.volume.clone().expect("the event's volume");
    assert_eq!(
        (info.size, event.data.previous_size),
        (2 << 30, Some(1 << 30))
    );
    assert_eq!(
        row.response,
        Some(json!({"volume": info, "previous_size": 1u64 << 30}))
    );
    let (_, view) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(view["mapping"]["size"], json!(2u64 << 30), "{view}");
    // A duplicate: the same event, no second resizeVolume.
    assert_eq!(env.execute(&grow).await.id, event.id);
    assert_eq!(env.sim.sim.call_count("resizeVolume"), 1);
}

/// The new commands are cancellable while pending, as the others: a snapshot queued behind a
/// slow attach on its volume is cancelled and never reaches CloudStack. Mutation: a snapshot
/// outside the volume's lane (`Action::volume_id` without it) runs at once and cannot be
/// cancelled.
#[tokio::test]
async fn a_pending_snapshot_is_cancelled_before_it_reaches_cloudstack() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(1500),
        kvm_snapshot_enabled: true,
        ..SimConfig::default()
    })
    .await;
    env.spawn_app().await;
    let volume = env.sim.sim.seed_volume("inproc-cancel-snap", 1 << 30);
    let client = env.client().await;
    let attach = client
        .publish(&cmd::attach(volume, DEMO_VMS[0]))
        .await
        .expect("attach published");
    let snapshot = Command::snapshot(volume, None);
    let snap_wait = client.publish(&snapshot).await.expect("snapshot published");
    let id = snapshot.command_id.as_str().to_owned();
    env.wait_for_operation(&id, WAIT, |r| r.status == "pending")
        .await;
    let (cancelled, _) = run(&mut env, &Command::cancel(snapshot.command_id.clone())).await;
    completed(&cancelled, "cancel");
    let target = snap_wait.wait(WAIT).await.expect("the snapshot's event");
    assert_eq!(target.event_type, "volume.snapshot.cancelled");
    completed(&attach.wait(WAIT).await.expect("attach"), "attach");
    assert_eq!(env.sim.sim.call_count("createSnapshot"), 0);
}
