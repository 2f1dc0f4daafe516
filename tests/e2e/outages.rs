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

/// S8 (N8): a database that answers a connection idle past 5 s with MySQL 8's error 4031 and
/// closes it, in front of an idle daemon. Every 5.5 s, for six rounds: `/ready` is asked, one
/// invalid command with a readable command id is published, and the host volume's device goes
/// (or comes back) behind the daemon's back. `/ready` answers 200 every time, each invalid
/// command gets its INVALID_COMMAND event, and the mapping follows every device change.
#[tokio::test]
async fn a_database_that_drops_idle_connections_loses_no_answer_event_or_device_change() {
    let idle = crate::helpers::IdleKillProxy::start(
        "127.0.0.1:3306".parse().expect("addr"),
        Duration::from_secs(5),
    )
    .await;
    let mut env = TestEnv::with_host_vm(cloudstack_sim::SimConfig {
        job_latency: Duration::from_millis(100),
        ..cloudstack_sim::SimConfig::default()
    })
    .await;
    env.daemon_database_url = Some(format!("mysql://root@{}/{}", idle.addr, env.db_name));
    env.start_daemon().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("follows-its-device", 16 << 20);
    let attached = env
        .execute(&crate::helpers::cmd::attach(volume, host))
        .await;
    assert_eq!(attached.data.status.as_str(), "completed", "{attached:?}");
    let params = |vm: Option<schema::VmId>| {
        let mut p = std::collections::HashMap::from([("id".to_owned(), volume.to_string())]);
        if let Some(vm) = vm {
            p.insert("virtualmachineid".to_owned(), vm.to_string());
        }
        p
    };
    let collector = crate::helpers::Collector::start(&env.prefix).await;
    let mut ids = Vec::new();
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let (status, body) = env.get_json("/ready").await;
        assert_eq!(status, 200, "round {round}: /ready {body}");

        let id = format!("idle-{round}-{}", uuid::Uuid::new_v4().simple());
        let bad = format!(r#"{{"command_id": "{id}", "type": "create", "name": "x", "size": 0}}"#);
        crate::rejections::publish_raw(&env.prefix, "volume.create", bad.as_bytes(), None).await;
        ids.push(id);

        let present = round % 2 == 1;
        match present {
            false => env.sim.sim.detach_volume(&params(None)),
            true => env.sim.sim.attach_volume(&params(Some(host))),
        }
        .expect("the device changes behind the daemon's back");
        let want = if present { "present" } else { "missing" };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let pool = env.db().await;
            let state: String = sqlx::query_scalar(
                "SELECT CAST(linux_state AS CHAR) FROM device_mappings WHERE volume_id = ?",
            )
            .bind(volume.to_string())
            .fetch_one(&pool)
            .await
            .expect("mapping");
            if state == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the mapping says {state}, the device is {want}\n{}",
                env.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let events = collector.wait_all(&ids, Duration::from_secs(30)).await;
    for e in &events {
        let code = e.data.error.as_ref().map(|x| x.code);
        assert_eq!(code, Some(schema::ErrorCode::InvalidCommand), "{e:?}");
    }
    eprintln!("connections answered with 4031: {}", idle.kills());
}
