//! The outbox relay: publishes committed events with publisher confirms and marks each row
//! published only after the broker confirmed it. Delivery is at least once: a crash between
//! the confirm and the commit publishes the event again, with the same id.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use sqlx::MySqlPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use schema::event::EVENT_CONTENT_TYPE;

use crate::broker::{self, Backoff, Endpoint};
use crate::db::outbox::{self, OutboxRow};
use crate::lease::{Fence, Fenced};
use crate::metrics::Metrics;
use crate::status::Status;
use crate::stop::Stop;

/// Rows claimed per transaction.
const BATCH: u32 = 500;
/// Without a wake-up the outbox is still checked this often (rows written by another instance,
/// rows left by a failed attempt).
const IDLE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused event {0} (nack)")]
    Nacked(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "the broker did not confirm {0} events within {CONFIRM_TIMEOUT:?} (blocked by a resource alarm?)"
    )]
    Unconfirmed(usize),
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("a batch took longer than {BATCH_TIMEOUT:?} (database or broker stalled)")]
    Stalled,
}

/// The longest one batch (claim, publish, confirms, mark) may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a batch waits for the broker's confirms while holding its rows locked.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Relay {
    pub pool: MySqlPool,
    pub broker: Endpoint,
    pub wakeup: Arc<Notify>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    /// A drain publishes what the outbox holds, then returns (the application asks for it
    /// after the executor has drained); an abort returns at once (lease lost).
    pub stop: Stop,
    /// This active period's lease epoch: marking rows published is a fenced write.
    pub fence: Fence,
    /// Cancelled when a write found the lease taken over.
    pub fenced: CancellationToken,
}

/// What the relay does after its channel's loop ended.
enum Next {
    Stop,
    Reconnect,
}

impl Relay {
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        // Database failures back off too: a batch published but not marked is sent again,
        // at a falling rate rather than every second.
        let mut db_backoff = Backoff::default();
        while !self.stop.is_aborted() {
            let (_conn, channel) = match self.open().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot reach the broker; retrying");
                    if !backoff.wait(self.stop.aborted()).await {
                        break;
                    }
                    continue;
                }
            };
            self.status.set_relay_connected(true);
            backoff.reset();
            match self.publish_on(&channel, &mut db_backoff).await {
                Next::Stop => break,
                Next::Reconnect => {
                    self.status.set_relay_connected(false);
                    if !backoff.wait(self.stop.aborted()).await {
                        break;
                    }
                }
            }
        }
        self.status.set_relay_connected(false);
    }

    /// Publishes batches on `channel` until it breaks ([`Next::Reconnect`]), or the relay is
    /// fenced, aborted, or drained: a drain returns once a batch finds the outbox empty, so
    /// every event recorded before it is out.
    async fn publish_on(&self, channel: &Channel, db_backoff: &mut Backoff) -> Next {
        let mut pipeline = Pipeline::default();
        loop {
            // Bounded as a whole: a database call on a half-open connection must not stall
            // the relay for the kernel's retransmission timeout.
            let batch =
                tokio::time::timeout(BATCH_TIMEOUT, self.publish_batch(channel, &mut pipeline))
                    .await
                    .unwrap_or(Err(RelayError::Stalled));
            if batch.is_ok() {
                db_backoff.reset();
            }
            match batch {
                Ok(n) if n == BATCH as usize => continue,
                Ok(_) if self.stop.is_draining() => return Next::Stop,
                Ok(_) => {
                    tokio::select! {
                        () = self.stop.draining() => {}
                        () = self.wakeup.notified() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Err(RelayError::Fenced(f)) => {
                    tracing::error!(error = %f, "relay fenced: another instance publishes now");
                    self.fenced.cancel();
                    return Next::Stop;
                }
                Err(RelayError::Db(e)) => {
                    tracing::warn!(error = %e, "relay cannot read or mark the outbox; retrying");
                    if !db_backoff.wait(self.stop.aborted()).await {
                        return Next::Stop;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay lost the broker; events stay in the outbox");
                    return Next::Reconnect;
                }
            }
        }
    }

    /// A fresh connection with a confirm-mode channel.
    async fn open(&self) -> Result<(Connection, Channel), lapin::Error> {
        let conn = broker::connect(&self.broker, "volume-daemon relay").await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((conn, channel))
    }

    /// Reads a batch, publishes every row, waits for all confirms, then marks the rows
    /// published in one fenced statement: no row lock is held while the broker confirms.
    /// A full batch (more are likely waiting) overlaps with its neighbours: the next batch is
    /// read while the broker confirms this one, and this one is marked while the next is
    /// published. A batch is published only once the one before it was confirmed (events of
    /// one volume stay in order even when a batch fails), the previous marking always ends
    /// before the next starts, and rows published but not yet marked are never read again.
    /// Returns how many rows were published.
    async fn publish_batch(
        &self,
        channel: &Channel,
        pipeline: &mut Pipeline,
    ) -> Result<usize, RelayError> {
        let rows = match pipeline.next.take() {
            Some(read) => read.await.unwrap_or(Err(sqlx::Error::PoolClosed))?,
            None => outbox::unpublished_except(&self.pool, BATCH, &pipeline.marking.ids).await?,
        };
        if rows.is_empty() {
            pipeline.marking.finish().await?;
            return Ok(0);
        }
        let (sent, confirms) = publish_all(channel, &rows).await?;
        let ids: Vec<u64> = sent.iter().map(|r| r.id).collect();
        if rows.len() == BATCH as usize {
            let except: Vec<u64> = pipeline.marking.ids.iter().chain(&ids).copied().collect();
            let pool = self.pool.clone();
            pipeline.next = Some(tokio::spawn(async move {
                outbox::unpublished_except(&pool, BATCH, &except).await
            }));
        }
        // On failure the relay reconnects and the pipeline is dropped, read-ahead and all.
        await_confirms(confirms).await?;
        pipeline.marking.finish().await?;
        for row in &sent {
            tracing::debug!(event_id = %row.event_id, routing_key = %row.routing_key, "event published");
        }
        let mark = mark(
            self.pool.clone(),
            self.fence.clone(),
            ids.clone(),
            self.metrics.clone(),
        );
        if rows.len() == BATCH as usize {
            pipeline.marking.ids = ids;
            pipeline.marking.task = Some(tokio::spawn(mark));
        } else {
            mark.await?;
        }
        Ok(rows.len())
    }
}

/// What one batch leaves to the next: the next batch's rows being read, and this batch's
/// marking, which may still run while the next one is published.
#[derive(Default)]
struct Pipeline {
    next: Option<tokio::task::JoinHandle<Result<Vec<OutboxRow>, sqlx::Error>>>,
    marking: Marking,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(read) = self.next.take() {
            read.abort();
        }
    }
}

/// The marking of a published batch that may still run while the next one is published.
#[derive(Default)]
struct Marking {
    ids: Vec<u64>,
    task: Option<tokio::task::JoinHandle<Result<(), RelayError>>>,
}

impl Marking {
    /// Waits for the marking in progress, if any.
    async fn finish(&mut self) -> Result<(), RelayError> {
        self.ids.clear();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Err(RelayError::Stalled)),
            None => Ok(()),
        }
    }
}

