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
use crate::db::fence::{Fence, Fenced, StoreError};
use crate::db::outbox::{self, OutboxRow};
use crate::metrics::Metrics;
use crate::status::Status;
use crate::stop::Stop;

/// Rows read and published per batch. The read after a full batch leaves out the rows of two
/// batches (one being confirmed, one being marked): 960 ids, a list MariaDB still takes as a
/// list (under 1,000, see `db::LONGEST_LIST`).
const BATCH: u32 = 480;
/// Without a wake-up the outbox is still checked this often (rows written by another instance,
/// rows left by a failed attempt).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// After a batch that found events, how long the relay lets more commit before it reads again:
/// under a stream of events each read and each mark carries several (phase 1 of the benchmark:
/// 2.7 SQL statements per command instead of 3.2, a sixth less CPU per command); an event that
/// follows another within this long is published up to this much later.
const GATHER: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
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
    #[error("a task of the relay ended without an answer: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<StoreError> for RelayError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Db(e) => Self::Db(e),
            StoreError::Fenced(f) => Self::Fenced(f),
            // The relay's writes are not grouped; should one ever be, a stalled batch is
            // what its retry makes of it.
            StoreError::Abandoned => Self::Stalled,
        }
    }
}

/// The longest one batch (claim, publish, confirms, mark) may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a batch waits for the broker's confirms (no row lock is held meanwhile).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the second try of a refused `reply_to` copy waits for its confirm.
const COPY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Tries an event gets, the first included, while the broker refuses it (a nack) or leaves it
/// unconfirmed; then it is given up (docs/wire.md). Every try reaches each queue that accepts
/// it, so a healthy subscriber sees a refused event at most this many times.
const TRIES: u32 = 2;

