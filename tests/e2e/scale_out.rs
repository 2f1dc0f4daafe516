//! Scale-out on the real engines: a 3-node RabbitMQ cluster of the test's own (started once,
//! see `cluster.rs`), several appliances on it and on one database server, each with its own
//! prefix, host VM, sysfs root, simulator and database. And, on the machine's own broker, an
//! `AMQP_URL` list whose first address is dead, and a database that belongs to another
//! appliance.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use cloudstack_sim::SimConfig;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use schema::{CloudEvent, Command, Topology, VmId, VolumeId};

use crate::cluster::{RabbitCluster, ctl};
use crate::helpers::{AMQP_URL, TestEnv, cmd, get_json, run_volumectl};

const ALL_DONE: Duration = Duration::from_secs(120);

/// Acceptance 1 and 3 (the leader of the commands queue stops under load; `volumectl` with
/// the stopped node first in its list), then acceptance 2 (three appliances on the cluster),
/// on one cluster: starting one takes half a minute.
#[tokio::test]
async fn appliances_on_a_three_node_cluster_survive_the_commands_leader_stopping() {
    let cluster = RabbitCluster::start(3).await;
    the_commands_queue_leader_stops_under_load(&cluster).await;
    three_appliances_share_the_cluster_and_the_database_server(&cluster).await;
}

/// 200 commands (50 creates; 50 seeded volumes each attached, detached and deleted) while
/// the node leading the commands queue (the daemon's first address) is stopped and restarted.
async fn the_commands_queue_leader_stops_under_load(cluster: &RabbitCluster) {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(150),
        ..SimConfig::default()
    })
    .await;
    let vms = add_vms(&env, 10);
    let topology = Topology::new(env.prefix.clone());
    // Declared through node 0; which node leads is read back, not assumed.
    let admin = Connection::connect(&cluster.nodes[0].url(), ConnectionProperties::default())
        .await
        .expect("cluster node 0");
    let ch = admin.create_channel().await.expect("channel");
    schema::amqp::declare(&ch, &topology)
        .await
        .expect("topology");
    // Both quorum queues of the contract are replicated on every node.
    for queue in [topology.dead_letter_queue(), topology.commands_queue()] {
        let (_, members) = cluster.leader_and_members(0, &queue).await;
        assert_eq!(members.len(), 3, "{queue} on every node: {members:?}");
    }
    let (leader, _) = cluster
        .leader_and_members(0, &topology.commands_queue())
        .await;
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let leader_first = cluster.urls(&[leader, others[0], others[1]]);
    env.daemon_amqp_url = leader_first.clone();
    env.client_amqp_url = cluster.urls(&[others[0], others[1], leader]);
    let events_queue = format!("{}.test-events", env.prefix);
    declare_event_queue(&cluster.nodes[others[0]].url(), &topology, &events_queue).await;
    env.start_daemon().await;

    let commands = mixed_commands(&env, &vms, "fo");
    let client = env.client().await;
    for c in &commands {
        client.publish_only(c).await.expect("published");
    }
    wait_ended(&mut env, 50, ALL_DONE).await;
    let stopped_at = chrono::Utc::now();
    ctl(&cluster.nodes[leader].name, &["stop_app"])
        .await
        .expect("stop_app");

    // Acceptance 3: volumectl publishes through a list whose first address is down.
    let (code, out, err) = run_volumectl(
        &env,
        &[
            "--amqp-url",
            &leader_first,
            "create",
            "--name",
            "from-volumectl",
            "--size",
            "1GiB",
            "--wait",
        ],
    )
    .await;
    assert_eq!(code, 0, "volumectl with the stopped node first: {out}{err}");
    assert!(out.contains("volume.create.completed"), "{out}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    ctl(&cluster.nodes[leader].name, &["start_app"])
        .await
        .expect("start_app");
    cluster.nodes[leader]
        .await_startup(Duration::from_secs(60))
        .await;
    wait_ended(&mut env, commands.len() + 1, ALL_DONE).await;

    let (reconnected, from_loss) = reconnect_after(&env.daemon_log(), stopped_at);
    eprintln!(
        "the daemon consumed commands again {reconnected:?} after `stop_app` of the leader node began ({from_loss:?} after its intake saw the connection close)"
    );
    // The daemon's own share is measured from the moment its connection closed: how long
    // `stop_app` takes to close connections is the broker's (seen here: 0.4 s alone, 5.7 s with
    // the rest of the suite loading both cores).
    assert!(
        from_loss < Duration::from_secs(5),
        "reconnected {from_loss:?} after the connection closed"
    );
    assert!(
        reconnected < Duration::from_secs(15),
        "reconnected after {reconnected:?}"
    );
    every_command_ended_once(
        &mut env,
        &commands,
        &cluster.nodes[others[0]].url(),
        &events_queue,
    )
    .await;
}