/// Marks `ids` published in one fenced statement. Fenced: published (at least once, as
/// always) but not ours to mark; the new holder's relay publishes these rows again, with the
/// same event ids.
async fn mark(
    pool: MySqlPool,
    fence: Fence,
    ids: Vec<u64>,
    metrics: Arc<Metrics>,
) -> Result<(), RelayError> {
    let marked = outbox::mark_all_published(&pool, &ids, fence.name(), fence.epoch()).await?;
    if marked == 0 {
        // Nothing marked: the lease moved on (or, if the check passes, the rows were marked
        // already, which only a second relay of the same epoch could have done).
        let mut conn = pool.acquire().await?;
        fence.check(&mut conn).await??;
    }
    for _ in 0..marked {
        metrics.event_published();
    }
    Ok(())
}

/// The broker's confirms of a batch, each with the event it confirms.
type Confirms = Vec<(String, lapin::PublisherConfirm)>;

/// Publishes `rows` (and the copies their commands asked for through `reply_to`) without
/// waiting for the confirms. Returns the rows sent (a row whose names AMQP cannot carry is
/// skipped) and the confirms to await.
async fn publish_all<'r>(
    channel: &Channel,
    rows: &'r [OutboxRow],
) -> Result<(Vec<&'r OutboxRow>, Confirms), RelayError> {
    let mut confirms = Vec::with_capacity(rows.len());
    let mut sent = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(exchange), Some(routing_key)) = (short(&row.exchange), short(&row.routing_key))
        else {
            // Only a row edited by hand can hold names AMQP cannot carry: leave it in the
            // backlog (visible on /ready) rather than panic or pretend it was published.
            tracing::error!(event_id = %row.event_id, "outbox row names an exchange or routing key over 255 bytes; not publishing it");
            continue;
        };
        sent.push(row);
        let props = properties(row);
        let body = row.payload.as_bytes();
        let options = BasicPublishOptions::default();
        let confirm = channel
            .basic_publish(exchange, routing_key, options, body, props.clone())
            .await?;
        confirms.push((row.event_id.clone(), confirm));
        // The command asked for a direct answer too: through the default exchange.
        if let Some(queue) = row.reply_to.as_deref().and_then(short) {
            let confirm = channel
                .basic_publish("".into(), queue, options, body, props)
                .await?;
            confirms.push((row.event_id.clone(), confirm));
        }
    }
    Ok((sent, confirms))
}

