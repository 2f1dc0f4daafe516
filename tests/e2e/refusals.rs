//! Destinations that refuse events (docs/wire.md): a subscriber queue that is full with
//! `x-overflow: reject-publish`, and a `reply_to` queue that refuses everything. RabbitMQ nacks
//! such a publish, yet every other queue the event was routed to has it; the relay gives a
//! refused event up after a bounded number of tries, and nothing else waits behind it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use sqlx::Row;

use crate::helpers::cmd;
use crate::helpers::{AMQP_URL, TestEnv, get_text};

/// Commands published after the one whose `reply_to` refuses everything.
const COMMANDS: usize = 40;

/// An event at the healthy subscriber: (event id, command id, when).
type Arrival = (String, String, chrono::DateTime<chrono::Utc>);

/// Queue arguments of a queue that holds at most `max` messages and refuses the rest.
pub(crate) fn refusing(max: i64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-max-length"),
        AMQPValue::LongLongInt(max),
    );
    args.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

/// A full subscriber queue and a refusing `reply_to` queue: a healthy subscriber gets every
/// event within 10 s of its operation's end and no event more than twice, the outbox backlog
/// returns to 0, `/ready` stays 200, and the refusals are recorded and counted.
#[tokio::test]
async fn a_refusing_subscriber_or_reply_queue_stalls_nothing_and_floods_no_one() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let topology = schema::Topology::new(&env.prefix);

    // The healthy subscriber: its own queue, read by the test, each arrival timed.
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let healthy = ch
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .expect("healthy queue");
    // The full subscriber: one message fills it, and it is never read.
    let full_name = format!("{}.full-subscriber", env.prefix);
    ch.queue_declare(full_name.as_str().into(), exclusive, refusing(1))
        .await
        .expect("full queue");
    for q in [healthy.name().as_str(), full_name.as_str()] {
        ch.queue_bind(
            q.into(),
            topology.events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    // Filled before any event: every event the daemon publishes is refused by it.
    ch.basic_publish(
        "".into(),
        full_name.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        b"filler",
        lapin::BasicProperties::default(),
    )
    .await
    .expect("fill the full queue");
    // A server-named queue (admitted by the default REPLY_TO_ALLOWED) that refuses everything.
    let refuser = ch
        .queue_declare("".into(), exclusive, refusing(0))
        .await
        .expect("refusing reply queue");
    assert!(refuser.name().as_str().starts_with("amq.gen-"));

    let mut consumer = ch
        .basic_consume(
            healthy.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let arrivals: Arc<std::sync::Mutex<Vec<Arrival>>> = Arc::default();
    let sink = arrivals.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let event: schema::CloudEvent = serde_json::from_slice(&d.data).expect("an event");
            sink.lock().expect("arrivals").push((
                event.id.to_string(),
                event.data.command_id.as_str().to_owned(),
                chrono::Utc::now(),
            ));
        }
    });

    // /ready sampled every 100 ms throughout.
    let not_ready = Arc::new(AtomicU32::new(0));
    let probe = {
        let (addr, not_ready) = (env.http_addr, not_ready.clone());
        tokio::spawn(async move {
            loop {
                let r = crate::helpers::http()
                    .get(format!("http://{addr}/ready"))
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status() == 200) {
                    not_ready.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let client = env.client().await;
    let mut ids = Vec::new();
    let first = cmd::create("refused-reply", "1GiB").with_reply_to(refuser.name().as_str());
    client.publish_only(&first).await.expect("publish");
    ids.push(first.command_id.as_str().to_owned());
    for n in 0..COMMANDS {
        let c = cmd::create(&format!("refusals-{n}"), "1GiB");
        client.publish_only(&c).await.expect("publish");
        ids.push(c.command_id.as_str().to_owned());
    }

    // Every operation ends and its event reaches the healthy subscriber.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen: std::collections::HashSet<String> = (arrivals.lock().expect("arrivals"))
            .iter()
            .map(|a| a.1.clone())
            .collect();
        if ids.iter().all(|id| seen.contains(id)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} events never reached the healthy subscriber\n{}",
            ids.iter().filter(|id| !seen.contains(*id)).count(),
            ids.len(),
            env.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The backlog returns to 0 (refused rows leave it).
    let pool = env.db().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&pool)
                .await
                .expect("backlog");
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} outbox rows still unpublished\n{}",
            env.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then only the reply_to queue refuses: the event is taken, its copy is sent once more
    // and given up.
    ch.queue_unbind(
        full_name.as_str().into(),
        topology.events_exchange().as_str().into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind the full queue");
    let last = cmd::create("refused-reply-only", "1GiB").with_reply_to(refuser.name().as_str());
    client.publish_only(&last).await.expect("publish");
    let last_id = last.command_id.as_str().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(arrivals.lock().expect("arrivals").iter()).any(|a| a.1 == last_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last event never reached the healthy subscriber"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids.push(last_id);
    // Time for any further copy to arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    probe.abort();
    reader.abort();

    let arrivals = arrivals.lock().expect("arrivals").clone();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    let mut first_seen: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for (event_id, command_id, at) in &arrivals {
        *copies.entry(event_id.as_str()).or_default() += 1;
        first_seen.entry(command_id.as_str()).or_insert(*at);
    }
    let most = copies.values().copied().max().unwrap_or(0);
    assert!(
        most <= 2,
        "an event reached the healthy subscriber {most} times: {copies:?}"
    );
    for id in &ids {
        let ended: chrono::DateTime<chrono::Utc> =
            sqlx::query("SELECT completed_at FROM volume_operations WHERE id = ?")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("operation")
                .try_get("completed_at")
                .expect("completed_at");
        let lag = first_seen[id.as_str()] - ended;
        assert!(
            lag < chrono::TimeDelta::seconds(10),
            "the event of {id} reached the healthy subscriber {lag} after its operation ended"
        );
    }
    assert_eq!(
        not_ready.load(Ordering::Relaxed),
        0,
        "/ready answered other than 200 while events were refused\n{}",
        env.daemon_log()
    );

    // The full queue's refusals are recorded: rows given up, with their tries.
    let refused: Vec<(u32, bool)> =
        sqlx::query("SELECT publish_attempts, published_at IS NOT NULL AS p FROM outbox WHERE refused_at IS NOT NULL")
            .fetch_all(&pool)
            .await
            .expect("refused rows")
            .iter()
            .map(|r| (r.get::<u32, _>("publish_attempts"), r.get::<i64, _>("p") == 1))
            .collect();
    assert_eq!(
        refused.len(),
        COMMANDS + 1,
        "the full queue refused every event of the first phase"
    );
    assert!(
        refused
            .iter()
            .all(|&(tries, published)| tries == 2 && published),
        "{refused:?}"
    );
    let metrics = get_text(env.http_addr, "/metrics").await;
    let exchange = topology.events_exchange();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("volume_daemon_events_refused_total{")
                && l.contains(&format!("exchange=\"{exchange}\""))),
        "refusals counted by exchange:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("volume_daemon_events_refused_total{")
                && l.contains(&format!("routing_key=\"{}\"", refuser.name()))),
        "the refused reply_to copy counted:\n{metrics}"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("given up, recorded as refused") && log.contains(exchange.as_str()),
        "the log names the exchange of a refused event"
    );
    assert!(
        log.contains("copy on every try: copy given up"),
        "the first command's copy went with its refused event's two tries"
    );
    assert!(
        log.contains("refused the event's copy twice"),
        "the last command's copy was sent once more, then given up"
    );
    let copies_of_last = sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM outbox WHERE reply_to IS NOT NULL AND refused_at IS NULL AND published_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .expect("rows");
    assert_eq!(
        copies_of_last, 1,
        "the last event itself counts as published"
    );
    ch.queue_delete(full_name.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    conn.close(0, "done".into()).await.expect("close");
}
