//! An attach that waits for a slot (`MAX_CONCURRENT_OPERATIONS`) reads its volume while it
//! waits, so its turn starts with the `attachVolume` itself; a volume attached by someone else
//! meanwhile is refused by CloudStack, read again, and answered as if it had been read in turn
//! (docs/cloudstack.md, "Reading before acting").

use std::time::Duration;

use cloudstack_sim::{CallRecord, DeviceBehaviour, SimConfig};
use schema::{CloudEvent, ErrorCode, OperationStatus, VmId, VolumeId};

use crate::helpers::{Collector, TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(60);

/// The daemon's calls naming `volume` (its `id`), in arrival order.
fn calls_on(calls: &[CallRecord], volume: VolumeId) -> Vec<&CallRecord> {
    let id = volume.to_string();
    calls
        .iter()
        .filter(|c| c.params.get("id") == Some(&id))
        .collect()
}

/// Publishes an attach per `(volume, vm)`, in order, and returns their command ids.
async fn publish_attaches(env: &TestEnv, attaches: &[(VolumeId, VmId)]) -> Vec<String> {
    let client = env.client().await;
    let mut ids = Vec::new();
    for (volume, vm) in attaches {
        let c = cmd::attach(*volume, *vm);
        client.publish_only(&c).await.expect("published");
        ids.push(c.command_id.to_string());
    }
    ids
}

fn event_of<'a>(events: &'a [CloudEvent], id: &str) -> &'a CloudEvent {
    events
        .iter()
        .find(|e| e.data.operation_id.as_str() == id)
        .expect("its event")
}

/// With one slot, the second attach's `listVolumes` comes while the first one's job still
/// runs, and once the slot is free its `attachVolume` follows with no second read.
#[tokio::test]
async fn an_attach_waiting_for_a_slot_reads_its_volume_before_its_turn() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    env.extra_env
        .push(("MAX_CONCURRENT_OPERATIONS".into(), "1".into()));
    env.spawn_app().await;
    let collector = Collector::start(&env.prefix).await;
    let (first, second) = (
        env.sim.sim.seed_volume("ahead-first", 1 << 30),
        env.sim.sim.seed_volume("ahead-second", 1 << 30),
    );
    let vms = cloudstack_sim::DEMO_VMS;
    let ids = publish_attaches(&env, &[(first, vms[0]), (second, vms[1])]).await;
    let events = collector.wait_all(&ids, WAIT).await;
    for e in &events {
        assert_eq!(
            e.data.status,
            OperationStatus::Completed,
            "{:?}",
            e.data.error
        );
    }

    let calls = env.sim.sim.calls();
    let second_attach = calls_on(&calls, second)
        .iter()
        .find(|c| c.command == "attachVolume")
        .map(|c| c.at)
        .expect("the second attachVolume");
    // The first attach's job, seen ended by the last poll answered before the second attach.
    let first_job_seen_ended = calls
        .iter()
        .filter(|c| c.command == "queryAsyncJobResult" && c.answered_at <= second_attach)
        .map(|c| c.answered_at)
        .max()
        .expect("the first job's polls");
    let second_calls = calls_on(&calls, second);
    let commands: Vec<&str> = second_calls.iter().map(|c| c.command.as_str()).collect();
    assert_eq!(
        commands.first().copied(),
        Some("listVolumes"),
        "{commands:?}"
    );
    assert_eq!(
        commands.iter().position(|c| *c == "attachVolume"),
        Some(1),
        "one read, then the attach: {commands:?}"
    );
    assert!(
        second_calls[0].at < first_job_seen_ended,
        "the second volume was read ({}) while the first attach still held the slot (until {first_job_seen_ended})",
        second_calls[0].at
    );
    env.stop_app().await;
}

/// Two attaches wait for a slot (both slots held by host attaches whose devices come late)
/// and read their volumes; then another tool attaches one volume to another VM and the other
/// to the very VM its command names. When their turns come CloudStack refuses both
/// `attachVolume`s; each reads again and ends as a read in turn would: `VOLUME_IN_USE` naming
/// the other VM, and completed with no further call.
#[tokio::test]
async fn a_volume_attached_meanwhile_by_someone_else_is_read_again_after_the_refusal() {
    let (elsewhere, wanted, other) = (VmId::new_random(), VmId::new_random(), VmId::new_random());
    let mut env = TestEnv::with_host_vm(SimConfig {
        vms: vec![elsewhere, wanted, other],
        ..SimConfig::default()
    })
    .await;
    env.sim.sim.set_device_behaviour(DeviceBehaviour {
        delay: Some(Duration::from_secs(3)),
        ..DeviceBehaviour::default()
    });
    env.extra_env
        .push(("MAX_CONCURRENT_OPERATIONS".into(), "2".into()));
    env.spawn_app().await;
    let collector = Collector::start(&env.prefix).await;
    let host = env.host_vm.expect("host vm");
    let volume = |name: &str| env.sim.sim.seed_volume(name, 1 << 30);
    let (b1, b2) = (volume("ahead-b1"), volume("ahead-b2"));
    let (moved, same) = (volume("ahead-moved"), volume("ahead-same"));
    let ids = publish_attaches(
        &env,
        &[(b1, host), (b2, host), (moved, other), (same, wanted)],
    )
    .await;

    // Both read while the host attaches hold the slots.
    let deadline = tokio::time::Instant::now() + WAIT;
    while [moved, same].iter().any(|v| {
        calls_on(&env.sim.sim.calls(), *v)
            .iter()
            .all(|c| c.command != "listVolumes")
    }) {
        assert!(tokio::time::Instant::now() < deadline, "never read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (v, vm) in [(moved, elsewhere), (same, wanted)] {
        crate::helpers::attach_outside(&env.sim.sim, v, vm);
    }
    while [(moved, elsewhere), (same, wanted)]
        .iter()
        .any(|(v, vm)| env.sim.sim.attachment(*v).map(|a| a.0) != Some(*vm))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never attached outside; calls: {:?}",
            env.sim
                .sim
                .calls()
                .iter()
                .map(|c| (c.command.as_str(), c.params.get("id"), c.at, c.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let none_ended = collector.events().len();
    assert_eq!(
        none_ended, 0,
        "the slots were still held when the volumes were taken"
    );

    let events = collector.wait_all(&ids, WAIT).await;
    let in_use = event_of(&events, &ids[2]);
    assert_eq!(in_use.data.status, OperationStatus::Failed);
    let error = in_use.data.error.clone().expect("its error");
    assert_eq!(error.code, ErrorCode::VolumeInUse, "{}", error.message);
    assert!(
        error.message.contains(&elsewhere.to_string()),
        "{}",
        error.message
    );
    let done = event_of(&events, &ids[3]);
    assert_eq!(
        done.data.status,
        OperationStatus::Completed,
        "{:?}",
        done.data.error
    );
    assert_eq!(done.data.vm_id, Some(wanted));

    // The other tool's attaches went to the simulator directly: these are the daemon's.
    let calls = env.sim.sim.calls();
    for v in [moved, same] {
        let attaches: Vec<u16> = calls_on(&calls, v)
            .iter()
            .filter(|c| c.command == "attachVolume")
            .map(|c| c.status)
            .collect();
        assert_eq!(attaches, [431], "one attachVolume, refused, nothing after");
    }
    env.stop_app().await;
}
