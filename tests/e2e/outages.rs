//! Outages the test causes itself, through a TCP proxy between the daemon and the broker.

use std::net::SocketAddr;
use std::time::Duration;

use crate::helpers::{EventTap, TcpProxy, TestEnv};

#[tokio::test]
async fn events_written_while_the_broker_is_unreachable_are_published_when_it_returns() {
    // Arrange: the daemon reaches the broker only through a proxy; jobs take 1.5 s.
    let config = cloudstack_sim::SimConfig {
        job_latency: Duration::from_millis(1500),
        ..Default::default()
    };
    let mut env = TestEnv::with_sim(config).await;
    let broker: SocketAddr = "127.0.0.1:5672".parse().expect("addr");
    let proxy = TcpProxy::start(broker).await;
    env.daemon_amqp_url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    env.start_daemon().await;
    let mut tap = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let cmd = crate::helpers::cmd::create("during-outage", "1GiB");
    let id = cmd.command_id.to_string();

    // Act: cut the broker while the job runs; the operation ends during the outage.
    client.publish_only(&cmd).await.expect("published");
    env.wait_for_operation(&id, Duration::from_secs(20), |r| {
        r.cloudstack_job_id.is_some()
    })
    .await;
    proxy.cut();
    env.wait_for_operation(&id, Duration::from_secs(20), |r| r.status == "completed")
        .await;
    let outbox = env.outbox().await;
    assert_eq!(outbox.len(), 1);
    assert!(
        !outbox[0].2,
        "not published while the broker is unreachable"
    );
    let (status, ready) = env.get_json("/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["outbox"]["backlog"], 1, "{ready}");
    assert!(
        tap.next(Duration::from_millis(500)).await.is_none(),
        "nothing can leave yet"
    );

    proxy.restore();

    // Assert: the event leaves once the broker is back, and the daemon is ready again.
    let (_, event) = tap
        .expect("the event held in the outbox", Duration::from_secs(20))
        .await;
    assert_eq!(event.data.command_id.as_str(), id);
    assert_eq!(event.event_type, "volume.create.completed");
    env.wait_ready(Duration::from_secs(20)).await;
    assert!(
        env.outbox_once_published(Duration::from_secs(20)).await[0].2,
        "marked published after the confirm"
    );
}

/// Reading `ossea_configs` (every operation does, for rotated keys) has the writes' policy:
/// a failing read never fails the operation with `INTERNAL`. Here the error is one that
/// retrying cannot cure (the table is gone), so after a few attempts the operation is left
/// executing, to resume at the next start; it completes then.
#[tokio::test]
async fn an_unreadable_ossea_configs_interrupts_an_operation_instead_of_failing_it() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let db = env.db().await;
    sqlx::query("RENAME TABLE ossea_configs TO ossea_configs_away")
        .execute(&db)
        .await
        .expect("hide the table");
    let mut tap = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let cmd = crate::helpers::cmd::create("while-configs-unreadable", "1GiB");
    let id = cmd.command_id.to_string();

    client.publish_only(&cmd).await.expect("published");
    env.wait_for_operation(&id, Duration::from_secs(20), |r| r.status == "executing")
        .await;
    assert!(
        tap.next(Duration::from_secs(3)).await.is_none(),
        "no event while the configuration cannot be read"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("cannot read ossea_configs: permanent database error"),
        "the stop is logged: {log}"
    );
    sqlx::query("RENAME TABLE ossea_configs_away TO ossea_configs")
        .execute(&db)
        .await
        .expect("restore the table");
    env.stop_daemon().await;
    env.start_daemon().await;

    let (_, event) = tap
        .expect("the create, after the restart", Duration::from_secs(20))
        .await;
    assert_eq!(event.data.command_id.as_str(), id);
    assert_eq!(
        event.event_type, "volume.create.completed",
        "{:?}",
        event.data.error
    );
}
