//! The volume lifecycle against the simulator: create → attach → detach → delete, desired-state
//! retries, error classification, retries that honour CloudStack's delays, reconciliation after
//! a lost answer, and credentials rotated in `ossea_configs`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cloudstack_sim::{DEMO_VMS, Faults, SimConfig};
use schema::{CloudEvent, Command, ErrorCode, OperationStatus, VolumeId};

use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);

async fn run(env: &TestEnv, command: &Command) -> CloudEvent {
    let client = env.client().await;
    client
        .publish(command)
        .await
        .expect("published")
        .wait(WAIT)
        .await
        .expect("terminal event")
}

fn completed(event: &CloudEvent, op: &str) {
    assert_eq!(
        event.event_type,
        format!("volume.{op}.completed"),
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.status, OperationStatus::Completed);
    assert!(event.data.error.is_none());
}

fn failed(event: &CloudEvent, code: ErrorCode) -> schema::EventError {
    assert_eq!(event.data.status, OperationStatus::Failed, "{event:?}");
    let error = event
        .data
        .error
        .clone()
        .expect("failed events carry an error");
    assert_eq!(error.code, code, "{}", error.message);
    error
}

#[tokio::test]
async fn create_attach_detach_delete_each_complete_with_their_fields() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];

    let created = run(&env, &cmd::create("lifecycle-0", "2GiB")).await;
    completed(&created, "create");
    let volume = created.data.volume_id.expect("new volume id");

    let attached = run(&env, &cmd::attach(volume, vm)).await;
    completed(&attached, "attach");
    assert_eq!(attached.data.volume_id, Some(volume));
    assert_eq!(attached.data.vm_id, Some(vm));
    assert_eq!(attached.data.mode, Some(schema::event::AttachMode::Remote));
    assert_eq!(
        attached.data.device_path, None,
        "remote attachments have no device path"
    );
    assert_eq!(attached.data.by_id_path, None);
    assert_eq!(env.sim.sim.attachment(volume).map(|a| a.0), Some(vm));
    let mappings = env.mappings().await;
    let m = &mappings[&volume.to_string()];
    assert_eq!(
        (
            m.mode.as_str(),
            m.device_path.as_deref(),
            m.cloudstack_state.as_str()
        ),
        ("failover", None, "attached")
    );

    let detached = run(&env, &cmd::detach(volume)).await;
    completed(&detached, "detach");
    assert_eq!(detached.data.vm_id, Some(vm), "the VM it was detached from");
    assert_eq!(detached.data.already_detached, Some(false));
    let row = env
        .operation(detached.data.command_id.as_str())
        .await
        .expect("row");
    assert_eq!(
        row.vm_id,
        Some(vm.to_string()),
        "the detach row records the VM too"
    );
    assert_eq!(env.sim.sim.attachment(volume), None);
    assert!(
        env.mappings().await.is_empty(),
        "a detach removes the mapping"
    );

    let deleted = run(&env, &cmd::delete(volume)).await;
    completed(&deleted, "delete");
    assert_eq!(deleted.data.already_absent, Some(false));
    assert_eq!(env.sim.sim.volume_count(), 0);
}

