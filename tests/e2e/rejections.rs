//! Messages that are not valid commands: dead-lettered with their reason, answered with
//! INVALID_COMMAND when a command id can be read, and the daemon keeps running.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use schema::{ErrorCode, EventOpType, Topology};

use crate::helpers::{AMQP_URL, EventTap, ReplyQueue, TestEnv, queue_depth};

const WAIT: Duration = Duration::from_secs(10);

/// Publishes raw bytes to the commands exchange, with confirms.
struct RawPublisher {
    _conn: Connection,
    channel: lapin::Channel,
    exchange: String,
}

impl RawPublisher {
    async fn new(prefix: &str) -> Self {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("broker");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self {
            _conn: conn,
            channel,
            exchange: Topology::new(prefix).commands_exchange(),
        }
    }

    async fn publish(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(m) = message_id {
            props = props.with_message_id(m.into());
        }
        self.publish_with(routing_key, body, props).await;
    }

    async fn publish_with(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
}

pub(crate) async fn publish_raw(
    prefix: &str,
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
) {
    RawPublisher::new(prefix)
        .await
        .publish(routing_key, body, message_id)
        .await;
}

#[tokio::test]
async fn invalid_commands_are_dead_lettered_with_their_reason_and_answered() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let mut events = EventTap::new(&env.prefix).await;
    let mut dead = EventTap::bound(&env.prefix, &topology.dead_letter_exchange(), "").await;

    // Not JSON, no id to answer to.
    publish_raw(&env.prefix, "volume.create", b"definitely not json", None).await;
    let (props, body) = dead
        .next_raw(Duration::from_secs(10))
        .await
        .expect("dead-lettered");
    assert_eq!(body, b"definitely not json");
    let reason = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-rejection-reason").cloned())
        .expect("reason header");
    let AMQPValue::LongString(reason) = reason else {
        panic!("reason is {reason:?}")
    };
    assert!(reason.to_string().contains("not JSON"), "{reason}");

    // A readable command id with a bad size: dead-lettered and answered.
    let body = br#"{"command_id": "bad-size-1", "type": "create", "name": "x", "size": 0}"#;
    publish_raw(&env.prefix, "volume.create", body, None).await;
    let (_, event) = events
        .expect("an INVALID_COMMAND event", Duration::from_secs(10))
        .await;
    assert_eq!(event.event_type, "volume.create.failed");
    assert_eq!(event.data.command_id.as_str(), "bad-size-1");
    let error = event.data.error.expect("error");
    assert_eq!(error.code, ErrorCode::InvalidCommand);
    assert!(error.message.contains("size"), "{}", error.message);
    assert!(
        dead.next_raw(Duration::from_secs(10)).await.is_some(),
        "also dead-lettered"
    );

    // Nothing was executed or recorded, and the daemon is still ready.
    assert!(env.operation("bad-size-1").await.is_none());
    assert_eq!(env.sim.sim.call_count("createVolume"), 0);
    let (status, _) = env.get_json("/ready").await;
    assert_eq!(status, 200);
}

