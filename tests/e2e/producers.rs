//! What producers and subscribers use: the publisher library, `volumectl`, the README's Python
//! example, and the published JSON Schemas checked against real messages.

use std::process::Stdio;
use std::time::Duration;

use cloudstack_sim::DEMO_VMS;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use publisher::{Error, Subscription, VolumeClient};
use schema::{Command, OperationStatus, Topology};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{AMQP_URL, EventTap, ReplyQueue, TestEnv, cmd, schema_validator, volumectl};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `volumectl` on this test's prefix; returns (exit code, stdout, stderr).
async fn run_volumectl(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    crate::helpers::run_volumectl(env, args).await
}

#[tokio::test]
async fn wait_returns_an_event_that_arrived_before_it_was_called() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let client = env.client().await;
    let command = Command::create("early-bird", "1GiB".parse().expect("size"));
    let id = command.command_id.to_string();

    let pending = client.publish(&command).await.expect("published");
    // The event has certainly left the daemon before `wait` is called.
    env.wait_for_operation(&id, WAIT, |r| r.status == "completed")
        .await;
    for _ in 0..100 {
        if env
            .outbox()
            .await
            .iter()
            .all(|(_, _, published)| *published)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let event = pending
        .wait(Duration::from_millis(500))
        .await
        .expect("the early event is there");
    assert_eq!(event.data.command_id.as_str(), id);
    assert_eq!(event.event_type, "volume.create.completed");
}

#[tokio::test]
async fn publishing_without_the_topology_says_so() {
    let env = TestEnv::new().await;
    let client = VolumeClient::connect(AMQP_URL, &env.prefix)
        .await
        .expect("connect");
    let err = client
        .publish_only(&Command::delete(schema::VolumeId::new_random()))
        .await
        .expect_err("no exchange");
    assert!(
        matches!(&err, Error::TopologyMissing { exchange } if *exchange == format!("{}.commands", env.prefix)),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("topology is not declared"),
        "{err}"
    );

    // With the exchanges but no queue bound, the mandatory flag makes it an error too.
    let client = VolumeClient::connect(AMQP_URL, &env.prefix)
        .await
        .expect("connect");
    let topology = Topology::new(env.prefix.clone());
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        topology.commands_exchange().as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("bare exchange");
    let err = client
        .publish_only(&Command::delete(schema::VolumeId::new_random()))
        .await
        .expect_err("unroutable");
    assert!(matches!(err, Error::Unroutable { .. }), "{err:?}");
}