#[tokio::test]
async fn desired_state_retries_are_safe() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let (vm, other) = (DEMO_VMS[0], DEMO_VMS[1]);
    let volume = env.sim.sim.seed_volume("desired", 1 << 30);

    completed(&run(&env, &cmd::attach(volume, vm)).await, "attach");
    // Attached to that VM already: completes without a second attachVolume.
    let again = run(&env, &cmd::attach(volume, vm)).await;
    completed(&again, "attach");
    assert_eq!(env.sim.sim.call_count("attachVolume"), 1);
    // Attached to another VM: VOLUME_IN_USE, no call.
    let elsewhere = run(&env, &cmd::attach(volume, other)).await;
    let error = failed(&elsewhere, ErrorCode::VolumeInUse);
    assert!(error.message.contains(&vm.to_string()), "{}", error.message);
    assert_eq!(env.sim.sim.call_count("attachVolume"), 1);

    // Deleting an attached volume detaches it first.
    let deleted = run(&env, &cmd::delete(volume)).await;
    completed(&deleted, "delete");
    assert_eq!(deleted.data.vm_id, Some(vm), "detached from the VM first");
    let row = env
        .operation(deleted.data.command_id.as_str())
        .await
        .expect("row");
    assert_eq!(
        row.vm_id,
        Some(vm.to_string()),
        "the delete row records the VM too"
    );
    assert_eq!(env.sim.sim.call_count("detachVolume"), 1);
    assert_eq!(env.sim.sim.volume_count(), 0);

    // Detaching a detached volume, deleting an absent one.
    let seeded = env.sim.sim.seed_volume("loose", 1 << 30);
    let detached = run(&env, &cmd::detach(seeded)).await;
    completed(&detached, "detach");
    assert_eq!(detached.data.already_detached, Some(true));
    assert_eq!(
        env.sim.sim.call_count("detachVolume"),
        1,
        "no call for a detached volume"
    );
    let gone = run(&env, &cmd::delete(volume)).await;
    completed(&gone, "delete");
    assert_eq!(gone.data.already_absent, Some(true));

    // Attaching or detaching a volume CloudStack does not know.
    let ghost = VolumeId::new_random();
    failed(
        &run(&env, &cmd::attach(ghost, vm)).await,
        ErrorCode::VolumeNotFound,
    );
    failed(
        &run(&env, &cmd::detach(ghost)).await,
        ErrorCode::VolumeNotFound,
    );
}