#[derive(Debug)]
pub(crate) struct Relay {
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
    pub(crate) async fn run(self) {
        let mut backoff = Backoff::default();
        // Database failures back off too: a batch published but not marked is sent again,
        // at a falling rate rather than every second.
        let mut db_backoff = Backoff::default();
        while !self.stop.is_aborted() {
            let (conn, channel) = match self.open().await {
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
            match self.publish_on(&conn, &channel, &mut db_backoff).await {
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
    async fn publish_on(
        &self,
        conn: &Connection,
        channel: &Channel,
        db_backoff: &mut Backoff,
    ) -> Next {
        let mut pipeline = Pipeline::default();
        loop {
            // Bounded as a whole: a database call on a half-open connection must not stall
            // the relay for the kernel's retransmission timeout.
            let batch = tokio::time::timeout(
                BATCH_TIMEOUT,
                self.publish_batch(conn, channel, &mut pipeline),
            )
            .await
            .unwrap_or(Err(RelayError::Stalled));
            if batch.is_ok() {
                db_backoff.reset();
            }
            match batch {
                Ok(n) if n == BATCH as usize => continue,
                Ok(_) if self.stop.is_draining() => return Next::Stop,
                Ok(n) => {
                    if n > 0 {
                        // Events may be coming back to back: let a few more commit, so that
                        // the next batch carries them too (fewer reads and marks per event).
                        tokio::time::sleep(GATHER).await;
                    }
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

    /// Reads a batch, publishes every row, waits for all confirms, then marks the rows the
    /// broker took published in one fenced statement: no row lock is held while the broker
    /// confirms. A row the broker refused or left unconfirmed counts a try and stays in the
    /// outbox for the next batch, until it is given up ([`Relay::settle`]); it holds back no
    /// other row. A full batch (more are likely waiting) overlaps with its neighbours: the next
    /// batch is read while the broker confirms this one, and this one is marked while the next
    /// is published. A batch is published only once the one before it was confirmed, the
    /// previous marking always ends before the next starts, and rows published but not yet
    /// marked are never read again. Returns how many rows were published.
    async fn publish_batch(
        &self,
        conn: &Connection,
        channel: &Channel,
        pipeline: &mut Pipeline,
    ) -> Result<usize, RelayError> {
        let rows = match pipeline.next.take() {
            Some(read) => read.await??,
            None => outbox::unpublished_except(&self.pool, BATCH, &pipeline.marking.ids).await?,
        };
        if rows.is_empty() {
            pipeline.marking.finish().await?;
            return Ok(0);
        }
        let sent = publish_all(channel, &rows).await?;
        if rows.len() == BATCH as usize {
            let except: Vec<u64> = (pipeline.marking.ids.iter())
                .chain(sent.iter().map(|s| &s.row.id))
                .copied()
                .collect();
            let pool = self.pool.clone();
            pipeline.next = Some(tokio::spawn(async move {
                outbox::unpublished_except(&pool, BATCH, &except).await
            }));
        }
        // On failure the relay reconnects and the pipeline is dropped, read-ahead and all.
        let answered = await_confirms(sent).await?;
        let ids = self.settle(conn, channel, &answered).await?;
        pipeline.marking.finish().await?;
        for a in answered.iter().filter(|a| a.event == Answer::Ack) {
            tracing::debug!(event_id = %a.row.event_id, routing_key = %a.row.routing_key, "event published");
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

    /// Sorts a batch's answers (docs/wire.md) and returns the rows to mark published: those
    /// whose event the broker took. An event it refused (a nack) or left unconfirmed counts a
    /// try; after [`TRIES`] it is given up: recorded as refused, out of the backlog, counted
    /// and logged with its exchange and routing key (a nack does not say which queue refused).
    /// A `reply_to` copy the broker refused is sent once more (with its event's next try, or
    /// alone when the event was taken), then given up the same way. A batch left unconfirmed while the broker
    /// blocks this connection (a resource alarm: nothing was routed) counts no try: it is
    /// sent again on a new connection, as any broker failure.
    async fn settle(
        &self,
        conn: &Connection,
        channel: &Channel,
        answered: &[Answered<'_>],
    ) -> Result<Vec<u64>, RelayError> {
        let unconfirmed = |a: &Answered<'_>| {
            a.event == Answer::Unconfirmed
                || a.copy
                    .as_ref()
                    .is_some_and(|(_, c)| *c == Answer::Unconfirmed)
        };
        let waiting = answered.iter().filter(|a| unconfirmed(a)).count();
        if waiting > 0 && conn.status().blocked() {
            return Err(RelayError::Unconfirmed(waiting));
        }
        let mut published = Vec::with_capacity(answered.len());
        let (mut refused, mut give_up) = (Vec::new(), Vec::new());
        for a in answered {
            if a.event == Answer::Ack {
                published.push(a.row.id);
                if let Some((queue, copy)) = &a.copy
                    && *copy != Answer::Ack
                {
                    self.copy_again(channel, a.row, queue, *copy).await?;
                }
                continue;
            }
            refused.push(a.row.id);
            if self.refused(a) {
                give_up.push(a.row.id);
            }
        }
        if !refused.is_empty() {
            outbox::record_refusals_fenced(&self.pool, &refused, &give_up, &self.fence).await?;
        }
        Ok(published)
    }

    /// Logs (and, when it is given up, counts) an event the broker refused or left
    /// unconfirmed; `true` when this was its last try.
    fn refused(&self, a: &Answered<'_>) -> bool {
        let tries = a.row.attempts + 1;
        if tries < TRIES {
            tracing::warn!(event_id = %a.row.event_id, exchange = %a.row.exchange, routing_key = %a.row.routing_key, tries, answer = ?a.event, "the broker refused this event (a queue bound to the exchange refuses it, or withholds its confirm); trying again");
            return false;
        }
        if let Some((queue, copy)) = &a.copy
            && *copy != Answer::Ack
        {
            // The copy went with each try of its event: that was its retry.
            self.metrics.event_refused("", queue.as_str());
            tracing::error!(event_id = %a.row.event_id, exchange = "", routing_key = %queue, answer = ?copy, "the reply_to queue refused the event's copy on every try: copy given up");
        }
        self.metrics
            .event_refused(&a.row.exchange, &a.row.routing_key);
        tracing::error!(event_id = %a.row.event_id, exchange = %a.row.exchange, routing_key = %a.row.routing_key, tries, answer = ?a.event, "the broker keeps refusing this event (a queue bound to the exchange refuses it, or withholds its confirm): given up, recorded as refused");
        true
    }

    /// Sends `row`'s `reply_to` copy to `queue` once more after the broker refused it (a nack);
    /// gives it up (logged, counted) when it is refused again, or at once when the first try
    /// already waited out [`CONFIRM_TIMEOUT`]. Never more than one retry: the queue is the
    /// producer's own, and the event is on the exchange for every subscriber.
    async fn copy_again(
        &self,
        channel: &Channel,
        row: &OutboxRow,
        queue: &ShortString,
        first: Answer,
    ) -> Result<(), RelayError> {
        if first == Answer::Unconfirmed {
            self.metrics.event_refused("", queue.as_str());
            tracing::error!(event_id = %row.event_id, exchange = "", routing_key = %queue, "the reply_to queue withheld the confirm of the event's copy: copy given up (the event itself was published)");
            return Ok(());
        }
        tracing::warn!(event_id = %row.event_id, reply_to = %queue, answer = ?first, "the reply_to queue refused the event's copy; sending it once more");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.clone(),
                BasicPublishOptions::default(),
                row.payload.as_bytes(),
                properties(row),
            )
            .await?;
        let again = answer(tokio::time::Instant::now() + COPY_CONFIRM_TIMEOUT, confirm).await?;
        if again != Answer::Ack {
            self.metrics.event_refused("", queue.as_str());
            tracing::error!(event_id = %row.event_id, exchange = "", routing_key = %queue, answer = ?again, "the reply_to queue refused the event's copy twice: copy given up (the event itself was published)");
        }
        Ok(())
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
            Some(task) => task.await?,
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
    // Nothing marked: the lease moved on (fenced), or the rows were marked already, which
    // only a second relay of the same epoch could have done.
    let marked = outbox::mark_published_fenced(&pool, &ids, &fence).await?;
    for _ in 0..marked {
        metrics.event_published();
    }
    Ok(())
}

/// What the broker said of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ack,
    /// Some queue the message was routed to refused it (a full queue with
    /// `x-overflow: reject-publish`); every other queue has it.
    Nack,
    /// No confirm within [`CONFIRM_TIMEOUT`] (a quorum queue without its majority, or a broker
    /// that stopped reading: a resource alarm).
    Unconfirmed,
}

/// One row's publishes whose confirms are awaited: the event on its exchange and, when the
/// command asked for it, the copy to its `reply_to` queue.
struct InFlight<'r> {
    row: &'r OutboxRow,
    event: lapin::PublisherConfirm,
    copy: Option<(ShortString, lapin::PublisherConfirm)>,
}

/// What the broker answered for one row.
struct Answered<'r> {
    row: &'r OutboxRow,
    event: Answer,
    /// The `reply_to` queue and the answer for the copy sent there.
    copy: Option<(ShortString, Answer)>,
}

/// Publishes `rows` (and the copies their commands asked for through `reply_to`) without
/// waiting for the confirms. A row whose names AMQP cannot carry is skipped.
async fn publish_all<'r>(
    channel: &Channel,
    rows: &'r [OutboxRow],
) -> Result<Vec<InFlight<'r>>, RelayError> {
    let mut sent = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(exchange), Some(routing_key)) = (short(&row.exchange), short(&row.routing_key))
        else {
            // Only a row edited by hand can hold names AMQP cannot carry: leave it in the
            // backlog (visible on /ready) rather than panic or pretend it was published.
            tracing::error!(event_id = %row.event_id, "outbox row names an exchange or routing key over 255 bytes; not publishing it");
            continue;
        };
        let props = properties(row);
        let body = row.payload.as_bytes();
        let options = BasicPublishOptions::default();
        let event = channel
            .basic_publish(exchange, routing_key, options, body, props.clone())
            .await?;
        // The command asked for a direct answer too: through the default exchange.
        let copy = match row.reply_to.as_deref().and_then(short) {
            Some(queue) => {
                let confirm = channel
                    .basic_publish("".into(), queue.clone(), options, body, props)
                    .await?;
                Some((queue, confirm))
            }
            None => None,
        };
        sent.push(InFlight { row, event, copy });
    }
    Ok(sent)
}

/// Waits for the confirms of a batch, at most [`CONFIRM_TIMEOUT`] in all: past it, a publish
/// still unconfirmed is [`Answer::Unconfirmed`] (those confirmed meanwhile still count). An
/// error is the channel's: the batch is sent again on a new connection.
async fn await_confirms(sent: Vec<InFlight<'_>>) -> Result<Vec<Answered<'_>>, RelayError> {
    let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    let mut answered = Vec::with_capacity(sent.len());
    for InFlight { row, event, copy } in sent {
        let event = answer(deadline, event).await?;
        let copy = match copy {
            Some((queue, confirm)) => Some((queue, answer(deadline, confirm).await?)),
            None => None,
        };
        answered.push(Answered { row, event, copy });
    }
    Ok(answered)
}

/// The broker's answer to one publish, waiting until `deadline` at most (a confirm that
/// arrived before is still read after it: the future is polled before the timer).
async fn answer(
    deadline: tokio::time::Instant,
    confirm: lapin::PublisherConfirm,
) -> Result<Answer, RelayError> {
    match tokio::time::timeout_at(deadline, confirm).await {
        Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => Ok(Answer::Ack),
        Ok(Ok(Confirmation::Nack(_))) => Ok(Answer::Nack),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(Answer::Unconfirmed),
    }
}

/// The event's trace context as AMQP headers `traceparent` and `tracestate` (docs/wire.md), when
/// it has one.
fn trace_headers(payload: &str) -> Option<lapin::types::FieldTable> {
    #[derive(serde::Deserialize)]
    struct Traced {
        traceparent: Option<String>,
        tracestate: Option<String>,
    }
    if !payload.contains("\"traceparent\"") {
        return None;
    }
    let traced: Traced = serde_json::from_str(payload).ok()?;
    let mut headers = lapin::types::FieldTable::default();
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            headers.insert(name.into(), lapin::types::AMQPValue::LongString(v.into()));
        }
    };
    put("traceparent", traced.traceparent);
    put("tracestate", traced.tracestate);
    Some(headers)
}

/// A short string, or nothing if it is too long for AMQP (never panics on stored data).
fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

/// AMQP properties of an event (docs/wire.md).
fn properties(row: &OutboxRow) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type(EVENT_CONTENT_TYPE.into())
        .with_delivery_mode(crate::broker::PERSISTENT)
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
    if let Some(headers) = trace_headers(&row.payload) {
        props = props.with_headers(headers);
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
