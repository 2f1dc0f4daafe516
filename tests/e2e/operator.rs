//! The operator's view: the read API (docs/http.md), `cancel` and `reconcile` (docs/wire.md).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cloudstack_sim::{DEMO_VMS, SimConfig};
use schema::api::{OperationPage, OperationView, VmVolumes, VolumeView};
use schema::event::ChangeKind;
use schema::{CloudEvent, Command, CommandId, ErrorCode, OperationStatus, VmId, VolumeId};

use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);

async fn run(env: &TestEnv, command: &Command) -> CloudEvent {
    env.client()
        .await
        .publish(command)
        .await
        .expect("published")
        .wait(WAIT)
        .await
        .expect("terminal event")
}

fn volume_of(event: &CloudEvent) -> VolumeId {
    assert_eq!(
        event.data.status,
        OperationStatus::Completed,
        "{:?}",
        event.data.error
    );
    event.data.volume_id.expect("volume id")
}

/// Publishes `n` detaches of volumes nobody knows: operations that end at once with
/// `VOLUME_NOT_FOUND`.
async fn unknown_detaches(env: &TestEnv, n: usize) -> Vec<publisher::PendingCommand> {
    let client = env.client().await;
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        pending.push(
            client
                .publish(&cmd::detach(VolumeId::new_random()))
                .await
                .expect("published"),
        );
    }
    pending
}

/// The body of a 4xx: `{"error": {"code", "message"}}`, with the code expected.
fn error_body(status: u16, body: &serde_json::Value, want: u16, code: &str) -> String {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(!message.is_empty());
    message
}