fn add_vms(env: &TestEnv, n: usize) -> Vec<VmId> {
    (0..n)
        .map(|i| {
            let vm = VmId::new_random();
            env.sim.sim.add_vm(vm, &format!("scale-vm-{i}"));
            vm
        })
        .collect()
}

/// 50 creates and, for 50 seeded volumes, attach (to one of `vms`), detach and delete; the
/// command ids start with `tag`.
fn mixed_commands(env: &TestEnv, vms: &[VmId], tag: &str) -> Vec<Command> {
    let mut commands = Vec::new();
    for i in 0..50 {
        let volume = env
            .sim
            .sim
            .seed_volume(&format!("{tag}-seeded-{i}"), 1 << 30);
        commands.push(cmd::create(&format!("{tag}-create-{i}"), "1GiB"));
        commands.push(cmd::attach(volume, vms[i % vms.len()]));
        commands.push(cmd::detach(volume));
        commands.push(cmd::delete(volume));
    }
    commands
}

/// A durable quorum queue of the test's, bound to every event: it outlives any one node.
async fn declare_event_queue(url: &str, topology: &Topology, queue: &str) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("cluster node");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .expect("event queue");
    ch.queue_bind(
        queue.into(),
        topology.events_exchange().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "".into()).await;
}

/// Waits until at least `n` operations ended.
async fn wait_ended(env: &mut TestEnv, n: usize, within: Duration) {
    let start = Instant::now();
    loop {
        let statuses = env.statuses().await;
        let ended = statuses
            .values()
            .filter(|s| matches!(s.as_str(), "completed" | "failed" | "cancelled"))
            .count();
        if ended >= n {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{ended} of {n} operations ended within {within:?}\n{}",
            env.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// From `stopped_at` (the test ran `stop_app`) to the first "consuming commands" after the
/// intake lost the broker, and the part of it from losing the broker to consuming again.
fn reconnect_after(log: &str, stopped_at: chrono::DateTime<chrono::Utc>) -> (Duration, Duration) {
    let lines: Vec<(chrono::DateTime<chrono::Utc>, String)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let at = v["timestamp"].as_str()?.parse().ok()?;
            Some((at, v["message"].as_str()?.to_owned()))
        })
        .filter(|(at, _)| *at >= stopped_at)
        .collect();
    let lost = lines
        .iter()
        .position(|(_, m)| m.starts_with("intake lost the broker"))
        .unwrap_or_else(|| panic!("the intake never lost the broker after {stopped_at}:\n{log}"));
    let (at, _) = lines[lost..]
        .iter()
        .find(|(_, m)| m == "consuming commands")
        .unwrap_or_else(|| panic!("the intake never consumed again:\n{log}"));
    let since = |t: chrono::DateTime<chrono::Utc>| (*at - t).to_std().unwrap_or_default();
    (since(stopped_at), since(lines[lost].0))
}

/// Every command completed, its event reached the test's queue (each copy with the same event
/// id), and CloudStack saw each change once.
async fn every_command_ended_once(
    env: &mut TestEnv,
    commands: &[Command],
    url: &str,
    events_queue: &str,
) {
    let statuses = env.statuses().await;
    for c in commands {
        assert_eq!(
            statuses.get(c.command_id.as_str()).map(String::as_str),
            Some("completed"),
            "{}",
            c.command_id
        );
    }
    let events = drain(url, events_queue).await;
    let mut ids: HashMap<String, BTreeSet<String>> = HashMap::new();
    for e in &events {
        ids.entry(e.data.command_id.to_string())
            .or_default()
            .insert(e.id.to_string());
    }
    for c in commands {
        let got = ids.get(c.command_id.as_str()).map(BTreeSet::len);
        assert_eq!(got, Some(1), "event ids of {}", c.command_id);
    }
    eprintln!(
        "{} events for {} operations ({} re-published copies)",
        events.len(),
        ids.len(),
        events.len() - ids.len()
    );
    // CloudStack: one createVolume per name, one attach, detach and delete per volume.
    let mut calls: BTreeMap<(String, String), usize> = BTreeMap::new();
    for call in env.sim.sim.calls() {
        let command = call.command.to_lowercase();
        if cloudstack_sim::faults::is_mutating(&command) && call.status == 200 {
            let key = call.params.get("name").or(call.params.get("id")).cloned();
            *calls
                .entry((call.command, key.unwrap_or_default()))
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "CloudStack side effects more than once: {twice:?}"
    );
    assert_eq!(calls.len(), 201, "{calls:?}");
}

/// Every message of `queue` (then deletes it).
async fn drain(url: &str, queue: &str) -> Vec<CloudEvent> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("cluster node");
    let ch = conn.create_channel().await.expect("channel");
    let mut events = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        events.push(serde_json::from_slice(&m.delivery.data).expect("an event"));
    }
    let _ = ch.queue_delete(queue.into(), Default::default()).await;
    let _ = conn.close(200, "".into()).await;
    events
}