/// docs/wire.md (processing rule 3): a dead-lettered copy keeps the producer's headers and properties, as
/// the broker's own dead-lettering would (its `user_id` aside), with the reason added; headers
/// over the bound are dropped from the copy and the reason names them.
#[tokio::test]
async fn a_dead_lettered_message_keeps_the_producers_headers_and_gains_the_reason() {
    use lapin::types::{FieldTable, LongString, ShortString};
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let mut dead = EventTap::bound(&env.prefix, &topology.dead_letter_exchange(), "").await;
    let publisher = RawPublisher::new(&env.prefix).await;
    let header = |h: &FieldTable, name: &str| h.inner().get(name).cloned();

    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-producer-tag"),
        AMQPValue::LongString(LongString::from("tag-42")),
    );
    headers.insert(ShortString::from("x-attempt"), AMQPValue::LongInt(3));
    // A producer cannot forge the daemon's reason.
    headers.insert(
        ShortString::from("x-rejection-reason"),
        AMQPValue::LongString(LongString::from("forged")),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_app_id("billing".into())
        .with_message_id("m-1".into())
        .with_priority(3)
        .with_headers(headers);
    publisher
        .publish_with("volume.create", b"not json at all", props)
        .await;
    let (props, body) = dead.next_raw(WAIT).await.expect("dead-lettered");
    assert_eq!(body, b"not json at all");
    let h = props.headers().clone().expect("headers");
    assert_eq!(
        header(&h, "x-producer-tag"),
        Some(AMQPValue::LongString(LongString::from("tag-42")))
    );
    assert_eq!(header(&h, "x-attempt"), Some(AMQPValue::LongInt(3)));
    let Some(AMQPValue::LongString(reason)) = header(&h, "x-rejection-reason") else {
        panic!("reason: {h:?}")
    };
    assert!(reason.to_string().contains("not JSON"), "{reason}");
    assert!(header(&h, "x-original-routing-key").is_some());
    assert_eq!(props.app_id().as_ref().map(|a| a.as_str()), Some("billing"));
    assert_eq!(props.message_id().as_ref().map(|a| a.as_str()), Some("m-1"));
    assert_eq!(*props.priority(), Some(3));

    // Over the bound: the small header is kept, the 20 KiB one dropped and named.
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-small"),
        AMQPValue::LongString(LongString::from("kept")),
    );
    headers.insert(
        ShortString::from("x-huge"),
        AMQPValue::LongString(LongString::from("h".repeat(20 * 1024))),
    );
    let props = BasicProperties::default().with_headers(headers);
    publisher
        .publish_with("volume.create", b"still not json", props)
        .await;
    let (props, _) = dead.next_raw(WAIT).await.expect("dead-lettered");
    let h = props.headers().clone().expect("headers");
    assert_eq!(
        header(&h, "x-small"),
        Some(AMQPValue::LongString(LongString::from("kept")))
    );
    assert_eq!(header(&h, "x-huge"), None, "over the bound: dropped");
    let Some(AMQPValue::LongString(reason)) = header(&h, "x-rejection-reason") else {
        panic!("reason: {h:?}")
    };
    assert!(
        reason
            .to_string()
            .contains("were dropped from this copy: x-huge"),
        "{reason}"
    );
}