#[tokio::test]
async fn the_read_api_shows_an_attached_host_volume_in_every_view() {
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    env.start_daemon().await;
    let host = env.host_vm.expect("host VM");

    let create = cmd::create("read-api-0", "1GiB");
    let volume = volume_of(&run(&env, &create).await);
    let attach = cmd::attach(volume, host);
    let attached = run(&env, &attach).await;
    volume_of(&attached);
    let device = attached
        .data
        .device_path
        .clone()
        .expect("host attach has a device");
    let name = device.trim_start_matches("/dev/").to_owned();

    // The operation list, newest first, filtered by volume.
    let (status, body) = env
        .get_json(&format!("/api/v1/operations?volume_id={volume}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let page: OperationPage = serde_json::from_value(body).expect("an operation page");
    let ids: Vec<&str> = page.items.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(
        ids,
        [attach.command_id.as_str(), create.command_id.as_str()],
        "newest first"
    );
    assert_eq!(page.next_cursor, None);

    // One operation by id.
    let (status, body) = env
        .get_json(&format!("/api/v1/operations/{}", attach.command_id))
        .await;
    assert_eq!(status, 200, "{body}");
    let op: OperationView = serde_json::from_value(body.clone()).expect("an operation");
    assert_eq!(op.status, OperationStatus::Completed);
    assert_eq!(op.volume_id, Some(volume));
    assert_eq!(op.vm_id, Some(host));
    assert_eq!(op.attempts, 1);
    assert!(op.completed_at.is_some() && op.error.is_none());
    assert_eq!(op.request["type"], "attach");
    assert_eq!(
        op.response.as_ref().expect("response")["device_path"],
        device
    );
    assert!(
        body["created_at"].as_str().expect("time").ends_with('Z'),
        "RFC 3339 UTC: {body}"
    );

    // The volume: mapping, export (off here) and last operation.
    let (status, body) = env.get_json(&format!("/api/v1/volumes/{volume}")).await;
    assert_eq!(status, 200, "{body}");
    let view: VolumeView = serde_json::from_value(body).expect("a volume view");
    let mapping = view.mapping.expect("mapped");
    assert_eq!(mapping.vm_id, host);
    assert_eq!(mapping.mode, schema::api::MappingMode::Oma);
    assert_eq!(mapping.device_path.as_deref(), Some(device.as_str()));
    assert_eq!(mapping.linux_state, "present");
    assert!(mapping.persistent_path.is_some());
    assert_eq!(view.nbd_export, None);
    assert_eq!(view.last_operation.expect("last").id, attach.command_id);

    // The VM's volumes.
    let (status, body) = env.get_json(&format!("/api/v1/vms/{host}/volumes")).await;
    assert_eq!(status, 200, "{body}");
    let vm: VmVolumes = serde_json::from_value(body).expect("a VM's volumes");
    assert_eq!(vm.items.len(), 1);
    assert_eq!(vm.items[0].volume_id, volume);

    // The device table and device → volume.
    let (status, body) = env.get_json("/api/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    let row = body
        .as_array()
        .expect("an array")
        .iter()
        .find(|d| d["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} is in the device table: {body}"));
    assert_eq!(row["volume_id"], volume.to_string());
    assert_eq!(row["serial"], volume.disk_serial());
    let (status, body) = env
        .get_json(&format!("/api/v1/devices/{name}/volume"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["volume_id"], volume.to_string());

    let (status, body) = env.get_json("/api/v1/exports").await;
    assert_eq!((status, body), (200, serde_json::json!({"items": []})));

    // Bad input is a 400 naming it; unknown ids are 404s.
    for path in [
        "/api/v1/operations/not%20an%20id",
        "/api/v1/volumes/nope",
        "/api/v1/vms/123/volumes",
        "/api/v1/devices/..%2Fetc/volume",
        "/api/v1/operations?limit=0",
        "/api/v1/operations?limit=501",
        "/api/v1/operations?status=done",
        "/api/v1/operations?type=grow",
        "/api/v1/operations?cursor=garbage",
        "/api/v1/operations?volume=x",
    ] {
        let (status, body) = env.get_json(path).await;
        error_body(status, &body, 400, "BAD_REQUEST");
    }
    let unknown = VolumeId::new_random();
    for path in [
        "/api/v1/operations/no-such-op".to_owned(),
        format!("/api/v1/volumes/{unknown}"),
        "/api/v1/devices/vdzz/volume".to_owned(),
    ] {
        let (status, body) = env.get_json(&path).await;
        let message = error_body(status, &body, 404, "NOT_FOUND");
        assert!(
            message.contains("no-such-op")
                || message.contains(&unknown.to_string())
                || message.contains("vdzz"),
            "the message names the id: {message}"
        );
    }
    // A VM with nothing mapped is not an error: an empty list.
    let (status, body) = env
        .get_json(&format!("/api/v1/vms/{}/volumes", VmId::new_random()))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["items"], serde_json::json!([]));
}

#[tokio::test]
async fn cursors_page_through_120_operations_without_gaps_or_repeats() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    // Detaches of unknown volumes: 120 operations that end at once (VOLUME_NOT_FOUND).
    let pending = unknown_detaches(&env, 120).await;
    let mut want = HashSet::new();
    for p in pending {
        let event = p.wait(WAIT).await.expect("event");
        want.insert(event.data.operation_id.as_str().to_owned());
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/api/v1/operations?limit=7&type=detach".to_owned(),
            Some(c) => format!("/api/v1/operations?limit=7&type=detach&cursor={c}"),
        };
        let (status, body) = env.get_json(&path).await;
        assert_eq!(status, 200, "{body}");
        let page: OperationPage = serde_json::from_value(body).expect("page");
        assert!(page.items.len() <= 7);
        seen.extend(
            page.items
                .iter()
                .map(|o| (o.created_at, o.id.as_str().to_owned())),
        );
        pages += 1;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 100, "the cursor never ends");
    }
    assert_eq!(pages, 18, "120 operations in pages of 7");
    let ids: HashSet<String> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), seen.len(), "no operation appears twice");
    assert_eq!(ids, want, "every operation appears");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first across pages");

    let (status, body) = env
        .get_json("/api/v1/operations?status=failed&limit=500")
        .await;
    assert_eq!(status, 200);
    let page: OperationPage = serde_json::from_value(body).expect("page");
    assert_eq!(page.items.len(), 120);
    assert!(
        page.items
            .iter()
            .all(|o| { o.error.as_ref().map(|e| e.code) == Some(ErrorCode::VolumeNotFound) })
    );
}