/// Acceptance 2: three appliances, 100 commands each published interleaved, one appliance's
/// active killed midway.
async fn three_appliances_share_the_cluster_and_the_database_server(cluster: &RabbitCluster) {
    let mut appliances = Vec::new();
    for i in 0..3 {
        let mut env = TestEnv::with_host_vm(SimConfig {
            job_latency: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
        let order: Vec<usize> = (0..3).map(|n| (n + i) % 3).collect();
        env.daemon_amqp_url = cluster.urls(&order);
        env.client_amqp_url = cluster.urls(&order);
        env.start_daemon().await;
        let standby = env.spawn_other().await;
        appliances.push((env, standby));
    }
    let mut epochs = Vec::new();
    for (env, _) in &mut appliances {
        epochs.push(lease_epoch(env).await);
    }
    let scripts: Vec<Vec<Command>> = appliances
        .iter()
        .enumerate()
        .map(|(i, (env, _))| appliance_commands(env, &format!("ap{i}")))
        .collect();
    let clients = futures_util::future::join_all(appliances.iter().map(|(e, _)| e.client())).await;
    let first_half = scripts[0].len() / 2;
    for n in 0..scripts[0].len() {
        if n == first_half {
            appliances[0].0.kill_daemon().await; // appliance 0's active, mid-stream
        }
        for (client, script) in clients.iter().zip(&scripts) {
            client.publish_only(&script[n]).await.expect("published");
        }
    }
    for ((env, _), script) in appliances.iter_mut().zip(&scripts) {
        wait_ended(env, script.len(), ALL_DONE).await;
    }
    for (i, ((env, standby), script)) in appliances.iter_mut().zip(&scripts).enumerate() {
        an_appliance_kept_to_itself(env, *standby, script, i == 0).await;
        // Leases are independent: only the killed appliance's changed hands.
        let epoch = lease_epoch(env).await;
        assert_eq!(
            epoch == epochs[i],
            i != 0,
            "appliance {i}: lease epoch {} → {epoch}",
            epochs[i]
        );
    }
}

async fn lease_epoch(env: &mut TestEnv) -> u64 {
    let pool = env.db().await;
    sqlx::query_scalar("SELECT epoch FROM execution_lease")
        .fetch_one(&pool)
        .await
        .expect("the lease row")
}

/// 100 commands: 50 creates; 20 seeded volumes attached (5 to the host VM, which stay, and 15
/// to five other VMs, which are then detached and deleted; the simulator's VMs take 6 data
/// disks). Command ids start with `tag`.
fn appliance_commands(env: &TestEnv, tag: &str) -> Vec<Command> {
    let host = env.host_vm.expect("host VM");
    let remote = add_vms(env, 5);
    let mut commands = Vec::new();
    for i in 0..20 {
        let volume = env
            .sim
            .sim
            .seed_volume(&format!("{tag}-seeded-{i}"), 1 << 30);
        let vm = if i < 5 { host } else { remote[i % 5] };
        commands.push(tagged(cmd::attach(volume, vm), tag));
        if i >= 5 {
            commands.push(tagged(cmd::detach(volume), tag));
            commands.push(tagged(cmd::delete(volume), tag));
        }
    }
    for i in 0..50 {
        let at = (i * 7) % (commands.len() + 1);
        commands.insert(
            at,
            tagged(cmd::create(&format!("{tag}-create-{i}"), "1GiB"), tag),
        );
    }
    assert_eq!(commands.len(), 100);
    commands
}

fn tagged(c: Command, tag: &str) -> Command {
    let id = format!("{tag}-{}", c.command_id);
    c.with_command_id(schema::CommandId::parse(&id).expect("id"))
}

/// An appliance's database holds its own 100 operations only, all completed; its simulator saw
/// only its own volumes; its host attachments are its own sysfs's devices; and (except for the
/// appliance whose active was killed) its active and standby kept their roles.
async fn an_appliance_kept_to_itself(
    env: &mut TestEnv,
    standby: std::net::SocketAddr,
    script: &[Command],
    killed: bool,
) {
    let tag = script[0]
        .command_id
        .as_str()
        .split('-')
        .next()
        .unwrap_or_default()
        .to_owned();
    let statuses = env.statuses().await;
    assert_eq!(
        statuses.len(),
        script.len(),
        "{tag}: operations in its database"
    );
    for c in script {
        if statuses.get(c.command_id.as_str()).map(String::as_str) != Some("completed") {
            let row = env.operation(c.command_id.as_str()).await;
            panic!(
                "{tag}: {} did not complete: {row:?}\n{}",
                c.command_id,
                env.daemon_log()
            );
        }
    }
    for call in env.sim.sim.calls() {
        if call.command.eq_ignore_ascii_case("createvolume") {
            let name = call.params.get("name").cloned().unwrap_or_default();
            assert!(
                name.starts_with(&format!("{tag}-")),
                "{tag}'s cloud created {name}"
            );
        }
    }
    let host = env.host_vm.expect("host VM");
    let mappings = env.mappings().await;
    let on_host: Vec<_> = mappings
        .iter()
        .filter(|(_, m)| m.vm_id == host.to_string())
        .collect();
    assert_eq!(on_host.len(), 5, "{tag}: host mappings {mappings:?}");
    for (volume, m) in on_host {
        let volume: VolumeId = volume.parse().expect("volume id");
        let device = env
            .sim
            .sim
            .device_name(volume)
            .expect("a device in its sysfs");
        assert_eq!(
            m.device_path.as_deref(),
            Some(format!("/dev/{device}").as_str()),
            "{tag}"
        );
        let serial = std::fs::read_to_string(env.sysfs.join("block").join(&device).join("serial"))
            .expect("serial in its own sysfs");
        assert_eq!(serial.trim(), volume.disk_serial(), "{tag}");
    }
    let (_, ready) = get_json(standby, "/ready").await;
    if killed {
        assert_eq!(
            ready["role"], "active",
            "{tag}: the standby took over: {ready}"
        );
    } else {
        let (_, first) = get_json(env.http_addr, "/ready").await;
        assert_eq!(first["role"], "active", "{tag}: {first}");
        assert_eq!(ready["role"], "standby", "{tag}: {ready}");
    }
}

/// `AMQP_URL` with a dead address first: the daemon gets ready on the second.
#[tokio::test]
async fn a_daemon_whose_first_broker_address_is_dead_uses_the_next() {
    let mut env = TestEnv::new().await;
    env.daemon_amqp_url = format!("amqp://guest:secret@127.0.0.1:1/%2f,{AMQP_URL}");
    env.start_daemon().await;
    let event = env.execute(&cmd::create("second-address", "1GiB")).await;
    assert_eq!(event.event_type, "volume.create.completed");
    let log = env.daemon_log();
    assert!(log.contains("connected to a later broker address"), "{log}");
    assert!(
        log.contains("127.0.0.1:1") && !log.contains(":secret@"),
        "{log}"
    );
}

/// A daemon of another appliance (another prefix) on a database in use refuses to start, and
/// says whose database it is.
#[tokio::test]
async fn a_daemon_refuses_a_database_that_belongs_to_another_appliance() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .env("AMQP_PREFIX", format!("{}x", env.prefix))
        .env("DATABASE_URL", env.database_url())
        .env("HTTP_ADDR", "127.0.0.1:0")
        // The test's own directories: nothing may be left in the machine's /run.
        .env("SYSFS_ROOT", &env.sysfs)
        .env("PERSISTENT_DEVICE_DIR", env.sysfs.join("persistent"))
        .env("CLOUDSTACK_API_URL", env.sim.api_url())
        .env("CLOUDSTACK_API_KEY", "k")
        .env("CLOUDSTACK_SECRET_KEY", "s")
        .output()
        .await
        .expect("volume-daemon runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains("belongs to another appliance")
            && stderr.contains(&format!("AMQP_PREFIX={:?}", env.prefix))
            && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
    // The appliance that owns it runs on.
    let event = env.execute(&cmd::create("still-mine", "1GiB")).await;
    assert_eq!(event.event_type, "volume.create.completed");
}
