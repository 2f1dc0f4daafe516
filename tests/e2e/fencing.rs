//! The faults that defeat a lock tied to one connection: every MySQL session of the active
//! killed, a silent (half-open) partition from MySQL, a commit whose acknowledgement is lost.
//! Whatever fails, an accepted command ends exactly once with its event, and no CloudStack side
//! effect happens twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudstack_sim::{CallRecord, SimConfig};
use schema::{Command, OperationStatus, VmId, VolumeId};

use crate::helpers::{Collector, CommitDropProxy, TcpProxy, TestEnv, cmd};
use crate::resilience::{assert_all_ended, assert_no_duplicate_side_effects, get_json_ok};

/// The standby signs its CloudStack calls with a key of its own, so the simulator's call log
/// tells the two daemons apart.
const STANDBY_KEY: (&str, &str) = ("standby-api-key", "standby-secret-key");

fn sim(job_latency_ms: u64) -> SimConfig {
    SimConfig {
        job_latency: Duration::from_millis(job_latency_ms),
        ..SimConfig::default()
    }
}

/// `creates` creates, and an attach then a detach of `pairs` seeded volumes (one VM each).
/// Returns (first wave: creates + attaches, second wave: more creates + detaches, volumes).
fn two_waves(
    env: &TestEnv,
    creates: usize,
    pairs: usize,
) -> (Vec<Command>, Vec<Command>, Vec<VolumeId>) {
    let mut first: Vec<Command> = (0..creates)
        .map(|i| cmd::create(&format!("fence-new-{i}"), "1GiB"))
        .collect();
    let mut second: Vec<Command> = (0..creates)
        .map(|i| cmd::create(&format!("fence-late-{i}"), "1GiB"))
        .collect();
    let mut volumes = Vec::new();
    for i in 0..pairs {
        let vm = VmId::new_random();
        env.sim.sim.add_vm(vm, &format!("fence-vm-{i}"));
        let v = env.sim.sim.seed_volume(&format!("fence-{i}"), 1 << 30);
        first.push(cmd::attach(v, vm));
        second.push(cmd::detach(v));
        volumes.push(v);
    }
    (first, second, volumes)
}

/// Who made a call (its API key), when it arrived and when it was answered.
type Call = (String, DateTime<Utc>, DateTime<Utc>);

/// The volume a mutating call is about (creates by name), with who made it and when.
fn volume_calls(calls: &[CallRecord]) -> HashMap<String, Vec<Call>> {
    let mut by_volume: HashMap<String, Vec<_>> = HashMap::new();
    for c in calls {
        let key = match c.command.as_str() {
            "createVolume" => format!("name {}", c.params["name"]),
            "attachVolume" | "detachVolume" | "deleteVolume" => format!("id {}", c.params["id"]),
            _ => continue,
        };
        let who = c.params.get("apikey").cloned().unwrap_or_default();
        by_volume
            .entry(key)
            .or_default()
            .push((who, c.at, c.answered_at));
    }
    by_volume
}

/// Never two daemons' calls overlapping for one volume.
fn assert_no_overlap_between_daemons(calls: &[CallRecord]) {
    for (volume, calls) in volume_calls(calls) {
        for (i, a) in calls.iter().enumerate() {
            for b in &calls[i + 1..] {
                let overlap = a.1 <= b.2 && b.1 <= a.2;
                assert!(
                    a.0 == b.0 || !overlap,
                    "{volume}: calls of two daemons overlap: {a:?} and {b:?}"
                );
            }
        }
    }
}

/// Per volume, the attach's event comes before the detach's.
fn assert_attach_then_detach(events: &[schema::CloudEvent], volumes: &[VolumeId]) {
    for v in volumes {
        let order: Vec<&str> = events
            .iter()
            .filter(|e| e.data.volume_id == Some(*v))
            .map(|e| e.data.op_type.as_str())
            .fold(Vec::new(), |mut seen, t| {
                if !seen.contains(&t) {
                    seen.push(t);
                }
                seen
            });
        assert_eq!(order, ["attach", "detach"], "volume {v}");
    }
}