#[tokio::test]
async fn cancel_ends_a_pending_operation_before_cloudstack_and_refuses_an_executing_one() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(2500),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = volume_of(&run(&env, &cmd::create("cancel-0", "1GiB")).await);
    let client = env.client().await;
    let detaches_before = env.sim.sim.call_count("detachVolume");

    // A slow attach, then a detach queued behind it on the same volume.
    let attach = cmd::attach(volume, vm);
    let attach_wait = client.publish(&attach).await.expect("attach published");
    let detach = cmd::detach(volume);
    let detach_wait = client.publish(&detach).await.expect("detach published");
    let attach_id = attach.command_id.as_str().to_owned();
    env.wait_for_operation(&attach_id, WAIT, |r| r.status == "executing")
        .await;
    let detach_id = detach.command_id.as_str().to_owned();
    // Accepted, and waiting behind the attach on its volume.
    env.wait_for_operation(&detach_id, WAIT, |r| r.status == "pending")
        .await;

    let cancel = Command::cancel(detach.command_id.clone());
    let cancelled = run(&env, &cancel).await;
    assert_eq!(
        cancelled.event_type, "volume.cancel.completed",
        "{:?}",
        cancelled.data.error
    );
    assert_eq!(cancelled.data.target.as_ref(), Some(&detach.command_id));
    let target = detach_wait.wait(WAIT).await.expect("the target's event");
    assert_eq!(target.event_type, "volume.detach.cancelled");
    assert_eq!(target.data.status, OperationStatus::Cancelled);
    assert!(target.data.error.is_none());

    // The attach is executing: its cancel fails and changes nothing.
    let refused = run(&env, &Command::cancel(attach.command_id.clone())).await;
    assert_eq!(refused.event_type, "volume.cancel.failed");
    let error = refused.data.error.clone().expect("error");
    assert_eq!(error.code, ErrorCode::VolumeInUse, "{}", error.message);
    assert!(error.message.contains(&attach_id), "{}", error.message);
    assert_eq!(refused.data.target.as_ref(), Some(&attach.command_id));
    let attached = attach_wait.wait(WAIT).await.expect("attach event");
    assert_eq!(attached.event_type, "volume.attach.completed");

    // Unknown and ended targets fail INVALID_COMMAND.
    for target in [
        CommandId::parse("no-such-op").expect("id"),
        detach.command_id.clone(),
    ] {
        let refused = run(&env, &Command::cancel(target)).await;
        assert_eq!(
            refused.data.error.expect("error").code,
            ErrorCode::InvalidCommand
        );
    }

    // The cancelled detach never reached CloudStack, and the volume stays attached.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.sim.sim.call_count("detachVolume"), detaches_before);
    assert_eq!(env.sim.sim.attachment(volume).map(|a| a.0), Some(vm));
    let statuses = env.statuses().await;
    assert_eq!(statuses[&detach_id], "cancelled");
    assert_eq!(statuses[&attach_id], "completed");
    let (_, body) = env
        .get_json(&format!("/api/v1/operations/{detach_id}"))
        .await;
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["response"]["cancelled_by"], cancel.command_id.as_str());
}

/// Waits until the simulator shows `volume` on `vm` (or on none).
pub(crate) async fn sim_settles(env: &TestEnv, volume: VolumeId, vm: Option<VmId>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.sim.sim.attachment(volume).map(|a| a.0) != vm {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the simulator's job did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls the simulator logged of commands that change something.
fn mutating_calls(sim: &cloudstack_sim::Sim) -> usize {
    sim.calls()
        .iter()
        .filter(|c| cloudstack_sim::faults::is_mutating(&c.command.to_lowercase()))
        .count()
}

pub(crate) fn by_id(volume: VolumeId) -> HashMap<String, String> {
    HashMap::from([("id".to_owned(), volume.to_string())])
}

#[tokio::test]
async fn reconcile_repairs_mappings_changed_behind_the_daemons_back_and_then_reports_none() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let (vm, other) = (DEMO_VMS[0], DEMO_VMS[1]);
    let gone = volume_of(&run(&env, &cmd::create("reconcile-gone", "1GiB")).await);
    let moved = volume_of(&run(&env, &cmd::create("reconcile-moved", "1GiB")).await);
    for v in [gone, moved] {
        volume_of(&run(&env, &cmd::attach(v, vm)).await);
    }
    assert_eq!(env.mappings().await.len(), 2);

    // Behind the daemon's back: one volume detached, one moved to another VM.
    let sim = env.sim.sim.clone();
    sim.detach_volume(&by_id(gone))
        .expect("detach in the simulator");
    sim.detach_volume(&by_id(moved))
        .expect("detach in the simulator");
    sim_settles(&env, gone, None).await;
    sim_settles(&env, moved, None).await;
    let mut attach = by_id(moved);
    attach.insert("virtualmachineid".into(), other.to_string());
    sim.attach_volume(&attach).expect("attach in the simulator");
    sim_settles(&env, moved, Some(other)).await;
    let mutating_before = mutating_calls(&sim);

    let first = run(&env, &Command::reconcile(None)).await;
    assert_eq!(
        first.event_type, "volume.reconcile.completed",
        "{:?}",
        first.data.error
    );
    let changes = first.data.changes.clone().expect("changes");
    assert_eq!(changes.len(), 2, "{changes:?}");
    let removed = changes.iter().find(|c| c.volume_id == gone).expect("gone");
    assert_eq!(removed.what, ChangeKind::MappingRemoved);
    assert_eq!(removed.before.as_deref(), Some(vm.to_string().as_str()));
    assert_eq!(removed.after, None);
    let moved_change = changes
        .iter()
        .find(|c| c.volume_id == moved)
        .expect("moved");
    assert_eq!(moved_change.what, ChangeKind::MappingMoved);
    assert_eq!(
        moved_change.before.as_deref(),
        Some(vm.to_string().as_str())
    );
    assert_eq!(
        moved_change.after.as_deref(),
        Some(other.to_string().as_str())
    );

    let mappings = env.mappings().await;
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert_eq!(mappings[&moved.to_string()].vm_id, other.to_string());

    let second = run(&env, &Command::reconcile(None)).await;
    assert_eq!(second.data.changes, Some(vec![]), "nothing drifted since");
    let one_vm = run(&env, &Command::reconcile(Some(other))).await;
    assert_eq!(one_vm.data.changes, Some(vec![]));
    assert_eq!(one_vm.data.vm_id, Some(other));

    let mutating_after = mutating_calls(&sim);
    assert_eq!(
        mutating_after, mutating_before,
        "reconcile calls no mutating API"
    );
    assert!(sim.call_count("listVolumes") > 0);
}

/// Polls `/ready` until `check` holds for its body; returns (status, body).
async fn ready_until(
    env: &TestEnv,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = env.get_json("/ready").await;
        if check(&body) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never showed {what}; last {status} {body}\n{}",
            env.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn component<'a>(body: &'a serde_json::Value, name: &str) -> &'a str {
    body["components"][name].as_str().unwrap_or("")
}