/// docs/wire.md (processing rule 3): a readable command id with a type known neither from the body nor from
/// the routing key is still answered, as `volume.unknown.failed`, also to its `reply_to`.
#[tokio::test]
async fn an_unknown_type_is_dead_lettered_and_answered_as_volume_unknown_failed() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let mut events = EventTap::new(&env.prefix).await;
    let mut dead = EventTap::bound(&env.prefix, &topology.dead_letter_exchange(), "").await;
    let mut reply = ReplyQueue::new().await;

    let body = br#"{"command_id": "frob-1", "type": "frobnicate", "volume_id": "x"}"#;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(reply.name.as_str().into());
    RawPublisher::new(&env.prefix)
        .await
        .publish_with("volume.frobnicate", body, props)
        .await;

    let (props, body) = dead.next_raw(WAIT).await.expect("dead-lettered");
    assert!(body.starts_with(br#"{"command_id": "frob-1""#));
    let Some(AMQPValue::LongString(reason)) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-rejection-reason").cloned())
    else {
        panic!("no reason header: {props:?}")
    };
    assert!(reason.to_string().contains("frobnicate"), "{reason}");

    let (props, event) = events.expect("volume.unknown.failed", WAIT).await;
    assert_eq!(event.event_type, "volume.unknown.failed");
    assert_eq!(
        props.kind().as_ref().map(|k| k.as_str()),
        Some("volume.unknown.failed")
    );
    assert_eq!(event.data.op_type, EventOpType::Unknown);
    assert_eq!(event.data.command_id.as_str(), "frob-1");
    assert_eq!(event.data.correlation_id, "frob-1");
    let error = event.data.error.clone().expect("error");
    assert_eq!(error.code, ErrorCode::InvalidCommand);
    assert!(!error.retryable);

    let (_, replied) = reply.expect("the event in the reply_to queue", WAIT).await;
    assert_eq!(replied, event);
    assert!(env.operation("frob-1").await.is_none(), "not an operation");
}

/// One malformed message: routing key, body, AMQP message id, and whether the daemon can answer
/// it with an INVALID_COMMAND event (a readable command id and a known type).
struct Bad {
    key: &'static str,
    body: Vec<u8>,
    message_id: Option<String>,
    answerable: bool,
}

fn malformed(i: usize) -> Bad {
    let id = format!("bad-{i}");
    let vol = "3106013a-e175-423e-a090-1234567890ab";
    let vm = "9a8b7c6d-0000-4000-8000-000000000001";
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let (key, body, message_id, answerable) = match i % 17 {
        0 => (
            "volume.create",
            b"definitely not json {".to_vec(),
            None,
            false,
        ),
        1 => ("volume.create", b"[1, 2, 3]".to_vec(), None, false),
        2 => ("volume.create", b"\"create\"".to_vec(), None, false),
        3 => ("volume.create", Vec::new(), None, false),
        4 => {
            let pad = "x".repeat(70 * 1024);
            (
                "volume.create",
                json(
                    serde_json::json!({"command_id": id, "type": "create", "name": "n", "size": 1, "pad": pad}),
                ),
                None,
                false,
            )
        }
        5 => (
            "volume.create",
            json(serde_json::json!({"type": "create", "name": "n", "size": 1})),
            None,
            false,
        ),
        6 => (
            "volume.create",
            json(
                serde_json::json!({"command_id": "has spaces", "type": "create", "name": "n", "size": 1}),
            ),
            None,
            false,
        ),
        7 => (
            "volume.grow",
            json(serde_json::json!({"command_id": id, "type": "grow", "volume_id": vol})),
            None,
            true,
        ),
        8 => (
            "volume.create",
            json(
                serde_json::json!({"command_id": id, "type": "create", "name": "n", "size": "10GiB"}),
            ),
            None,
            true,
        ),
        9 => (
            "volume.create",
            json(serde_json::json!({"command_id": id, "type": "create", "name": "n", "size": -5})),
            None,
            true,
        ),
        10 => (
            "volume.create",
            json(serde_json::json!({"command_id": id, "type": "create", "name": "n", "size": 0})),
            None,
            true,
        ),
        11 => (
            "volume.attach",
            json(serde_json::json!({"command_id": id, "type": "attach", "volume_id": vol})),
            None,
            true,
        ),
        12 => (
            "volume.detach",
            json(serde_json::json!({"command_id": id, "type": "detach", "volume_id": "vol-1"})),
            None,
            true,
        ),
        13 => (
            "volume.attach",
            json(
                serde_json::json!({"command_id": id, "type": "attach", "volume_id": vol, "vm_id": vm, "device_id": 3}),
            ),
            None,
            true,
        ),
        14 => (
            "volume.delete",
            json(
                serde_json::json!({"command_id": id, "type": "delete", "volume_id": vol, "metadata": {"k": 1}}),
            ),
            None,
            true,
        ),
        15 => (
            "volume.create",
            vec![0xff, 0xfe, 0x00, 0x7b],
            Some(id.clone()),
            true,
        ),
        _ => (
            "volume.create",
            json(
                serde_json::json!({"command_id": "x".repeat(65), "type": "create", "name": "n", "size": 1}),
            ),
            None,
            false,
        ),
    };
    Bad {
        key,
        body,
        message_id,
        answerable,
    }
}

#[tokio::test]
async fn five_hundred_malformed_messages_among_fifty_valid_ones() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let collector = crate::helpers::Collector::start(&env.prefix).await;
    let mut dead = EventTap::bound(&env.prefix, &topology.dead_letter_exchange(), "").await;
    let client = env.client().await;
    let raw = RawPublisher::new(&env.prefix).await;

    let mut valid = Vec::new();
    let mut answerable = Vec::new();
    for i in 0..500 {
        let bad = malformed(i);
        if bad.answerable {
            answerable.push(format!("bad-{i}"));
        }
        raw.publish(bad.key, &bad.body, bad.message_id.as_deref())
            .await;
        if i % 10 == 9 {
            let c = crate::helpers::cmd::create(&format!("valid-{i}"), "1GiB");
            client.publish_only(&c).await.expect("valid published");
            valid.push(c.command_id.to_string());
        }
    }

    // Every valid command completes.
    let events = collector.wait_all(&valid, Duration::from_secs(60)).await;
    for id in &valid {
        let e = events
            .iter()
            .find(|e| e.data.command_id.as_str() == id)
            .expect("event");
        assert_eq!(
            e.event_type, "volume.create.completed",
            "{:?}",
            e.data.error
        );
    }
    // Every malformed one is dead-lettered with its reason.
    let mut reasons = 0;
    while reasons < 500 {
        let (props, _) = dead
            .next_raw(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("only {reasons} of 500 dead-lettered"));
        let reason = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-rejection-reason").cloned());
        assert!(
            matches!(reason, Some(AMQPValue::LongString(ref r)) if !r.to_string().is_empty()),
            "no reason: {props:?}"
        );
        reasons += 1;
    }
    assert!(
        dead.next_raw(Duration::from_millis(500)).await.is_none(),
        "a valid command was dead-lettered"
    );
    // Those with a readable id and type were answered.
    let answered = collector
        .wait_all(&answerable, Duration::from_secs(20))
        .await;
    assert!(
        answered
            .iter()
            .filter(|e| e.data.command_id.as_str().starts_with("bad-"))
            .all(|e| e
                .data
                .error
                .as_ref()
                .is_some_and(|err| err.code == ErrorCode::InvalidCommand))
    );

    let (status, ready) = env.get_json("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert!(
        !env.daemon_log().contains("panicked"),
        "the daemon panicked"
    );
    assert_eq!(env.sim.sim.call_count("createVolume"), 50);
}