#[tokio::test]
async fn fifty_creates_survive_throttling_and_outages_and_honour_retry_after() {
    let mut faults = Faults {
        retry_after_ms: 300,
        ..Faults::default()
    };
    faults.error_rates = BTreeMap::from([(429, 0.15), (503, 0.15), (530, 0.10)]);
    let mut env = TestEnv::with_sim(SimConfig {
        faults,
        job_latency: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let client = env.client().await;

    let mut pending = Vec::new();
    for i in 0..50 {
        pending.push(
            client
                .publish(&cmd::create(&format!("throttled-{i}"), "1GiB"))
                .await
                .expect("published"),
        );
    }
    for p in pending {
        let event = p.wait(Duration::from_secs(120)).await.expect("event");
        completed(&event, "create");
    }

    let calls = env.sim.sim.calls();
    let by_status = |code| calls.iter().filter(|c| c.status == code).count();
    assert!(
        by_status(429) > 0 && by_status(503) > 0 && by_status(530) > 0,
        "faults were injected"
    );
    // One volume per command: a rejected createVolume had no effect and was re-sent.
    let mut names: Vec<String> = env.sim.sim.volumes().into_iter().map(|(_, n)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!((names.len(), env.sim.sim.volume_count()), (50, 50));

    // Every 429 was followed by a wait of at least the delay it named before the same request
    // (same createVolume name, or same job) came again.
    // Only calls that identify their request can be paired: createVolume by name, job polls by id.
    let key = |c: &cloudstack_sim::CallRecord| match c.command.as_str() {
        "createVolume" => c.params.get("name").map(|n| format!("create:{n}")),
        "queryAsyncJobResult" => c.params.get("jobid").map(|j| format!("job:{j}")),
        _ => None,
    };
    let mut last: HashMap<String, &cloudstack_sim::CallRecord> = HashMap::new();
    let mut checked = 0;
    for call in &calls {
        let Some(k) = key(call) else { continue };
        if let Some(prev) = last.get(&k)
            && prev.status == 429
        {
            let gap = call.at - prev.answered_at;
            assert!(
                gap >= chrono::Duration::milliseconds(300),
                "{k}: retried {gap:?} after a 429 asking for 300 ms"
            );
            checked += 1;
        }
        last.insert(k, call);
    }
    assert!(checked > 0, "some 429s were retried");
    let metrics = crate::helpers::get_text(env.http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"volume_daemon_cloudstack_retries_total{command="createVolume"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"result="429"}"#), "{metrics}");
}

#[tokio::test]
async fn a_failed_job_reports_cloudstacks_errortext() {
    let mut env = TestEnv::with_sim(SimConfig {
        faults: Faults {
            job_failure_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let event = run(&env, &cmd::create("doomed", "1GiB")).await;
    let error = failed(&event, ErrorCode::CloudstackJobFailed);
    assert!(
        error.message.contains("injected job failure"),
        "{}",
        error.message
    );
    assert_eq!(error.cloudstack_error_code, Some(530));
}

#[tokio::test]
async fn a_connection_dropped_after_createvolume_leaves_exactly_one_volume() {
    let mut faults = Faults::default();
    faults.drop_next.insert("createvolume".into(), 1);
    let mut env = TestEnv::with_sim(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;

    let event = run(&env, &cmd::create("dropped-answer", "1GiB")).await;

    completed(&event, "create");
    assert_eq!(env.sim.sim.volume_count(), 1, "exactly one volume");
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        1,
        "found by listVolumes, not re-created"
    );
    assert!(env.sim.sim.calls().iter().any(|c| c.dropped));
    let (id, _) = env.sim.sim.volumes()[0];
    assert_eq!(event.data.volume_id, Some(id));
}

/// M3: the look-up after a lost createVolume answer finds the command's own volume when
/// CloudStack's clock is 3 s behind the daemon's (its `created` comes before the acceptance),
/// and never another account's volume of the same name made moments before, which only a
/// `listall=true` listing shows.
#[tokio::test]
async fn the_lookup_after_a_lost_create_answer_finds_its_own_volume_and_no_other() {
    let mut faults = Faults {
        clock_offset_ms: -3_000,
        ..Faults::default()
    };
    faults.drop_next.insert("createvolume".into(), 1);
    let mut env = TestEnv::with_sim(SimConfig {
        faults: faults.clone(),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;

    let event = run(&env, &cmd::create("behind-clock", "1GiB")).await;
    completed(&event, "create");
    assert_eq!(env.sim.sim.volume_count(), 1, "exactly one volume");
    assert_eq!(env.sim.sim.call_count("createVolume"), 1, "not re-created");
    let (id, _) = env.sim.sim.volumes()[0];
    assert_eq!(event.data.volume_id, Some(id));

    let foreign = env
        .sim
        .sim
        .seed_volume_in("tenant-b", "shared-name", 1 << 30);
    faults.clock_offset_ms = 0;
    env.sim.sim.set_faults(faults);
    let event = run(&env, &cmd::create("shared-name", "1GiB")).await;
    completed(&event, "create");
    let own = event.data.volume_id.expect("a volume");
    assert_ne!(own, foreign, "another account's volume was adopted");
    assert_eq!(env.sim.sim.call_count("createVolume"), 2);
    assert!(
        env.sim.sim.volumes().iter().any(|(v, _)| *v == own),
        "the event names the volume the command made"
    );
}

/// M1: three createVolume requests lost on their way (nothing happened, no answer): the volume
/// is looked for after each, the last included, and the create ends `TIMEOUT`, not retryable,
/// with a hint naming what to look for (CloudStack may still act), never a retryable
/// CLOUDSTACK_UNAVAILABLE that invites a duplicate.
#[tokio::test]
async fn a_third_lost_createvolume_is_looked_up_then_ends_not_retryable() {
    let mut faults = Faults::default();
    faults.lose_next.insert("createvolume".into(), 3);
    let mut env = TestEnv::with_sim(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;

    let event = run(&env, &cmd::create("never-answered", "1GiB")).await;

    let error = event.data.error.clone().expect("failed");
    assert_eq!(error.code, ErrorCode::Timeout, "{event:?}");
    assert!(!error.retryable);
    assert!(error.hint.contains("never-answered"), "{}", error.hint);
    assert_eq!(
        env.sim.sim.call_count("listVolumes"),
        3,
        "a look-up after each lost request, the last included"
    );
    assert_eq!(env.sim.sim.volume_count(), 0, "nothing was created");
}

/// N17: a delete whose detach succeeded but whose deleteVolume CloudStack refused fails, and
/// still removes the mapping: the volume is attached nowhere, whatever failed after.
#[tokio::test]
async fn a_delete_that_fails_after_its_detach_still_removes_the_mapping() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let volume = env.sim.sim.seed_volume("detached-then-refused", 1 << 30);
    completed(
        &run(&env, &cmd::attach(volume, DEMO_VMS[0])).await,
        "attach",
    );
    assert!(env.mappings().await.contains_key(&volume.to_string()));
    let mut faults = Faults::default();
    faults.error_rates.insert(531, 1.0);
    faults.commands = vec!["deletevolume".into()];
    env.sim.sim.set_faults(faults);

    let event = run(&env, &cmd::delete(volume)).await;

    let error = event.data.error.clone().expect("failed");
    assert_eq!(error.cloudstack_error_code, Some(531), "{event:?}");
    assert_eq!(
        env.sim.sim.attachment(volume),
        None,
        "detached in CloudStack"
    );
    assert!(
        !env.mappings().await.contains_key(&volume.to_string()),
        "no mapping claims an attachment that no longer exists"
    );
}

#[tokio::test]
async fn dropped_attach_and_detach_answers_are_reconciled_not_repeated() {
    let mut faults = Faults::default();
    faults.drop_next.insert("attachvolume".into(), 1);
    faults.drop_next.insert("detachvolume".into(), 1);
    let mut env = TestEnv::with_sim(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let volume = env.sim.sim.seed_volume("drop-attach", 1 << 30);

    completed(
        &run(&env, &cmd::attach(volume, DEMO_VMS[0])).await,
        "attach",
    );
    completed(&run(&env, &cmd::detach(volume)).await, "detach");

    assert_eq!(
        env.sim.sim.call_count("attachVolume"),
        1,
        "not re-sent after it took effect"
    );
    assert_eq!(env.sim.sim.call_count("detachVolume"), 1);
}

#[tokio::test]
async fn a_key_rotated_in_ossea_configs_applies_to_the_next_operation() {
    let mut env = TestEnv::new().await;
    env.cloudstack_from_db = true;
    env.start_daemon().await;
    let pool = env.db().await;
    let (key, secret) = env.sim.sim.keys();
    sqlx::query("INSERT INTO ossea_configs (name, api_url, api_key, secret_key, is_active) VALUES ('sim', ?, ?, ?, TRUE)")
        .bind(env.sim.api_url())
        .bind(&key)
        .bind(&secret)
        .execute(&pool)
        .await
        .expect("insert config");
    completed(
        &run(&env, &cmd::create("before-rotation", "1GiB")).await,
        "create",
    );

    // CloudStack gets new keys; the row still has the old ones.
    env.sim.sim.set_keys("rotated-key", "rotated-secret");
    let refused = run(&env, &cmd::create("old-keys", "1GiB")).await;
    let error = failed(&refused, ErrorCode::CloudstackUnauthorized);
    assert_eq!(error.cloudstack_error_code, Some(401));

    // The operator rotates the row: the next operation uses it, no restart.
    sqlx::query("UPDATE ossea_configs SET api_key = 'rotated-key', secret_key = 'rotated-secret' WHERE name = 'sim'")
        .execute(&pool)
        .await
        .expect("rotate");
    completed(
        &run(&env, &cmd::create("after-rotation", "1GiB")).await,
        "create",
    );
    assert!(
        !env.daemon_log().contains("rotated-secret"),
        "the secret never reaches the log"
    );
}

/// Each request has its own retry budget, and polling a stored job goes on through transient
/// errors until the job's deadline: an error late in a long job does not fail it. Scaled down:
/// a 2 s retry deadline and a 12 s job with CloudStack answering 503 to every poll from 3.5 s
/// to 10.5 s (longer than one request's own retries with their backoff) stand for the default
/// 120 s deadline and a 200 s job with a transient error 150 s in.
#[tokio::test]
async fn a_transient_error_late_in_a_long_job_does_not_fail_it() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_secs(12),
        ..SimConfig::default()
    })
    .await;
    env.extra_env
        .push(("CLOUDSTACK_RETRY_DEADLINE_S".into(), "2".into()));
    env.start_daemon().await;
    let client = env.client().await;
    let command = cmd::create("long-job", "1GiB");
    let pending = client.publish(&command).await.expect("published");

    tokio::time::sleep(Duration::from_millis(3500)).await;
    env.sim.sim.set_faults(Faults {
        error_rates: BTreeMap::from([(503, 1.0)]),
        commands: vec!["queryasyncjobresult".into()],
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_secs(7)).await;
    env.sim.sim.set_faults(Faults::default());
    let event = pending.wait(WAIT).await.expect("terminal event");

    assert_eq!(
        event.data.status,
        OperationStatus::Completed,
        "{:?}",
        event.data.error
    );
    let refused = env
        .sim
        .sim
        .calls()
        .iter()
        .filter(|c| c.command == "queryAsyncJobResult" && c.status == 503)
        .count();
    assert!(refused >= 3, "the polls met the outage ({refused} refused)");
    assert_eq!(env.sim.sim.call_count("createVolume"), 1);
}

/// A job still running at its type's deadline ends the operation `TIMEOUT`, not retryable (it
/// may still finish), with a hint naming the job, and with exactly one terminal event.
#[tokio::test]
async fn a_job_past_its_deadline_ends_timeout_not_retryable_naming_the_job() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_secs(4),
        ..SimConfig::default()
    })
    .await;
    env.extra_env
        .push(("CREATE_JOB_TIMEOUT_S".into(), "1".into()));
    env.start_daemon().await;
    let collector = crate::helpers::Collector::start(&env.prefix).await;
    let command = cmd::create("slow-job", "1GiB");

    let event = run(&env, &command).await;

    let error = failed(&event, ErrorCode::Timeout);
    assert!(!error.retryable, "the job may still finish: {error:?}");
    let row = env
        .operation(command.command_id.as_str())
        .await
        .expect("row");
    let job = row.cloudstack_job_id.expect("the job id was stored");
    assert!(
        error.hint.contains(&job),
        "the hint names job {job}: {}",
        error.hint
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let terminal = collector
        .events()
        .iter()
        .filter(|e| e.data.command_id == command.command_id)
        .count();
    assert_eq!(terminal, 1, "exactly one terminal event");
}

/// M6: an attach naming a `device_id` finds the volume already on that VM in another slot: it
/// fails `VOLUME_IN_USE`, with a hint naming the slot it is in, and calls nothing in CloudStack
/// (never "completed" as if the volume were where it was asked to be). The same slot completes.
#[tokio::test]
async fn an_attach_to_another_slot_of_the_same_vm_fails_naming_the_current_one() {
    use schema::command::{Action, AttachVolume};
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0];
    let created = env.execute(&cmd::create("slotted", "1GiB")).await;
    let volume = created.data.volume_id.expect("volume");
    let first = env.execute(&cmd::attach(volume, vm)).await;
    assert_eq!(first.data.status.as_str(), "completed", "{first:?}");
    let (_, slot) = env.sim.sim.attachment(volume).expect("attached");
    let calls = env.sim.sim.call_count("attachVolume");

    let elsewhere = schema::Command::new(Action::Attach(AttachVolume {
        volume_id: volume,
        vm_id: vm,
        device_id: Some(slot + 1),
    }));
    let failed = env.execute(&elsewhere).await;
    let error = failed.data.error.clone().expect("failed");
    assert_eq!(error.code, schema::ErrorCode::VolumeInUse, "{failed:?}");
    assert!(!error.retryable);
    assert!(
        error.hint.contains(&format!("device {slot}")),
        "the hint names the current slot: {}",
        error.hint
    );
    assert_eq!(env.sim.sim.call_count("attachVolume"), calls, "no call");

    let same = schema::Command::new(Action::Attach(AttachVolume {
        volume_id: volume,
        vm_id: vm,
        device_id: Some(slot),
    }));
    let done = env.execute(&same).await;
    assert_eq!(done.data.status.as_str(), "completed", "{done:?}");
    assert_eq!(
        env.sim.sim.call_count("attachVolume"),
        calls,
        "still no call"
    );
}