#[tokio::test]
async fn self_checks_show_cloudstack_and_the_host_vm_ok_then_unauthorized_keys_and_an_unreadable_monitor()
 {
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    env.extra_env
        .push(("SELF_CHECK_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;

    let (status, body) = ready_until(&env, "cloudstack up, host_vm ok", |b| {
        component(b, "cloudstack") == "up" && component(b, "host_vm") == "ok"
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(component(&body, "device_monitor"), "running");
    assert_eq!(component(&body, "device_monitor_mode"), "polling");

    // Keys rotated in CloudStack behind the daemon's back.
    let (key, secret) = env.sim.sim.keys();
    env.sim.sim.set_keys("rotated-key", "rotated-secret");
    let (status, body) = ready_until(&env, "cloudstack unauthorized", |b| {
        component(b, "cloudstack") == "unauthorized"
    })
    .await;
    assert_eq!(status, 200, "reported, not gating: {body}");
    assert_eq!(component(&body, "host_vm"), "unknown");
    env.sim.sim.set_keys(&key, &secret);
    ready_until(&env, "cloudstack up again", |b| {
        component(b, "cloudstack") == "up"
    })
    .await;

    // `$SYSFS_ROOT/block` unreadable: not an empty scan that says "running".
    let block = env.sysfs.join("block");
    let aside = env.sysfs.join("block.aside");
    std::fs::rename(&block, &aside).expect("move block away");
    std::fs::write(&block, "not a directory").expect("a file in its place");
    let (status, _) = ready_until(&env, "device_monitor unreadable", |b| {
        component(b, "device_monitor") == "unreadable"
    })
    .await;
    assert_eq!(status, 503);
    std::fs::remove_file(&block).expect("remove the file");
    std::fs::rename(&aside, &block).expect("put block back");
    let (status, _) = ready_until(&env, "device_monitor running", |b| {
        component(b, "device_monitor") == "running"
    })
    .await;
    assert_eq!(status, 200);
    assert!(
        env.daemon_log().contains("unreadable"),
        "the unreadable directory is logged"
    );
}

#[tokio::test]
async fn a_wrong_host_vm_id_shows_a_mismatch_and_the_log_names_both_ids() {
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    let wrong = DEMO_VMS[0];
    env.extra_env.push(("HOST_VM_ID".into(), wrong.to_string()));
    env.extra_env
        .push(("SELF_CHECK_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;
    let (status, _) = ready_until(&env, "host_vm mismatch", |b| {
        component(b, "host_vm") == "mismatch"
    })
    .await;
    assert_eq!(status, 200, "reported, not gating");
    let root = env
        .sim
        .sim
        .root_volume(wrong)
        .expect("the wrong VM's root disk");
    let log = env.daemon_log();
    let line = log
        .lines()
        .find(|l| l.contains("host VM mismatch"))
        .unwrap_or_else(|| panic!("the mismatch is logged as an error:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&wrong.to_string()),
        "names the host VM id: {line}"
    );
    assert!(
        line.contains(&root.to_string()),
        "names its root volume: {line}"
    );
}

#[tokio::test]
async fn an_unreachable_cloudstack_shows_down() {
    let mut env = TestEnv::new().await;
    let proxy = crate::helpers::TcpProxy::start(env.sim.addr).await;
    env.extra_env.push((
        "CLOUDSTACK_API_URL".into(),
        format!("http://{}/client/api", proxy.addr),
    ));
    env.extra_env
        .push(("SELF_CHECK_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;
    ready_until(&env, "cloudstack up", |b| {
        component(b, "cloudstack") == "up"
    })
    .await;
    proxy.cut();
    let (status, body) = ready_until(&env, "cloudstack down", |b| {
        component(b, "cloudstack") == "down"
    })
    .await;
    assert_eq!(status, 200, "reported, not gating: {body}");
    assert_eq!(component(&body, "host_vm"), "unknown");
    proxy.restore();
    ready_until(&env, "cloudstack up again", |b| {
        component(b, "cloudstack") == "up"
    })
    .await;
}

/// Rows written as if long ago: `n` ended operations and `n` published outbox rows, plus one
/// old pending operation, which retention must keep (that an old unpublished outbox row stays
/// is `db::outbox`'s unit test: here the relay would publish it).
async fn back_dated_rows(pool: &sqlx::MySqlPool, n: usize) {
    let old_op = |i: usize, status: &str| {
        format!(
            "('old-{status}-{i}', 'detach', '{status}', '{{}}', NOW(3) - INTERVAL 3 DAY, \
             NOW(3) - INTERVAL 3 DAY, {})",
            if status == "pending" {
                "NULL"
            } else {
                "NOW(3) - INTERVAL 2 DAY"
            }
        )
    };
    let mut rows: Vec<String> = (0..n).map(|i| old_op(i, "failed")).collect();
    rows.push(old_op(0, "pending"));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO volume_operations (id, type, status, request, created_at, updated_at, completed_at) VALUES {}",
        rows.join(", ")
    )))
    .execute(pool)
    .await
    .expect("old operations");
    let outbox_row = |i: usize, published: &'static str| {
        format!(
            "(UUID(), 'x.events', 'volume.detach.failed', '{{\"old\": {i}}}', \
             NOW(3) - INTERVAL 3 HOUR, {published})"
        )
    };
    let rows: Vec<String> = (0..n)
        .map(|i| outbox_row(i, "NOW(3) - INTERVAL 2 HOUR"))
        .collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO outbox (event_id, exchange, routing_key, payload, created_at, published_at) VALUES {}",
        rows.join(", ")
    )))
    .execute(pool)
    .await
    .expect("old outbox rows");
}

async fn count(pool: &sqlx::MySqlPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn retention_deletes_old_rows_in_batches_while_commands_keep_flowing() {
    let mut env = TestEnv::new().await;
    for (k, v) in [
        ("RETENTION_INTERVAL_S", "1"),
        ("OUTBOX_RETENTION_H", "1"),
        ("OPERATIONS_RETENTION_D", "1"),
    ] {
        env.extra_env.push((k.into(), v.into()));
    }
    env.start_daemon().await;
    let pool = env.db().await;
    // An operation whose outbox row will be swept: a duplicate must still get its event.
    let first = cmd::detach(VolumeId::new_random());
    let first_event = run(&env, &first).await;
    env.outbox_once_published(WAIT).await;
    sqlx::query("UPDATE outbox SET published_at = NOW(3) - INTERVAL 2 HOUR")
        .execute(&pool)
        .await
        .expect("back-date the first event");

    back_dated_rows(&pool, 1600).await;
    // Commands flow while the sweep deletes.
    let pending = unknown_detaches(&env, 30).await;
    for p in pending {
        let e = p.wait(WAIT).await.expect("every command still ends");
        assert_eq!(e.data.error.expect("error").code, ErrorCode::VolumeNotFound);
    }

    let deadline = tokio::time::Instant::now() + WAIT;
    while count(
        &pool,
        "SELECT COUNT(*) FROM volume_operations WHERE id LIKE 'old-failed-%'",
    )
    .await
        > 0
        || count(
            &pool,
            "SELECT COUNT(*) FROM outbox WHERE published_at < NOW(3) - INTERVAL 1 HOUR",
        )
        .await
            > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Kept: the old pending operation, everything recent.
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM volume_operations WHERE id = 'old-pending-0'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM volume_operations WHERE id NOT LIKE 'old-%'"
        )
        .await,
        31
    );

    // In batches of 500: at least four for 1,601 outbox rows.
    let log = env.daemon_log();
    let batches = log
        .lines()
        .filter(|l| l.contains("retention: batch deleted") && l.contains("\"table\":\"outbox\""))
        .filter(|l| !l.contains("\"rows\":0"))
        .count();
    assert!(batches >= 4, "{batches} outbox batches");
    let metrics = crate::helpers::get_text(env.http_addr, "/metrics").await;
    assert!(
        metrics.contains("volume_daemon_retention_deleted_total{table=\"outbox\"} 1601"),
        "{metrics}"
    );
    assert!(
        metrics.contains("volume_daemon_retention_deleted_total{table=\"volume_operations\"} 1600")
    );

    // The swept event is still the answer to a duplicate of its command.
    let again = run(&env, &first).await;
    assert_eq!(
        again.id, first_event.id,
        "same event id after its outbox row was swept"
    );
}

async fn volumectl(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    crate::helpers::run_volumectl(env, args).await
}

#[tokio::test]
async fn volumectl_queries_the_running_daemon_as_tables_and_json_and_sends_cancel_and_reconcile() {
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    env.start_daemon().await;
    let host = env.host_vm.expect("host VM");
    let volume = volume_of(&run(&env, &cmd::create("volumectl-0", "1GiB")).await);
    let attach = cmd::attach(volume, host);
    let attached = run(&env, &attach).await;
    let device = attached.data.device_path.clone().expect("device");
    let (op, vol, vm) = (
        attach.command_id.to_string(),
        volume.to_string(),
        host.to_string(),
    );

    // get: a table of fields, or the API's JSON.
    let (code, out, err) = volumectl(&env, &["get", &op]).await;
    assert_eq!(code, 0, "{err}");
    let status_line = out.lines().find(|l| l.starts_with("status")).expect(&out);
    assert!(status_line.ends_with("completed"), "{out}");
    assert!(
        out.lines().next().expect("header").starts_with("FIELD"),
        "{out}"
    );
    let (code, out, _) = volumectl(&env, &["get", &op, "--json"]).await;
    assert_eq!(code, 0);
    let view: OperationView = serde_json::from_str(&out).expect("the API's JSON");
    assert_eq!(view.id, attach.command_id);

    // ops: aligned columns, filters, limit, one JSON object per line.
    let (code, out, err) = volumectl(&env, &["ops", "--volume", &vol]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "header + attach + create:\n{out}");
    let status_col = lines[0].find("STATUS").expect("STATUS column");
    for l in &lines[1..] {
        assert_eq!(
            &l[status_col..status_col + 9],
            "completed",
            "aligned:\n{out}"
        );
    }
    assert!(lines[1].starts_with(&op), "newest first:\n{out}");
    let (_, out, _) = volumectl(&env, &["ops", "--type", "create", "--json"]).await;
    let ops: Vec<OperationView> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(ops.len(), 1);
    let (_, out, _) = volumectl(&env, &["ops", "--limit", "1", "--json"]).await;
    assert_eq!(out.lines().count(), 1);

    // volume, vm, devices.
    let (code, out, _) = volumectl(&env, &["volume", &vol]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&device) && out.contains("last operation"),
        "{out}"
    );
    let (_, out, _) = volumectl(&env, &["volume", &vol, "--json"]).await;
    let view: VolumeView = serde_json::from_str(&out).expect("JSON");
    assert_eq!(view.volume_id, volume);
    let (code, out, _) = volumectl(&env, &["vm", &vm]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines().nth(1).expect("a row").starts_with(&vol),
        "{out}"
    );
    let (_, out, _) = volumectl(&env, &["vm", &vm, "--json"]).await;
    let _: VmVolumes = serde_json::from_str(&out).expect("JSON");
    let (code, out, _) = volumectl(&env, &["devices"]).await;
    assert_eq!(code, 0);
    let name = device.trim_start_matches("/dev/");
    let row = out.lines().find(|l| l.starts_with(name)).expect(&out);
    assert!(row.ends_with(&vol), "{out}");
    let (_, out, _) = volumectl(&env, &["devices", "--json"]).await;
    let devices: Vec<schema::api::DeviceView> = serde_json::from_str(&out).expect("JSON");
    assert!(devices.iter().any(|d| d.volume_id == Some(volume)));

    // Unknown ids exit 1 with the daemon's message; an unreachable API exits 5.
    let (code, _, err) = volumectl(&env, &["get", "no-such-op"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no-such-op"), "{err}");
    let (code, _, err) = volumectl(&env, &["devices", "--api-url", "http://127.0.0.1:9"]).await;
    assert_eq!(code, 5);
    assert!(err.contains("cannot reach"), "{err}");

    // cancel and reconcile are commands.
    let (code, out, _) = volumectl(&env, &["cancel", &op, "--wait"]).await;
    assert_eq!(code, 1, "the attach already ended: the cancel fails\n{out}");
    assert!(
        out.contains("volume.cancel.failed") && out.contains("INVALID_COMMAND"),
        "{out}"
    );
    let (code, out, err) = volumectl(&env, &["reconcile", "--vm", &vm, "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("volume.reconcile.completed") && out.contains("0 change(s)"),
        "{out}"
    );
}

/// The committed OpenAPI document, checked by `openapi-spec-validator` (Python, installed by
/// `scripts/test`), which must also refuse a broken copy.
#[tokio::test]
async fn the_openapi_document_validates_and_describes_the_served_responses() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("openapi.json")).expect("JSON");
    let validate = |document: &serde_json::Value| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(sys.stdin))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(document.to_string().as_bytes())?;
                child.wait_with_output()
            })
            .expect("python3 runs (scripts/test installs openapi-spec-validator)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, why) = validate(&doc);
    assert!(ok, "openapi.json does not validate: {why}");
    let mut broken = doc.clone();
    broken["paths"]["/api/v1/volumes/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"] = serde_json::json!({"$ref": "#/components/schemas/NoSuchSchema"});
    assert!(
        !validate(&broken).0,
        "the validator refuses a dangling reference"
    );

    // The served bodies match the document's schemas.
    let mut env = TestEnv::with_host_vm(SimConfig::default()).await;
    env.start_daemon().await;
    let host = env.host_vm.expect("host VM");
    let create = cmd::create("openapi-0", "1GiB");
    let volume = volume_of(&run(&env, &create).await);
    let attached = run(&env, &cmd::attach(volume, host)).await;
    let device = attached.data.device_path.expect("device");
    let failed = run(&env, &cmd::detach(VolumeId::new_random())).await;
    let schema_of = |path: &str, status: &str| {
        let mut schema =
            doc["paths"][path]["get"]["responses"][status]["content"]["application/json"]["schema"]
                .clone();
        schema["components"] = doc["components"].clone();
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
        jsonschema::validator_for(&schema).expect("a schema")
    };
    let name = device.trim_start_matches("/dev/");
    let checks = [
        (
            "/api/v1/operations/{id}",
            format!("/api/v1/operations/{}", create.command_id),
            "200",
        ),
        (
            "/api/v1/operations/{id}",
            format!("/api/v1/operations/{}", failed.data.operation_id),
            "200",
        ),
        (
            "/api/v1/operations/{id}",
            "/api/v1/operations/nope".to_owned(),
            "404",
        ),
        (
            "/api/v1/operations",
            "/api/v1/operations?limit=2".to_owned(),
            "200",
        ),
        (
            "/api/v1/operations",
            "/api/v1/operations?limit=x".to_owned(),
            "400",
        ),
        (
            "/api/v1/volumes/{id}",
            format!("/api/v1/volumes/{volume}"),
            "200",
        ),
        (
            "/api/v1/vms/{id}/volumes",
            format!("/api/v1/vms/{host}/volumes"),
            "200",
        ),
        ("/api/v1/devices", "/api/v1/devices".to_owned(), "200"),
        (
            "/api/v1/devices/{name}/volume",
            format!("/api/v1/devices/{name}/volume"),
            "200",
        ),
        ("/api/v1/exports", "/api/v1/exports".to_owned(), "200"),
    ];
    for (template, path, status) in checks {
        let (code, body) = env.get_json(&path).await;
        assert_eq!(code.to_string(), status, "{path}: {body}");
        let validator = schema_of(template, status);
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{path} does not match the document: {errors:?}\n{body}"
        );
    }
    // The daemon serves the committed document, and every operation has an id.
    let (code, served) = env.get_json("/api/v1/openapi.json").await;
    assert_eq!(
        (code, &served),
        (200, &doc),
        "the daemon serves openapi.json as committed"
    );
    let ids: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .filter_map(|p| p["get"]["operationId"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        doc["paths"].as_object().expect("paths").len(),
        "{ids:?}"
    );
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        ids.len(),
        "unique: {ids:?}"
    );
    // The schemas are not vacuous: a wrong body is refused.
    let validator = schema_of("/api/v1/volumes/{id}", "200");
    assert!(!validator.is_valid(&serde_json::json!({"volume_id": 7})));
}