#[tokio::test]
async fn a_subscriber_acknowledges_events_explicitly() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let client = env.client().await;
    let queue = format!("{}.test-subscriber", env.prefix);
    let sub = Subscription {
        queue: Some(queue.clone()),
        patterns: vec!["volume.create.*".into()],
        prefetch: 4,
    };
    let mut stream = client.subscribe(sub.clone()).await.expect("subscribe");
    let cmd = Command::create("subscribed", "1GiB".parse().expect("size"));
    client.publish_only(&cmd).await.expect("published");

    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("event");
    assert_eq!(first.event.data.command_id, cmd.command_id);
    assert!(!first.redelivered);
    let id = first.event.id;
    first.reject(true).await.expect("give it back");
    let again = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("event");
    assert_eq!(again.event.id, id, "the same event, recognisable by its id");
    assert!(again.redelivered);
    again.ack().await.expect("ack");
    drop(stream);
    // Nothing left in the durable queue once acknowledged.
    let mut stream = client.subscribe(sub).await.expect("subscribe again");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "acknowledged events do not come back"
    );
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn volumectl_commands_and_exit_codes() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[0].to_string();

    // create --wait: 0, the completed event.
    let (code, out, _) = run_volumectl(
        &env,
        &[
            "create", "--size", "1GiB", "--name", "ctl-0", "--wait", "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let event: schema::CloudEvent = serde_json::from_str(&out).expect("--json prints the event");
    assert_eq!(event.event_type, "volume.create.completed");
    let volume = event.data.volume_id.expect("volume").to_string();

    // attach / detach / delete, human output.
    let (code, out, _) = run_volumectl(
        &env,
        &["attach", "--volume", &volume, "--vm", &vm, "--wait"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("volume.attach.completed") && out.contains(&vm),
        "{out}"
    );
    let (code, out, _) = run_volumectl(&env, &["detach", "--volume", &volume, "--wait"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("volume.detach.completed"), "{out}");
    let (code, out, _) = run_volumectl(&env, &["delete", "--volume", &volume, "--wait"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("volume.delete.completed"), "{out}");

    // A failed operation: 1, with the code and the hint.
    let ghost = schema::VolumeId::new_random().to_string();
    let (code, out, _) =
        run_volumectl(&env, &["attach", "--volume", &ghost, "--vm", &vm, "--wait"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("VOLUME_NOT_FOUND") && out.contains("hint:"),
        "{out}"
    );

    // Usage errors: 2.
    assert_eq!(
        run_volumectl(&env, &["create", "--size", "0", "--wait"])
            .await
            .0,
        2
    );
    assert_eq!(
        run_volumectl(&env, &["create", "--size", "ten", "--wait"])
            .await
            .0,
        2
    );
    let (code, _, err) = run_volumectl(
        &env,
        &[
            "attach",
            "--volume",
            &ghost,
            "--vm",
            &vm,
            "--device-id",
            "3",
        ],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("CD-ROM"), "{err}");

    // Without --wait: the command id, at once. On a pipe: no spinner, no progress line.
    let (code, out, err) = run_volumectl(
        &env,
        &["create", "--size", "1GiB", "--command-id", "ctl-no-wait"],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ctl-no-wait"));
    assert!(err.is_empty(), "nothing on stderr on a pipe: {err:?}");
}

#[tokio::test]
async fn volumectl_times_out_with_exit_code_3() {
    // Topology, but no daemon.
    let env = TestEnv::new().await;
    let (code, _, err) = run_volumectl(
        &env,
        &["create", "--size", "1GiB", "--wait", "--timeout", "1"],
    )
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no terminal event"), "{err}");
}

#[tokio::test]
async fn volumectl_watch_prints_events_as_they_arrive() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut child = tokio::process::Command::new(volumectl())
        .env("AMQP_URL", AMQP_URL)
        .env("AMQP_PREFIX", &env.prefix)
        .args(["watch", "--type", "volume.create.*", "--json", "--max", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch runs");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .expect("in time")
        .expect("read");
    assert!(
        line.is_some_and(|l| l.starts_with("watching")),
        "watch says when it is bound"
    );

    let client = env.client().await;
    let a = cmd::create("watched-a", "1GiB");
    let b = cmd::create("watched-b", "1GiB");
    client.publish_only(&a).await.expect("a");
    client.publish_only(&b).await.expect("b");

    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("watch stops after --max 2")
        .expect("output");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<schema::CloudEvent>(l)
                .expect("JSON lines")
                .data
                .command_id
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{stdout}");
    assert!(ids.contains(&a.command_id.to_string()) && ids.contains(&b.command_id.to_string()));
}

#[tokio::test]
async fn volumectl_lists_and_replays_dead_letters() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    // A valid command that was dead-lettered (as after a delivery limit), and an invalid one.
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let good = cmd::create("replay-me", "1GiB")
        .with_command_id(schema::CommandId::parse("dl-good").expect("id"));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-rejection-reason".into(),
        AMQPValue::LongString(LongString::from("delivery limit reached")),
    );
    ch.basic_publish(
        topology.dead_letter_exchange().as_str().into(),
        "volume.create".into(),
        BasicPublishOptions::default(),
        good.to_body().to_string().as_bytes(),
        BasicProperties::default()
            .with_message_id("dl-good".into())
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let bad = br#"{"command_id": "dl-bad", "type": "create", "name": "x", "size": 0}"#;
    ch.basic_publish(
        topology.commands_exchange().as_str().into(),
        "volume.create".into(),
        BasicPublishOptions::default(),
        bad,
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");

    // Both listed, with their reasons (the invalid one once the daemon dead-lettered it).
    let mut listed = Vec::new();
    for _ in 0..100 {
        let (code, out, _) = run_volumectl(&env, &["dead-letters", "list", "--json"]).await;
        assert_eq!(code, 0);
        listed = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
            .collect();
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), 2, "{listed:?}");
    let reason = |id: &str| {
        listed
            .iter()
            .find(|l| l["id"] == id)
            .map(|l| l["reason"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(reason("dl-good").as_deref(), Some("delivery limit reached"));
    assert!(
        reason("dl-bad").is_some_and(|r| r.contains("size")),
        "{listed:?}"
    );

    // Replaying the valid one executes it; the other stays.
    let mut tap = EventTap::new(&env.prefix).await;
    let (code, out, _) = run_volumectl(&env, &["dead-letters", "replay", "--id", "dl-good"]).await;
    assert_eq!((code, out.trim()), (0, "replayed dl-good  volume.create"));
    let (_, event) = tap.expect("the replayed command's event", WAIT).await;
    assert_eq!(
        (event.data.command_id.as_str(), event.data.status),
        ("dl-good", OperationStatus::Completed)
    );
    let (_, out, _) = run_volumectl(&env, &["dead-letters", "list", "--json"]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(
        run_volumectl(&env, &["dead-letters", "replay", "--id", "nope"])
            .await
            .0,
        1
    );
}

/// L16: `volumectl dead-letters` holds one message at a time: listing, and a replay that looks
/// at every letter, of 12 dead letters of 8 MiB (96 MiB in all) each stay under half of that
/// in resident memory (`/usr/bin/time`'s maximum RSS), and the letters stay in the queue.
#[tokio::test]
async fn volumectl_reads_large_dead_letters_one_at_a_time() {
    const COUNT: usize = 12;
    const SIZE: usize = 8 << 20;
    let env = TestEnv::new().await;
    let (code, _, err) = run_volumectl(&env, &["dead-letters", "list"]).await;
    assert_eq!(code, 0, "the topology is declared: {err}");
    let topology = Topology::new(env.prefix.clone());
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..COUNT {
        let mut body =
            format!(r#"{{"command_id": "big-{i}", "type": "create", "name": ""#).into_bytes();
        body.resize(SIZE - 2, b'x');
        body.extend_from_slice(br#""}"#);
        ch.basic_publish(
            topology.dead_letter_exchange().as_str().into(),
            "volume.create".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_message_id(format!("big-{i}").into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let max_rss_kib = |args: &[&str]| {
        let report = env.sysfs.join("rss");
        let out = std::process::Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&report)
            .arg(volumectl())
            .args(args)
            .env("AMQP_URL", &env.client_amqp_url)
            .env("AMQP_PREFIX", &env.prefix)
            .stdin(Stdio::null())
            .output()
            .expect("/usr/bin/time runs volumectl");
        let rss: u64 = std::fs::read_to_string(&report)
            .expect("report")
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .parse()
            .expect("KiB");
        (
            out.status.code(),
            rss,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let limit_kib = (COUNT * SIZE / 2 / 1024) as u64;
    let (code, listing, out) = max_rss_kib(&["dead-letters", "list"]);
    assert_eq!(code, Some(0));
    let listed = out.lines().filter(|l| l.starts_with("big-")).count();
    assert_eq!(listed, COUNT, "{out:.2000}");
    // No letter has that id: the replay reads all 12 and publishes none (exit 1).
    let (code, replaying, _) = max_rss_kib(&["dead-letters", "replay", "--id", "big-none"]);
    assert_eq!(code, Some(1));
    println!("max RSS: list {listing} KiB, replay scan {replaying} KiB, limit {limit_kib} KiB");
    assert!(listing < limit_kib, "list held {listing} KiB");
    assert!(replaying < limit_kib, "replay held {replaying} KiB");
    let (_, out, _) = run_volumectl(&env, &["dead-letters", "list"]).await;
    assert_eq!(
        out.lines().filter(|l| l.starts_with("big-")).count(),
        COUNT,
        "the letters stay in the queue"
    );
}

#[tokio::test]
async fn the_readme_python_example_prints_the_completed_event() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let volume = env.sim.sim.seed_volume("from-python", 1 << 30);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let block = readme
        .split("<!-- python-example -->")
        .nth(1)
        .and_then(|rest| rest.split("```python\n").nth(1))
        .and_then(|code| code.split("\n```").next())
        .expect("the README has the Python example");
    let script = env.sysfs.join("example.py");
    std::fs::write(&script, block).expect("script");
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import pika"])
        .output()
        .await;
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with pika is needed (scripts/test installs it): {probe:?}"
    );

    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("AMQP_URL", AMQP_URL)
        .env("AMQP_PREFIX", &env.prefix)
        .env("VOLUME_ID", volume.to_string())
        .env("VM_ID", DEMO_VMS[1].to_string())
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let event: schema::CloudEvent = serde_json::from_str(&stdout).expect("it prints the event");
    assert_eq!(event.event_type, "volume.attach.completed");
    assert_eq!(event.data.volume_id, Some(volume));
    assert_eq!(
        env.sim.sim.attachment(volume).map(|a| a.0),
        Some(DEMO_VMS[1])
    );
}

#[tokio::test]
async fn the_published_schemas_validate_real_commands_and_events() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let mut commands = EventTap::bound(&env.prefix, &topology.commands_exchange(), "#").await;
    let mut events = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let vm = DEMO_VMS[0];

    let created = client
        .publish(&cmd::create("schema-check", "1GiB").with_metadata("k", "v"))
        .await
        .expect("p")
        .wait(WAIT)
        .await
        .expect("e");
    let volume = created.data.volume_id.expect("volume");
    for c in [
        schema::command::AttachVolume::new(volume, vm)
            .device_id(2)
            .map(Command::from)
            .expect("attach"),
        cmd::detach(volume),
        cmd::delete(volume),
        cmd::attach(volume, vm), // fails: VOLUME_NOT_FOUND
    ] {
        env.execute(&c).await;
    }

    let (command_schema, event_schema) = (
        schema_validator("command.schema.json"),
        schema_validator("event.schema.json"),
    );
    let mut checked = (0, 0);
    while let Some((_, body)) = commands.next_raw(Duration::from_millis(500)).await {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("command JSON");
        let errors: Vec<String> = command_schema
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{v}: {errors:?}");
        checked.0 += 1;
    }
    while let Some((_, body)) = events.next_raw(Duration::from_millis(500)).await {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("event JSON");
        let errors: Vec<String> = event_schema
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{v}: {errors:?}");
        checked.1 += 1;
    }
    assert_eq!(
        checked,
        (5, 5),
        "five commands and five events were captured and checked"
    );
    // The schemas do reject what the daemon rejects.
    assert!(!command_schema.is_valid(
        &serde_json::json!({"command_id": "x", "type": "create", "name": "n", "size": 0})
    ));
    assert!(!command_schema.is_valid(&serde_json::json!({"command_id": "x", "type": "attach", "volume_id": volume, "vm_id": vm, "device_id": 3})));
}

#[tokio::test]
async fn volumectl_shows_elapsed_time_while_waiting_on_a_terminal() {
    let mut env = TestEnv::with_sim(cloudstack_sim::SimConfig {
        job_latency: Duration::from_millis(1200),
        ..Default::default()
    })
    .await;
    env.start_daemon().await;
    // `script` gives volumectl a pseudo-terminal; its output is what a person would see.
    let command = format!("{} create --size 1GiB --wait", volumectl().display());
    let out = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AMQP_URL", AMQP_URL)
        .env("AMQP_PREFIX", &env.prefix)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("script (util-linux) runs");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("waiting for create"),
        "a spinner on a terminal: {screen:?}"
    );
    // Elapsed times like `0.3s`, in the order printed: they must show progress.
    let readings: Vec<f64> = screen
        .split("waiting for create")
        .skip(1)
        .filter_map(|frame| {
            frame
                .split_whitespace()
                .find(|w| w.ends_with('s') && w.contains('.'))
        })
        .filter_map(|w| w.trim_end_matches('s').parse().ok())
        .collect();
    assert!(
        readings.len() >= 2
            && readings.windows(2).all(|w| w[0] <= w[1])
            && readings.last() > readings.first(),
        "elapsed time shown and growing: {readings:?} in {screen:?}"
    );
    assert!(screen.contains("volume.create.completed"), "{screen:?}");
}

#[tokio::test]
async fn a_command_with_reply_to_also_gets_its_event_in_that_queue() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut reply = ReplyQueue::new().await;
    let command = cmd::create("with-reply", "1GiB").with_reply_to(&reply.name);

    let event = env.execute(&command).await;

    let (props, replied) = reply.expect("the create's event", WAIT).await;
    assert_eq!(replied, event, "the same event, also in the reply_to queue");
    assert_eq!(
        props.message_id().as_ref().map(|m| m.to_string()),
        Some(event.id.to_string())
    );

    // A duplicate of the ended command with a reply queue of its own gets the event there too.
    let mut second = ReplyQueue::new().await;
    let duplicate = command.clone().with_reply_to(&second.name);
    env.client()
        .await
        .publish_only(&duplicate)
        .await
        .expect("duplicate published");
    let (_, again) = second.expect("the duplicate's replay", WAIT).await;
    assert_eq!(again.id, event.id, "the same event, replayed");
    assert!(
        reply.is_silent(Duration::from_millis(500)).await,
        "the replay answers the duplicate, not the first command's queue"
    );
}

/// Strings AMQP cannot carry (over 255 bytes) are errors naming what was too long, never panics.
#[tokio::test]
async fn strings_over_255_bytes_are_errors_not_panics() {
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let client = VolumeClient::connect(AMQP_URL, &prefix)
        .await
        .expect("broker");
    let long = "c".repeat(300);

    let command = cmd::create("long-corr", "1GiB").with_correlation_id(long.clone());
    let err = client.publish_only(&command).await.expect_err("too long");
    assert!(
        matches!(&err, Error::TooLong { what, len: 300 } if what.contains("correlation id")),
        "{err}"
    );
    let command = cmd::create("long-reply", "1GiB").with_reply_to(long.clone());
    let err = client.publish_only(&command).await.expect_err("too long");
    assert!(
        matches!(&err, Error::TooLong { what, .. } if what.contains("reply_to")),
        "{err}"
    );

    let sub = Subscription {
        patterns: vec![long.clone()],
        ..Subscription::default()
    };
    let err = client.subscribe(sub).await.expect_err("too long");
    assert!(
        matches!(&err, Error::TooLong { what, .. } if what.contains("pattern")),
        "{err}"
    );
    let sub = Subscription {
        queue: Some(long.clone()),
        ..Subscription::default()
    };
    let err = client.subscribe(sub).await.expect_err("too long");
    assert!(
        matches!(&err, Error::TooLong { what, .. } if what.contains("queue")),
        "{err}"
    );

    let err = VolumeClient::connect(AMQP_URL, &long)
        .await
        .expect_err("prefix too long");
    assert!(err.to_string().contains("prefix"), "{err}");
}