/// Waits for every confirm of a batch. Unconfirmed: the rows stay unpublished and are sent
/// again on a new connection; subscribers dedupe on the event id.
async fn await_confirms(confirms: Confirms) -> Result<(), RelayError> {
    let count = confirms.len();
    let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, async {
        for (event_id, confirm) in confirms {
            match confirm.await? {
                Confirmation::Ack(_) | Confirmation::NotRequested => {}
                Confirmation::Nack(_) => return Err(RelayError::Nacked(event_id)),
            }
        }
        Ok(())
    })
    .await;
    confirmed.map_err(|_| RelayError::Unconfirmed(count))?
}

/// A short string, or nothing if it is too long for AMQP (never panics on stored data).
fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

/// AMQP properties of an event (CONTRACT §4).
fn properties(row: &OutboxRow) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type(EVENT_CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
    if let Some(id) = short(&row.event_id) {
        props = props.with_message_id(id);
    }
    if let Some(t) = short(&row.routing_key) {
        props = props.with_type(t);
    }
    if let Some(c) = row.correlation_id.as_deref().and_then(short) {
        props = props.with_correlation_id(c);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::{TestDb, rejected_event};
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    /// The broker the unit tests use (`TEST_AMQP_URL` overrides it).
    fn broker_url() -> String {
        std::env::var("TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Asked to drain before it even connected (as at shutdown, right after the executor
    /// recorded its last outcomes), the relay still publishes every row of the outbox, over
    /// several batches, and then returns by itself.
    #[tokio::test]
    async fn a_drained_relay_publishes_the_whole_outbox_then_returns() {
        let db = TestDb::new().await;
        let lease = db.lease().await;
        let rows = 2 * BATCH as usize + 50;
        // An exchange of this test only, auto-deleted with the exclusive queue bound to it.
        let exchange = format!(
            "vd-unit-{}.events",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let endpoint = Endpoint {
            url: broker_url().as_str().into(),
            ca_pem: None,
        };
        let conn = broker::connect(&endpoint, "relay unit test")
            .await
            .expect("unit tests of the relay need RabbitMQ (scripts/test starts it)");
        let ch = conn.create_channel().await.expect("channel");
        let auto_delete = ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            auto_delete,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = ch
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .expect("queue");
        ch.queue_bind(
            queue.name().clone(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let mut tx = db.pool.begin().await.expect("tx");
        for n in 0..rows {
            outbox::insert(
                &mut tx,
                &rejected_event(&format!("drain-{n}")),
                &exchange,
                None,
            )
            .await
            .expect("insert");
        }
        tx.commit().await.expect("commit");

        let stop = Stop::new();
        stop.drain();
        let relay = Relay {
            pool: db.pool.clone(),
            broker: endpoint,
            wakeup: Arc::new(Notify::new()),
            status: Arc::new(Status::default()),
            metrics: Arc::new(Metrics::new()),
            stop,
            fence: lease.fence(),
            fenced: CancellationToken::new(),
        };
        tokio::time::timeout(Duration::from_secs(60), relay.run())
            .await
            .expect("a drained relay returns once the outbox is empty");

        let left = outbox::backlog(&db.pool).await.expect("backlog");
        assert_eq!(left.count, 0, "every row marked published");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let seen = ch
            .queue_declare(queue.name().clone(), passive, FieldTable::default())
            .await
            .expect("queue");
        assert_eq!(
            seen.message_count() as usize,
            rows,
            "every event reached the exchange, once"
        );
        // In the outbox's order, across the overlapping batches.
        for n in 0..rows {
            let got = ch
                .basic_get(
                    queue.name().clone(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get")
                .expect("a message");
            let event: schema::CloudEvent =
                serde_json::from_slice(&got.delivery.data).expect("an event");
            assert_eq!(event.data.command_id.as_str(), format!("drain-{n}"));
        }
        conn.close(0, "done".into()).await.expect("close");
    }
}