#[tokio::test]
async fn the_periodic_reconcile_repairs_drift_and_counts_it_without_publishing_an_event() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("RECONCILE_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let volume = volume_of(&run(&env, &cmd::create("periodic-0", "1GiB")).await);
    volume_of(&run(&env, &cmd::attach(volume, vm)).await);
    let mut tap = crate::helpers::EventTap::new(&env.prefix).await;
    env.sim
        .sim
        .detach_volume(&by_id(volume))
        .expect("detach behind the daemon's back");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !env.mappings().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the periodic reconcile did not remove the mapping"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = crate::helpers::get_text(env.http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"volume_daemon_reconcile_changes_total{what="mapping_removed"} 1"#),
        "{metrics}"
    );
    assert!(
        tap.next(Duration::from_secs(2)).await.is_none(),
        "a periodic reconcile publishes no event"
    );
}

/// The libfaketime library of this machine (scripts/test installs Debian's `faketime`).
fn libfaketime() -> std::path::PathBuf {
    let found = glob::glob("/usr/lib/*/faketime/libfaketime.so.1")
        .expect("pattern")
        .flatten()
        .next();
    found.expect("libfaketime (scripts/test installs the faketime package)")
}

/// docs/wire.md (processing rule 2) holds as long as the database lives: an ended operation swept by
/// retention (once by age, once by a daemon whose clock runs 100 days ahead), then a duplicate
/// of its command: no second CloudStack call, and the original event id again.
#[tokio::test]
async fn a_duplicate_after_retention_swept_its_operation_is_not_executed_again() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("RETENTION_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;
    let pool = env.db().await;
    let aged = cmd::create("swept-by-age", "1GiB");
    let ahead = cmd::create("swept-by-a-clock-ahead", "1GiB");
    let aged_event = run(&env, &aged).await;
    let ahead_event = run(&env, &ahead).await;
    assert_eq!(env.sim.sim.call_count("createVolume"), 2);

    // By age: ended 100 days ago as far as the table says.
    sqlx::query(
        "UPDATE volume_operations SET completed_at = NOW(3) - INTERVAL 100 DAY WHERE id = ?",
    )
    .bind(aged.command_id.as_str())
    .execute(&pool)
    .await
    .expect("back-date");
    let gone = |id: String| {
        let pool = pool.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM volume_operations WHERE id = ?")
                        .bind(&id)
                        .fetch_one(&pool)
                        .await
                        .expect("count");
                if n == 0 {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "{id} never swept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    gone(aged.command_id.as_str().to_owned()).await;

    // By a clock 100 days ahead (realtime only: timers run on the monotonic clock).
    env.stop_daemon().await;
    env.extra_env
        .push(("LD_PRELOAD".into(), libfaketime().display().to_string()));
    env.extra_env.push(("FAKETIME".into(), "+100d".into()));
    env.extra_env
        .push(("DONT_FAKE_MONOTONIC".into(), "1".into()));
    env.start_daemon().await;
    gone(ahead.command_id.as_str().to_owned()).await;
    env.stop_daemon().await;
    env.extra_env
        .retain(|(k, _)| !["LD_PRELOAD", "FAKETIME", "DONT_FAKE_MONOTONIC"].contains(&k.as_str()));
    env.start_daemon().await;

    for (command, first) in [(&aged, &aged_event), (&ahead, &ahead_event)] {
        let again = run(&env, command).await;
        assert_eq!(again.id, first.id, "the original event, again");
        assert_eq!(again.data.volume_id, first.data.volume_id);
    }
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        2,
        "no second createVolume"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volume_operations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "no operation made by the duplicates");
}
