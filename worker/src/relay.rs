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

/// Rows claimed per transaction.
const BATCH: u32 = 100;
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
    /// Stops the relay; the application fires it after the executor has drained.
    pub stop: CancellationToken,
    /// This active period's lease epoch: marking rows published is a fenced write.
    pub fence: Fence,
    /// Cancelled when a write found the lease taken over.
    pub fenced: CancellationToken,
}

impl Relay {
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        // Database failures back off too: a batch published but not marked is sent again,
        // at a falling rate rather than every second.
        let mut db_backoff = Backoff::default();
        'connect: while !self.stop.is_cancelled() {
            let (_conn, channel) = match self.open().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot reach the broker; retrying");
                    if !backoff.wait(&self.stop).await {
                        break;
                    }
                    continue;
                }
            };
            self.status.set_relay_connected(true);
            backoff.reset();
            loop {
                // Bounded as a whole: a database call on a half-open connection must not stall
                // the relay for the kernel's retransmission timeout.
                let batch = tokio::time::timeout(BATCH_TIMEOUT, self.publish_batch(&channel))
                    .await
                    .unwrap_or(Err(RelayError::Stalled));
                if batch.is_ok() {
                    db_backoff.reset();
                }
                match batch {
                    Ok(n) if n == BATCH as usize => continue,
                    Ok(_) => {
                        tokio::select! {
                            () = self.stop.cancelled() => break 'connect,
                            () = self.wakeup.notified() => {}
                            () = tokio::time::sleep(IDLE_POLL) => {}
                        }
                    }
                    Err(RelayError::Fenced(f)) => {
                        tracing::error!(error = %f, "relay fenced: another instance publishes now");
                        self.fenced.cancel();
                        break 'connect;
                    }
                    Err(RelayError::Db(e)) => {
                        tracing::warn!(error = %e, "relay cannot read or mark the outbox; retrying");
                        if !db_backoff.wait(&self.stop).await {
                            break 'connect;
                        }
                    }
                    Err(e) => {
                        self.status.set_relay_connected(false);
                        tracing::warn!(error = %e, "relay lost the broker; events stay in the outbox");
                        if !backoff.wait(&self.stop).await {
                            break 'connect;
                        }
                        continue 'connect;
                    }
                }
            }
        }
        self.status.set_relay_connected(false);
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
    /// published in a short fenced transaction: no row lock is held while the broker confirms.
    /// Returns how many rows were published.
    async fn publish_batch(&self, channel: &Channel) -> Result<usize, RelayError> {
        let rows = outbox::unpublished(&self.pool, BATCH).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let sent = publish_confirmed(channel, &rows).await?;
        let mut tx = self.pool.begin().await?;
        for row in &sent {
            outbox::mark_published(&mut tx, row.id).await?;
        }
        // Fenced: published (at least once, as always) but not ours to mark; the new holder's
        // relay publishes these rows again, with the same event ids.
        self.fence.commit(tx).await??;
        for row in &sent {
            self.metrics.event_published();
            tracing::debug!(event_id = %row.event_id, routing_key = %row.routing_key, "event published");
        }
        Ok(sent.len())
    }
}

/// Publishes `rows` (and the copies their commands asked for through `reply_to`) and waits for
/// every confirm. Returns the rows sent; a row whose names AMQP cannot carry is skipped.
async fn publish_confirmed<'r>(
    channel: &Channel,
    rows: &'r [OutboxRow],
) -> Result<Vec<&'r OutboxRow>, RelayError> {
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
    // Unconfirmed: the rows stay unpublished and are sent again on a new connection;
    // subscribers dedupe on the event id.
    confirmed.map_err(|_| RelayError::Unconfirmed(count))??;
    Ok(sent)
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