async fn wait_for_role(addr: SocketAddr, role: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if get_json_ok(addr, "/ready").await.1["role"] == role {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the daemon at {addr} did not report role {role} within {within:?}");
}

/// Waits until CloudStack has started at least `n` jobs.
async fn wait_for_jobs(env: &TestEnv, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let started =
            env.sim.sim.call_count("createVolume") + env.sim.sim.call_count("attachVolume");
        if started >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {started} jobs started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every command of both waves to end, then checks the promise: each ended once,
/// completed, no side effect twice, no two daemons on one volume at once, per-volume order.
/// Returns the simulator's call log.
async fn assert_every_command_ended_once(
    env: &mut TestEnv,
    collector: &Collector,
    waves: &(Vec<Command>, Vec<Command>, Vec<VolumeId>),
) -> Vec<CallRecord> {
    let (first, second, volumes) = waves;
    let all: Vec<Command> = first.iter().chain(second).cloned().collect();
    let ids: Vec<String> = all.iter().map(|c| c.command_id.to_string()).collect();
    let events = collector.wait_all(&ids, Duration::from_secs(90)).await;
    assert_all_ended(env, &all, &events).await;
    let calls = env.sim.sim.calls();
    assert_no_duplicate_side_effects(&calls);
    assert_no_overlap_between_daemons(&calls);
    assert_attach_then_detach(&events, volumes);
    calls
}

async fn start_standby(env: &mut TestEnv, database_url: String) -> SocketAddr {
    env.sim.sim.add_keys(STANDBY_KEY.0, STANDBY_KEY.1);
    let standby = env
        .spawn_other_with(&[
            ("DATABASE_URL", database_url),
            ("CLOUDSTACK_API_KEY", STANDBY_KEY.0.into()),
            ("CLOUDSTACK_SECRET_KEY", STANDBY_KEY.1.into()),
        ])
        .await;
    wait_for_role(standby, "standby", Duration::from_secs(20)).await;
    standby
}

#[tokio::test]
async fn killing_every_mysql_session_of_the_active_loses_and_repeats_nothing() {
    let mut env = TestEnv::with_sim(sim(1500)).await;
    let (user_a, url_a) = env.db_user("a").await;
    let (_, url_b) = env.db_user("b").await;
    env.daemon_database_url = Some(url_a);
    env.start_daemon().await;
    start_standby(&mut env, url_b).await;
    let collector = Collector::start(&env.prefix).await;
    let waves = two_waves(&env, 10, 8);
    let client = env.client().await;
    for c in &waves.0 {
        client.publish_only(c).await.expect("published");
    }

    // Jobs in flight, then every session of the active daemon killed; commands keep coming.
    wait_for_jobs(&env, 6).await;
    let killed = env.kill_sessions_of(&user_a).await;
    for c in &waves.1 {
        client.publish_only(c).await.expect("published");
    }
    let killed_again = env.kill_sessions_of(&user_a).await;
    eprintln!("killed {killed} then {killed_again} sessions of the active daemon");
    assert!(killed >= 2, "the active daemon had sessions to kill");

    assert_every_command_ended_once(&mut env, &collector, &waves).await;
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        20,
        "each create once"
    );
}

#[tokio::test]
async fn a_silent_partition_from_mysql_hands_over_within_ten_seconds_and_fences_the_old_active() {
    let mut env = TestEnv::with_sim(sim(800)).await;
    let mysql: SocketAddr = "127.0.0.1:3306".parse().expect("addr");
    let link = TcpProxy::start(mysql).await;
    env.daemon_database_url = Some(format!("mysql://root@{}/{}", link.addr, env.db_name));
    env.start_daemon().await;
    let direct = env.database_url();
    start_standby(&mut env, direct).await;
    let collector = Collector::start(&env.prefix).await;
    let waves = two_waves(&env, 12, 6);
    let client = env.client().await;
    for c in &waves.0 {
        client.publish_only(c).await.expect("published");
    }

    wait_for_jobs(&env, 5).await;
    let frozen_at = Utc::now();
    link.freeze();
    for c in &waves.1 {
        client.publish_only(c).await.expect("published");
    }

    let calls = assert_every_command_ended_once(&mut env, &collector, &waves).await;
    let (main_key, _) = env.sim.sim.keys();
    let times = |key: &str| -> Vec<DateTime<Utc>> {
        calls
            .iter()
            .filter(|c| c.params.get("apikey").map(String::as_str) == Some(key))
            .map(|c| c.at)
            .collect()
    };
    let old_last = *times(&main_key)
        .iter()
        .max()
        .expect("the old active called CloudStack");
    let new_first = *times(STANDBY_KEY.0)
        .iter()
        .min()
        .expect("the standby took over and called CloudStack");
    let fenced_after = (old_last - frozen_at).num_milliseconds();
    let took_over_after = (new_first - frozen_at).num_milliseconds();
    eprintln!(
        "silent partition: old active's last CloudStack call {fenced_after} ms after the freeze, \
         standby's first {took_over_after} ms after"
    );
    assert!(
        fenced_after <= 5_000,
        "the old active called CloudStack {fenced_after} ms after losing MySQL"
    );
    assert!(
        took_over_after <= 10_000,
        "the standby took {took_over_after} ms to take over"
    );
}

#[tokio::test]
async fn a_lost_commit_acknowledgement_on_accept_still_executes_the_command_once() {
    let mut env = TestEnv::new().await;
    let mysql: SocketAddr = "127.0.0.1:3306".parse().expect("addr");
    let lossy = CommitDropProxy::start(mysql).await;
    env.daemon_database_url = Some(format!("mysql://root@{}/{}", lossy.addr, env.db_name));
    env.start_daemon().await;
    let command = cmd::create("lost-ack", "1GiB");
    lossy.arm(command.command_id.as_str());

    let event = env.execute(&command).await;

    assert!(lossy.fired(), "the commit's acknowledgement was lost");
    assert_eq!(
        event.data.status,
        OperationStatus::Completed,
        "{:?}",
        event.data.error
    );
    assert_eq!(env.sim.sim.call_count("createVolume"), 1, "executed once");
    assert!(
        env.daemon_log()
            .contains("duplicate of an operation in flight; making sure it runs"),
        "the retried accept found its own row and handed the operation over"
    );
}

/// N4: CloudStack acts on a createVolume 10 s after it arrives and answers at 14 s; the active
/// is SIGKILLed 1 s into the call and the standby resumes the create at about 6 s. It waits
/// `CREATE_RESUME_SETTLE_S` (12 s) before looking for the volume, finds the one CloudStack
/// made late, and never asks for a second: exactly one volume of that name, one completed event.
#[tokio::test]
async fn a_takeover_during_a_slow_createvolume_makes_one_volume() {
    use cloudstack_sim::SlowCall;
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CREATE_RESUME_SETTLE_S".into(), "12".into()));
    env.start_daemon().await;
    let standby = env.spawn_other().await;
    let mut faults = env.sim.sim.faults();
    faults.slow_next.insert(
        "createvolume".into(),
        SlowCall {
            act_after_ms: 10_000,
            answer_after_ms: 14_000,
        },
    );
    env.sim.sim.set_faults(faults);
    let collector = crate::helpers::Collector::start(&env.prefix).await;
    let command = cmd::create("made-late", "1GiB");
    let id = command.command_id.as_str().to_owned();
    env.client()
        .await
        .publish_only(&command)
        .await
        .expect("published");
    env.wait_for_operation(&id, Duration::from_secs(10), |op| op.status == "executing")
        .await;
    let called = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.kill_daemon().await;
    env.promote_other(0, standby);

    let events = collector
        .wait_all(std::slice::from_ref(&id), Duration::from_secs(60))
        .await;
    let mine: Vec<_> = events
        .iter()
        .filter(|e| e.data.command_id.as_str() == id)
        .collect();
    assert_eq!(mine.len(), 1, "one event: {mine:?}");
    assert_eq!(mine[0].data.status.as_str(), "completed", "{:?}", mine[0]);
    // Count once the slow call has acted and answered, whatever the daemon did meanwhile.
    tokio::time::sleep_until(called + Duration::from_secs(15)).await;
    let named = env
        .sim
        .sim
        .volumes()
        .into_iter()
        .filter(|(_, name)| name == "made-late")
        .count();
    assert_eq!(
        named,
        1,
        "exactly one volume of that name\n{}",
        env.daemon_log()
    );
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        1,
        "no second createVolume"
    );
}
