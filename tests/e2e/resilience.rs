//! Nothing lost, nothing done twice: SIGKILLs, broker and database outages, a hot standby,
//! duplicates in flight. The faults are injected by the tests themselves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cloudstack_sim::{CallRecord, SimConfig};
use schema::{Command, OperationStatus, VmId, VolumeId};

use crate::helpers::{Collector, TcpProxy, TestEnv, cmd, get_json, get_text};

fn sim(latency_ms: u64) -> SimConfig {
    SimConfig {
        job_latency: Duration::from_millis(latency_ms),
        ..SimConfig::default()
    }
}

/// 40 creates, and attach → detach → delete on 20 existing volumes, interleaved. The volumes go
/// to 10 VMs, two each, so CloudStack's limit of 6 data disks per VM is never the question.
fn mixed_commands(env: &TestEnv) -> (Vec<Command>, Vec<VolumeId>) {
    let vms: Vec<VmId> = (0..10).map(|_| VmId::new_random()).collect();
    for (i, vm) in vms.iter().enumerate() {
        env.sim.sim.add_vm(*vm, &format!("mixed-vm-{i}"));
    }
    let volumes: Vec<VolumeId> = (0..20)
        .map(|i| env.sim.sim.seed_volume(&format!("mixed-{i}"), 1 << 30))
        .collect();
    let mut commands = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        commands.push(cmd::create(&format!("mixed-new-{}", 2 * i), "1GiB"));
        commands.push(cmd::attach(*v, vms[i % vms.len()]));
        commands.push(cmd::create(&format!("mixed-new-{}", 2 * i + 1), "1GiB"));
        commands.push(cmd::detach(*v));
        commands.push(cmd::delete(*v));
    }
    (commands, volumes)
}

/// No CloudStack side effect happened twice.
pub(crate) fn assert_no_duplicate_side_effects(calls: &[CallRecord]) {
    let mut effects: HashMap<String, usize> = HashMap::new();
    for c in calls.iter().filter(|c| c.status == 200) {
        let key = match c.command.as_str() {
            "createVolume" => format!("create {}", c.params["name"]),
            "attachVolume" | "detachVolume" | "deleteVolume" => {
                format!("{} {}", c.command, c.params["id"])
            }
            _ => continue,
        };
        *effects.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "side effects repeated: {twice:?}");
}

/// Every command ended exactly once (one terminal row), completed, with at least one event.
pub(crate) async fn assert_all_ended(
    env: &mut TestEnv,
    commands: &[Command],
    events: &[schema::CloudEvent],
) {
    let statuses = env.statuses().await;
    for c in commands {
        let id = c.command_id.as_str();
        assert_eq!(
            statuses.get(id).map(String::as_str),
            Some("completed"),
            "command {id} ({})",
            c.operation_type()
        );
        let terminal: Vec<_> = events
            .iter()
            .filter(|e| e.data.command_id.as_str() == id)
            .collect();
        assert!(!terminal.is_empty(), "no event for {id}");
        assert!(
            terminal
                .iter()
                .all(|e| e.data.status == OperationStatus::Completed && e.id == terminal[0].id),
            "{id}: {terminal:?}"
        );
    }
}

/// Per volume, events arrive in the order the commands were published (attach, detach, delete).
fn assert_volume_order(events: &[schema::CloudEvent], volumes: &[VolumeId]) {
    for v in volumes {
        let mut order: Vec<&str> = Vec::new();
        for e in events.iter().filter(|e| e.data.volume_id == Some(*v)) {
            let t = e.data.op_type.as_str();
            if !order.contains(&t) {
                order.push(t);
            }
        }
        assert_eq!(order, ["attach", "detach", "delete"], "volume {v}");
    }
}

#[tokio::test]
async fn three_sigkills_during_a_hundred_mixed_commands_lose_and_repeat_nothing() {
    let mut env = TestEnv::with_sim(sim(200)).await;
    let collector = Collector::start(&env.prefix).await;
    let (commands, volumes) = mixed_commands(&env);
    let client = env.client().await;
    for c in &commands {
        client.publish_only(c).await.expect("published");
    }

    env.start_daemon().await;
    for delay in [700, 900, 1100] {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        env.kill_daemon().await;
        env.start_daemon().await;
    }
    let ids: Vec<String> = commands.iter().map(|c| c.command_id.to_string()).collect();
    let events = collector.wait_all(&ids, Duration::from_secs(120)).await;

    assert_all_ended(&mut env, &commands, &events).await;
    assert_no_duplicate_side_effects(&env.sim.sim.calls());
    assert_volume_order(&events, &volumes);
    assert_eq!(env.sim.sim.volume_count(), 40, "40 created, 20 deleted");
    let resumed = env
        .daemon_log()
        .matches("resuming unfinished operations")
        .count();
    assert!(
        resumed >= 1,
        "the kills interrupted operations that were resumed"
    );
}

