//! Messages that are not valid commands: dead-lettered with their reason, answered with
//! INVALID_COMMAND when a command id can be read, and the daemon keeps running.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use schema::{ErrorCode, Topology};

use crate::helpers::{AMQP_URL, EventTap, TestEnv};

async fn publish_raw(prefix: &str, routing_key: &str, body: &[u8], message_id: Option<&str>) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut props = BasicProperties::default().with_content_type("application/json".into());
    if let Some(m) = message_id {
        props = props.with_message_id(m.into());
    }
    ch.basic_publish(
        Topology::new(prefix).commands_exchange().as_str().into(),
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