/// `reply_to` only to queues `REPLY_TO_ALLOWED` allows: another queue gets no copy, and the
/// event still leaves on the events exchange.
#[tokio::test]
async fn a_reply_to_outside_the_allowed_patterns_gets_no_copy() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut events = EventTap::new(&env.prefix).await;
    // A named queue: neither `amq.gen-*` nor `<prefix>.reply.*`.
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let elsewhere = format!("{}.elsewhere", env.prefix);
    ch.queue_declare(
        elsewhere.as_str().into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("queue");
    let command = crate::helpers::cmd::create("no-copy", "1GiB").with_reply_to(&elsewhere);

    env.client()
        .await
        .publish_only(&command)
        .await
        .expect("published");

    let (_, event) = events.expect("the event on the exchange", WAIT).await;
    assert_eq!(event.data.command_id, command.command_id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        queue_depth(&ch, &elsewhere).await,
        0,
        "no copy in a queue outside REPLY_TO_ALLOWED"
    );
    assert!(
        env.daemon_log().contains("outside REPLY_TO_ALLOWED"),
        "a warning names it"
    );
}

/// Oversized bodies are dead-lettered without the daemon's memory following them: 16 messages
/// of 10 MiB (the broker's default limit accepts them), peak RSS below 128 MiB.
#[tokio::test]
async fn sixteen_ten_mib_messages_are_dead_lettered_within_128_mib() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = Topology::new(env.prefix.clone());
    let raw = RawPublisher::new(&env.prefix).await;
    let big = vec![b'x'; 10 << 20];
    for i in 0..16 {
        raw.publish("volume.create", &big, Some(&format!("big-{i}")))
            .await;
    }

    // All 16 reach the dead-letter queue.
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let dead = queue_depth(&ch, &topology.dead_letter_queue()).await;
        if dead >= 16 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {dead} of 16 dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let peak = env.daemon_peak_rss();
    eprintln!("peak RSS with 16 messages of 10 MiB: {} MiB", peak >> 20);
    assert!(peak < 128 << 20, "peak RSS {} MiB", peak >> 20);
    let (status, _) = env.get_json("/ready").await;
    assert_eq!(status, 200);
}