/// 40 creates: 20 before the daemon's link to `service` is cut, 20 during the 5 s outage.
/// Every command must end once, with its event, and no side effect twice.
async fn survive_outage(service: &str, name: &str, link: impl FnOnce(&mut TestEnv, SocketAddr)) {
    let mut env = TestEnv::with_sim(sim(200)).await;
    let proxy = TcpProxy::start(service.parse().expect("addr")).await;
    link(&mut env, proxy.addr);
    env.start_daemon().await;
    let collector = Collector::start(&env.prefix).await;
    let client = env.client().await;
    let commands: Vec<Command> = (0..40)
        .map(|i| cmd::create(&format!("{name}-{i}"), "1GiB"))
        .collect();
    for c in &commands[..20] {
        client.publish_only(c).await.expect("published");
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.cut();
    for c in &commands[20..] {
        client
            .publish_only(c)
            .await
            .expect("published during the outage");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.restore();

    let ids: Vec<String> = commands.iter().map(|c| c.command_id.to_string()).collect();
    let events = collector.wait_all(&ids, Duration::from_secs(60)).await;
    assert_all_ended(&mut env, &commands, &events).await;
    assert_no_duplicate_side_effects(&env.sim.sim.calls());
    assert_eq!(env.sim.sim.volume_count(), 40);
}

#[tokio::test]
async fn a_five_second_broker_outage_loses_no_command_and_no_event() {
    survive_outage("127.0.0.1:5672", "broker-cut", |env, proxy| {
        env.daemon_amqp_url = format!("amqp://guest:guest@{proxy}/%2f");
    })
    .await;
}

#[tokio::test]
async fn a_five_second_database_outage_loses_no_command_and_no_event() {
    survive_outage("127.0.0.1:3306", "db-cut", |env, proxy| {
        env.daemon_database_url = Some(format!("mysql://root@{proxy}/{}", env.db_name));
    })
    .await;
}

#[tokio::test]
async fn a_hot_standby_takes_over_within_ten_seconds_and_finishes_the_rest() {
    let mut env = TestEnv::with_sim(sim(300)).await;
    env.start_daemon().await;
    let standby_http: SocketAddr = env.spawn_other().await;
    // The standby is up and says so.
    let mut standby_ready = false;
    for _ in 0..100 {
        if let (200, body) = get_json_ok(standby_http, "/ready").await
            && body["role"] == "standby"
        {
            standby_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        standby_ready,
        "the second daemon reports role standby:\n{}",
        env.daemon_log()
    );
    assert_eq!(env.get_json("/ready").await.1["role"], "active");

    let collector = Collector::start(&env.prefix).await;
    let client = env.client().await;
    let commands: Vec<Command> = (0..30)
        .map(|i| cmd::create(&format!("takeover-{i}"), "1GiB"))
        .collect();
    for c in &commands {
        client.publish_only(c).await.expect("published");
    }
    while collector.events().len() < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the active one executed so far.
    let standby_metrics = get_text(standby_http, "/metrics").await;
    assert!(
        !standby_metrics.contains("volume_daemon_operations_total{"),
        "the standby executed something:\n{standby_metrics}"
    );

    env.kill_daemon().await;
    let killed = tokio::time::Instant::now();
    let mut took = None;
    while killed.elapsed() < Duration::from_secs(20) {
        if get_json_ok(standby_http, "/ready").await.1["role"] == "active" {
            took = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = took.expect("the standby became active");
    eprintln!(
        "takeover after SIGKILL of the active daemon: {} ms",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(10), "takeover took {took:?}");

    let ids: Vec<String> = commands.iter().map(|c| c.command_id.to_string()).collect();
    let events = collector.wait_all(&ids, Duration::from_secs(60)).await;
    assert_all_ended(&mut env, &commands, &events).await;
    assert_no_duplicate_side_effects(&env.sim.sim.calls());
    let metrics = get_text(standby_http, "/metrics").await;
    assert!(
        metrics.contains(r#"volume_daemon_operations_total{type="create",outcome="completed"}"#),
        "the former standby finished the rest"
    );
}

/// `/ready` may answer 503 while starting: never panic on it.
pub(crate) async fn get_json_ok(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    match crate::helpers::http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or_default())
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

#[tokio::test]
async fn a_duplicate_of_an_operation_in_flight_changes_nothing() {
    let mut env = TestEnv::with_sim(sim(1500)).await;
    env.start_daemon().await;
    let collector = Collector::start(&env.prefix).await;
    let client = env.client().await;
    let c = cmd::create("in-flight-dup", "1GiB");
    let id = c.command_id.to_string();

    client.publish_only(&c).await.expect("published");
    env.wait_for_operation(&id, Duration::from_secs(10), |r| r.status == "executing")
        .await;
    client
        .publish_only(&c)
        .await
        .expect("published again while in flight");
    collector
        .wait_all(std::slice::from_ref(&id), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let events: Vec<_> = collector
        .events()
        .into_iter()
        .filter(|e| e.data.command_id.as_str() == id)
        .collect();
    assert_eq!(events.len(), 1, "one execution, one event: {events:?}");
    assert_eq!(env.sim.sim.call_count("createVolume"), 1);
    let row = env.operation(&id).await.expect("row");
    assert_eq!(row.attempts, 1);
}

#[tokio::test]
async fn status_shows_the_standby_role_and_readiness_stays_200() {
    // The standby's readiness does not depend on executing anything.
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let other = env.spawn_other().await;
    let mut body = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, b) = get_json_ok(other, "/ready").await;
        if status == 200 {
            body = b;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body["role"], "standby", "{body}");
    assert_eq!(body["components"]["broker_intake"], "idle");
    let (status, active) = get_json(env.http_addr, "/ready").await;
    assert_eq!(
        (status, active["role"].as_str()),
        (200, Some("active")),
        "{active}"
    );
}

/// One volume with a long queue does not stall the intake for every other volume: with
/// `MAX_CONCURRENT_OPERATIONS=2` (so two operations in hand would fill the old limit), 24
/// attach/detach commands queued on one volume do not hold up a create published after them.
#[tokio::test]
async fn a_long_queue_on_one_volume_does_not_stall_other_volumes() {
    let mut env = TestEnv::with_sim(sim(300)).await;
    env.extra_env
        .push(("MAX_CONCURRENT_OPERATIONS".into(), "2".into()));
    env.start_daemon().await;
    let collector = Collector::start(&env.prefix).await;
    let vm = VmId::new_random();
    env.sim.sim.add_vm(vm, "busy-vm");
    let volume = env.sim.sim.seed_volume("busy", 1 << 30);
    let client = env.client().await;
    let mut queued = Vec::new();
    for i in 0..24 {
        let c = if i % 2 == 0 {
            cmd::attach(volume, vm)
        } else {
            cmd::detach(volume)
        };
        client.publish_only(&c).await.expect("published");
        queued.push(c.command_id.to_string());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = cmd::create("not-behind-the-queue", "1GiB");
    let published = tokio::time::Instant::now();
    client.publish_only(&other).await.expect("published");

    collector
        .wait_all(&[other.command_id.to_string()], Duration::from_secs(30))
        .await;
    let waited = published.elapsed();
    let events = collector.wait_all(&queued, Duration::from_secs(60)).await;
    let busy_done = events
        .iter()
        .filter(|e| e.data.volume_id == Some(volume))
        .count();
    eprintln!("the create completed {waited:?} after it was published");
    assert!(
        waited < Duration::from_secs(3),
        "the create waited {waited:?} behind another volume's queue"
    );
    assert_eq!(busy_done, 24, "the busy volume's commands all ended");
}

/// `MAX_CONCURRENT_OPERATIONS` caps the jobs in flight at the cloud. From the simulator's
/// record of calls: a create's job is counted from its createVolume's arrival until the answer
/// to the last poll of that job (an upper bound on the time the cloud has it). With a cap of
/// 3 and 15 creates of 300 ms jobs published at once, the count never exceeds 3 and reaches it.
#[tokio::test]
async fn never_more_jobs_in_flight_at_the_cloud_than_max_concurrent_operations() {
    let mut env = TestEnv::with_sim(sim(300)).await;
    env.extra_env
        .push(("MAX_CONCURRENT_OPERATIONS".into(), "3".into()));
    env.start_daemon().await;
    let collector = Collector::start(&env.prefix).await;
    let client = env.client().await;
    let mut ids = Vec::new();
    for i in 0..15 {
        let c = cmd::create(&format!("capped-{i}"), "1GiB");
        client.publish_only(&c).await.expect("published");
        ids.push(c.command_id.to_string());
    }
    let events = collector.wait_all(&ids, Duration::from_secs(60)).await;
    assert!(
        events
            .iter()
            .all(|e| e.data.status == OperationStatus::Completed),
        "every create completed"
    );

    let calls = env.sim.sim.calls();
    // +1 at each createVolume's arrival, -1 at the answer to each job's last poll.
    let mut last_poll: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for c in calls.iter().filter(|c| c.command == "queryAsyncJobResult") {
        let job = c
            .params
            .get("jobid")
            .cloned()
            .expect("polls name their job");
        let at = last_poll.entry(job).or_insert(c.answered_at);
        *at = (*at).max(c.answered_at);
    }
    let mut steps: Vec<(chrono::DateTime<chrono::Utc>, i32)> = calls
        .iter()
        .filter(|c| c.command == "createVolume")
        .map(|c| (c.at, 1))
        .chain(last_poll.values().map(|at| (*at, -1)))
        .collect();
    // At the same instant an ending counts before a start (the permit is released first).
    steps.sort_by_key(|(at, step)| (*at, *step));
    let (mut now, mut peak) = (0, 0);
    for (_, step) in steps {
        now += step;
        peak = peak.max(now);
    }
    assert_eq!(last_poll.len(), 15, "each job polled");
    assert_eq!(
        peak, 3,
        "jobs in flight at the cloud at most (and at some point) the cap"
    );
}

/// M8: restarts while the executor is full never bring a valid command to the queue's delivery
/// limit. With two operations at a time and 8 s jobs, sixteen creates leave a recorded command
/// waiting for the executor and one sent ahead by the broker; the daemon is stopped (SIGTERM)
/// and started again seven times, more than `DELIVERY_LIMIT`. Each stop records and
/// acknowledges what it holds instead of returning it (each return counts against the limit):
/// nothing is dead-lettered and every create runs once.
#[tokio::test]
async fn restarts_with_a_full_executor_never_dead_letter_a_valid_command() {
    let mut env = TestEnv::with_sim(cloudstack_sim::SimConfig {
        job_latency: Duration::from_secs(8),
        ..cloudstack_sim::SimConfig::default()
    })
    .await;
    env.extra_env
        .push(("MAX_CONCURRENT_OPERATIONS".into(), "2".into()));
    env.start_daemon().await;
    let collector = crate::helpers::Collector::start(&env.prefix).await;
    let client = env.client().await;
    let creates: Vec<schema::Command> = (0..16)
        .map(|i| crate::helpers::cmd::create(&format!("behind-a-full-executor-{i}"), "1GiB"))
        .collect();
    for c in &creates {
        client.publish_only(c).await.expect("published");
    }
    let restarts = usize::try_from(schema::topology::DELIVERY_LIMIT).expect("limit") + 2;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let took = env.stop_daemon().await;
        let started = tokio::time::Instant::now();
        env.start_daemon().await;
        eprintln!("stop {took:?}, start {:?}", started.elapsed());
    }
    // The backlog then runs all at once.
    env.stop_daemon().await;
    env.extra_env
        .retain(|(k, _)| k.as_str() != "MAX_CONCURRENT_OPERATIONS");
    env.start_daemon().await;
    let ids: Vec<String> = creates.iter().map(|c| c.command_id.to_string()).collect();
    let waiting = tokio::time::Instant::now();
    let events = collector.wait_all(&ids, Duration::from_secs(180)).await;
    eprintln!("all ended {:?} after the last start", waiting.elapsed());
    assert!(
        events
            .iter()
            .all(|e| e.data.status == schema::OperationStatus::Completed),
        "{events:?}"
    );
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        16,
        "each create once"
    );
    let conn = lapin::Connection::connect(
        crate::helpers::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let dead = schema::Topology::new(env.prefix.clone()).dead_letter_queue();
    assert_eq!(
        crate::helpers::queue_depth(&ch, dead.as_str()).await,
        0,
        "a valid command was dead-lettered"
    );
}

/// The daemon's broker connections ask for frames of 32 KiB: lapin keeps 32 frames of receive
/// and of send buffer per connection, 8 MiB each at the broker's default of 128 KiB. (Messages
/// larger than a frame still pass: the dead-letter tests send 10 MiB ones through.)
#[tokio::test]
async fn the_daemons_broker_connections_use_32_kib_frames() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "client_properties",
            "frame_max",
            "--formatter",
            "json",
        ])
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        listed.status.success(),
        "rabbitmqctl list_connections failed"
    );
    let connections: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).expect("JSON");
    let ours: Vec<&serde_json::Value> = (connections.iter())
        .filter(|c| {
            let c = c.to_string();
            c.contains("volume-daemon intake") || c.contains("volume-daemon relay")
        })
        .collect();
    assert!(
        ours.len() >= 2,
        "the intake and relay connections: {connections:?}"
    );
    for c in &ours {
        assert_eq!(c["frame_max"], 32768, "{c}");
    }
}
