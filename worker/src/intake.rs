//! The intake: consumes the commands queue, validates each message, commits the valid ones as
//! `pending` operations (the deliveries that arrived together in one statement), acknowledges
//! them, and hands them to the executor as it makes room.
//!
//! A message is acknowledged only after its operation row is committed (docs/wire.md (processing rule 1)).
//! An invalid message is dead-lettered with its reason and, when its command id could be read,
//! answered with a failed `INVALID_COMMAND` event (rule 3).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Confirmation};
use tokio::sync::mpsc;

use schema::ErrorCode;
use schema::topology::headers;
use schema::{
    CloudEvent, Command, CommandId, EventData, EventError, EventId, EventOpType, InvalidCommand,
    MessageProps, OperationType, Topology,
};

use crate::broker::{self, Backoff, Endpoint};
use crate::config::ReplyToAllowed;
use crate::context::Context;
use crate::db::store::{self, Accepted};
use crate::model::Operation;
use crate::retry::{self, GaveUp};
use crate::status::Status;

/// Recording one command gives up after this and tries again.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum IntakeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled our consumer")]
    ConsumerEnded,
    #[error("the intake's connection is no longer open ({0})")]
    ConnectionLost(String),
    #[error("the broker did not take an acknowledgement within {ACK_TIMEOUT:?}")]
    AckTimeout,
}

/// How long an acknowledgement may take before the connection is given up for a new one.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiting intake checks that its connection is still open: a consumer whose
/// connection was reset is not always told (seen with a cluster node stopped under load).
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// Settles a delivery (`ack`, `nack`), bounded: on a connection that died without saying so,
/// the promise may never resolve.
async fn settle<T>(
    what: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, IntakeError> {
    tokio::time::timeout(ACK_TIMEOUT, what)
        .await
        .map_err(|_| IntakeError::AckTimeout)?
        .map_err(IntakeError::from)
}

/// What of a delivery's AMQP properties a command reads.
fn message_props(delivery: &Delivery) -> MessageProps {
    let p = &delivery.properties;
    let header = |name: &str| {
        let value = p.headers().as_ref()?.inner().get(name)?;
        match value {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    };
    MessageProps {
        message_id: p.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
    }
}

/// Recorded commands the intake keeps for the executor at most; past it, it stops taking
/// deliveries until the executor makes room (the broker then holds at most the prefetch
/// unrecorded for it).
const BACKLOG: usize = 256;

/// The prefetch of a consumer that knows nothing yet of what arrives: small, so a burst of
/// oversized messages (up to the broker's `max_message_size` each) is held two at a time.
const COLD_PREFETCH: u16 = 2;

/// No delivery for this long: the next burst starts cold again.
const IDLE: Duration = Duration::from_secs(2);

/// The prefetch for what comes after a batch of deliveries of `batch` bytes each, taken with
/// `current`: the cold one after an
/// oversized message (every valid command is at most `MAX_COMMAND_BYTES`); `most` once a
/// batch filled the prefetch with commands (a stream: the broker had more ready); else as is.
fn next_prefetch(current: u16, most: u16, batch: &[usize]) -> u16 {
    if batch
        .iter()
        .any(|&bytes| bytes > schema::command::MAX_COMMAND_BYTES)
    {
        COLD_PREFETCH.min(most)
    } else if batch.len() >= usize::from(current) {
        most
    } else {
        current
    }
}

/// An error unless `conn` is still open: a consumer whose connection was reset is not always
/// told (seen with a cluster node stopped under load).
fn still_connected(conn: &lapin::Connection) -> Result<(), IntakeError> {
    let status = conn.status();
    if status.connected() {
        return Ok(());
    }
    let state = if status.errored() {
        "errored"
    } else {
        "closed or reconnecting"
    };
    Err(IntakeError::ConnectionLost(state.to_owned()))
}

/// The tag of this process's `n`th consumer on a connection.
fn consumer_tag(n: u32) -> String {
    format!("volume-daemon-{}-{n}", std::process::id())
}

/// One connection's state.
struct Session<'a> {
    channel: &'a Channel,
    backlog: &'a mut VecDeque<Operation>,
    /// Whether every delivery so far was acknowledged or returned: then a batch is
    /// acknowledged by one `multiple` ack of its last delivery.
    all_settled: bool,
    /// The prefetch the current consumer was created with.
    prefetch: u16,
    /// Consumers created on this connection (each has its own tag).
    consumers: u32,
    /// When the last delivery came.
    last_delivery: tokio::time::Instant,
}

impl Session<'_> {
    /// Acknowledges `deliveries` (in the order they came): one frame when nothing before them
    /// is still unsettled, else one each.
    async fn ack(&mut self, deliveries: Vec<Delivery>) -> Result<(), IntakeError> {
        if self.all_settled {
            if let Some(last) = deliveries.last() {
                let all = BasicAckOptions { multiple: true };
                settle(last.acker.ack(all)).await?;
            }
            return Ok(());
        }
        for delivery in deliveries {
            settle(delivery.acker.ack(BasicAckOptions::default())).await?;
        }
        Ok(())
    }
}

/// `first` and the deliveries that already arrived behind it, up to `max` in all; and what
/// ended the stream meanwhile, if something did (an error, or `Ok` for the consumer's end),
/// to be returned after the batch is handled.
fn gather(
    first: Delivery,
    consumer: &mut lapin::Consumer,
    max: usize,
) -> (Vec<Delivery>, Option<Result<(), lapin::Error>>) {
    let mut batch = vec![first];
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(e))) => return (batch, Some(Err(e))),
            Some(None) => return (batch, Some(Ok(()))),
            None => break,
        }
    }
    (batch, None)
}

/// How long a clean stop waits for each further delivery the broker sent ahead.
const SENT_AHEAD_WAIT: Duration = Duration::from_millis(200);

/// The intake's configuration and handles.
#[derive(Debug)]
pub(crate) struct Intake {
    pub ctx: Arc<Context>,
    /// The daemon's shutdown (SIGTERM), as opposed to the end of the active period by a lost
    /// lease: only a clean stop stores the deliveries the broker sent ahead.
    pub stopping: tokio_util::sync::CancellationToken,
    pub broker: Endpoint,
    pub topology: Topology,
    /// The most unacknowledged deliveries the broker may send ahead (per consumer: quorum
    /// queues reject a global prefetch); each burst starts at [`COLD_PREFETCH`].
    pub prefetch: u16,
    pub ops: mpsc::Sender<Operation>,
    pub status: Arc<Status>,
    /// Queues a `reply_to` may name (`REPLY_TO_ALLOWED`).
    pub reply_to_allowed: ReplyToAllowed,
}

impl Intake {
    /// Consumes until shutdown, reconnecting with backoff whenever the broker goes away.
    /// `resumed`: the operations an earlier period left unfinished, handed to the executor
    /// first.
    pub(crate) async fn run(self, resumed: VecDeque<Operation>) {
        let mut backoff = Backoff::default();
        // Recorded (and acknowledged), not yet taken by the executor: kept across reconnects.
        let mut backlog = resumed;
        while !self.ctx.halt.is_cancelled() {
            match self.session(&mut backoff, &mut backlog).await {
                Ok(()) => break,
                Err(e) => {
                    self.status.set_intake_connected(false);
                    tracing::warn!(error = %e, "intake lost the broker; reconnecting");
                    if !backoff.wait(self.ctx.halt.cancelled()).await {
                        break;
                    }
                }
            }
        }
        self.status.set_intake_connected(false);
    }

    /// One connection's life: declare, consume, record what arrives in batches and hand it to
    /// the executor as it makes room.
    async fn session(
        &self,
        backoff: &mut Backoff,
        backlog: &mut VecDeque<Operation>,
    ) -> Result<(), IntakeError> {
        let (conn, channel, mut consumer) = self.consume().await?;
        self.status.set_intake_connected(true);
        backoff.reset();
        tracing::info!(queue = %self.topology.commands_queue(), most_prefetch = self.prefetch, "consuming commands");
        let mut check = tokio::time::interval(CONNECTION_CHECK);
        let mut session = Session {
            channel: &channel,
            backlog,
            all_settled: true,
            prefetch: COLD_PREFETCH.min(self.prefetch),
            consumers: 1,
            last_delivery: tokio::time::Instant::now(),
        };
        loop {
            tokio::select! {
                _ = check.tick() => {
                    still_connected(&conn)?;
                    if session.prefetch > COLD_PREFETCH && session.last_delivery.elapsed() > IDLE {
                        consumer = self.reconsume(&mut session, consumer, COLD_PREFETCH).await?;
                    }
                }
                () = self.ctx.halt.cancelled() => {
                    self.close(&conn, &channel, consumer).await;
                    return Ok(());
                }
                permit = self.ops.reserve(), if !session.backlog.is_empty() => match permit {
                    Ok(permit) => permit.send(session.backlog.pop_front().expect("not empty")),
                    Err(_) => {
                        tracing::debug!("the executor has stopped; the recorded commands resume at the next start");
                        session.backlog.clear();
                    }
                },
                delivery = consumer.next(), if session.backlog.len() < BACKLOG => match delivery {
                    Some(Ok(first)) => {
                        let (batch, after) = gather(first, &mut consumer, usize::from(session.prefetch));
                        let sizes: Vec<usize> = batch.iter().map(|d| d.data.len()).collect();
                        let want = next_prefetch(session.prefetch, self.prefetch, &sizes);
                        session.last_delivery = tokio::time::Instant::now();
                        self.handle(&mut session, batch).await?;
                        match after {
                            Some(Err(e)) => return Err(e.into()),
                            Some(Ok(())) => return Err(IntakeError::ConsumerEnded),
                            None => {}
                        }
                        if want != session.prefetch {
                            consumer = self.reconsume(&mut session, consumer, want).await?;
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(IntakeError::ConsumerEnded),
                },
            }
        }
    }

    /// The end of a session at shutdown: at a clean stop, what the broker sent ahead is
    /// recorded; unacknowledged deliveries go back to the queue with the connection.
    async fn close(
        &self,
        conn: &lapin::Connection,
        channel: &Channel,
        mut consumer: lapin::Consumer,
    ) {
        if self.stopping.is_cancelled() {
            self.store_sent_ahead(channel, &mut consumer).await;
        }
        if let Err(e) = conn.close(200, "volume-daemon shutting down".into()).await {
            tracing::debug!(error = %e, "closing the intake connection");
        }
    }

    /// Replaces `consumer` by one created with `prefetch` (RabbitMQ gives a consumer the
    /// prefetch in force when it is created): cancels it, handles what it had been sent (the
    /// stream yields that, then ends), then consumes again.
    async fn reconsume(
        &self,
        session: &mut Session<'_>,
        mut consumer: lapin::Consumer,
        prefetch: u16,
    ) -> Result<lapin::Consumer, IntakeError> {
        let cancel = lapin::options::BasicCancelOptions::default();
        session.channel.basic_cancel(consumer.tag(), cancel).await?;
        let mut sent = Vec::new();
        loop {
            match tokio::time::timeout(ACK_TIMEOUT, consumer.next()).await {
                Ok(Some(delivery)) => sent.push(delivery?),
                Ok(None) => break,
                Err(_) => {
                    let what = "a cancelled consumer did not end";
                    return Err(IntakeError::ConnectionLost(what.to_owned()));
                }
            }
        }
        if !sent.is_empty() {
            self.handle(session, sent).await?;
        }
        let qos = BasicQosOptions { global: false };
        session.channel.basic_qos(prefetch, qos).await?;
        session.consumers += 1;
        session.prefetch = prefetch;
        tracing::debug!(prefetch, "consuming commands with a new prefetch");
        Ok(session
            .channel
            .basic_consume(
                self.topology.commands_queue().into(),
                consumer_tag(session.consumers).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// A connection, its channel (prefetch set, confirms on) and a consumer of the commands
    /// queue, the topology declared first.
    async fn consume(&self) -> Result<(lapin::Connection, Channel, lapin::Consumer), IntakeError> {
        let conn = broker::connect(&self.broker, "volume-daemon intake").await?;
        let channel = conn.create_channel().await?;
        schema::amqp::declare(&channel, &self.topology).await?;
        channel
            .basic_qos(
                COLD_PREFETCH.min(self.prefetch),
                BasicQosOptions { global: false },
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.topology.commands_queue().into(),
                consumer_tag(1).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((conn, channel, consumer))
    }

    /// Rejects the invalid messages of `batch`, then records the valid ones together and
    /// acknowledges them.
    async fn handle(
        &self,
        session: &mut Session<'_>,
        batch: Vec<Delivery>,
    ) -> Result<(), IntakeError> {
        let mut valid = Vec::with_capacity(batch.len());
        for delivery in batch {
            let props = message_props(&delivery);
            match Command::parse(&delivery.data, &props) {
                Ok(mut command) => {
                    if props.traceparent.is_some() && command.trace.is_none() {
                        tracing::warn!(operation_id = %command.command_id, traceparent = ?props.traceparent, "malformed traceparent header ignored");
                    }
                    command.reply_to = self.allowed_reply_to(&command.command_id, command.reply_to);
                    valid.push((command, delivery));
                }
                Err(mut invalid) => {
                    let id = invalid.command_id.clone();
                    invalid.reply_to =
                        id.and_then(|id| self.allowed_reply_to(&id, invalid.reply_to));
                    self.reject(session.channel, delivery, invalid).await?;
                }
            }
        }
        if valid.is_empty() {
            return Ok(());
        }
        self.accept(session, valid).await
    }

    /// `reply_to` if `REPLY_TO_ALLOWED` allows it. Any other queue gets no copy (a producer must
    /// not make the daemon publish into queues of its choosing); the event still leaves on the
    /// events exchange.
    fn allowed_reply_to(&self, id: &CommandId, reply_to: Option<String>) -> Option<String> {
        let queue = reply_to?;
        if self.reply_to_allowed.allows(&queue) {
            return Some(queue);
        }
        tracing::warn!(operation_id = %id, reply_to = %queue, "reply_to names a queue outside REPLY_TO_ALLOWED; the event goes to the events exchange only");
        None
    }

    /// Commits the commands (one statement when they are new), then acknowledges them. While
    /// the database is unreachable the deliveries stay unacknowledged and are retried; at
    /// shutdown or after a fence they return to the queue. A batch the database refuses for
    /// good is recorded one command at a time, so only the command at fault is returned.
    async fn accept(
        &self,
        session: &mut Session<'_>,
        valid: Vec<(Command, Delivery)>,
    ) -> Result<(), IntakeError> {
        let commands: Vec<Command> = valid.iter().map(|(c, _)| c.clone()).collect();
        let recorded = retry::persistent(
            "record the commands",
            &self.ctx.halt,
            Some(ACCEPT_TIMEOUT),
            || async {
                (self
                    .ctx
                    .store
                    .accept_all(commands.clone())
                    .await
                    .into_iter())
                .collect::<Result<Vec<Accepted>, _>>()
            },
        )
        .await;
        match recorded {
            Ok(accepted) => {
                for (accepted, (command, _)) in accepted.into_iter().zip(&valid) {
                    self.take(session.backlog, &command.command_id, accepted);
                }
                let deliveries: Vec<Delivery> = valid.into_iter().map(|(_, d)| d).collect();
                session.ack(deliveries).await
            }
            // The deliveries return to the queue (for the next holder) when this consumer's
            // channel closes.
            Err(GaveUp::Stopped) => {
                session.all_settled = false;
                Ok(())
            }
            Err(GaveUp::Fenced(f)) => {
                tracing::error!(commands = valid.len(), error = %f, "commands not recorded: fenced");
                self.ctx.fenced.cancel();
                session.all_settled = false;
                Ok(())
            }
            Err(GaveUp::Permanent(e)) => {
                tracing::warn!(commands = valid.len(), error = %e, "a batch of commands could not be recorded; recording them one at a time");
                for (command, delivery) in valid {
                    self.accept_one(session, command, delivery).await?;
                }
                Ok(())
            }
        }
    }

    /// [`Intake::accept`] of one command: acknowledged once recorded, returned to the queue
    /// (counting against its delivery limit) when the database refuses it for good.
    async fn accept_one(
        &self,
        session: &mut Session<'_>,
        command: Command,
        delivery: Delivery,
    ) -> Result<(), IntakeError> {
        let id = command.command_id.clone();
        let Some(accepted) = self.record(command, &delivery).await? else {
            session.all_settled = false;
            return Ok(());
        };
        self.take(session.backlog, &id, accepted);
        settle(delivery.acker.ack(BasicAckOptions::default())).await?;
        Ok(())
    }

    /// What a recorded command becomes: an operation for the executor (in arrival order), or
    /// nothing (a duplicate of an ended one, whose event was queued again). Kept until the
    /// executor takes it; if the period ends first, the row is pending and resumes at the
    /// next start (here or at the next holder): recorded commands are acknowledged either
    /// way, since returning one would count against its delivery limit at every stop.
    fn take(&self, backlog: &mut VecDeque<Operation>, id: &CommandId, accepted: Accepted) {
        match accepted {
            Accepted::New(op) => {
                self.ctx.metrics.command_received("accepted");
                tracing::info!(operation_id = %id, r#type = %op.command.operation_type(), "command accepted");
                backlog.push_back(*op);
            }
            Accepted::InFlight(op) => {
                self.ctx.metrics.command_received("duplicate");
                // Usually the executor has it already and ignores this copy. After a lost commit
                // acknowledgement (the INSERT committed, its answer never came) it does not:
                // handing it over is what keeps the command from being acked and forgotten.
                tracing::info!(operation_id = %id, "duplicate of an operation in flight; making sure it runs");
                backlog.push_back(*op);
            }
            Accepted::Ended => {
                self.ctx.metrics.command_received("duplicate");
                tracing::info!(operation_id = %id, "duplicate of an ended operation; its event is published again");
            }
        }
    }

    /// At a clean stop: the deliveries the broker sent ahead (up to the prefetch) are
    /// recorded and acknowledged instead of going back to the queue, where each return counts
    /// against the delivery limit (restarts alone would otherwise dead-letter a valid command
    /// that waited behind a full executor). One bounded attempt each; what cannot be recorded
    /// (or is invalid) returns to the queue as before. They run at the next start.
    async fn store_sent_ahead(&self, channel: &Channel, consumer: &mut lapin::Consumer) {
        let tag = consumer.tag();
        if let Err(e) = channel
            .basic_cancel(tag, lapin::options::BasicCancelOptions::default())
            .await
        {
            tracing::debug!(error = %e, "cancelling the intake's consumer");
            return;
        }
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(SENT_AHEAD_WAIT, consumer.next()).await
        {
            let Ok(mut command) = Command::parse(&delivery.data, &message_props(&delivery)) else {
                continue;
            };
            let id = command.command_id.clone();
            command.reply_to = self.allowed_reply_to(&id, command.reply_to);
            let stored = tokio::time::timeout(ACCEPT_TIMEOUT, self.ctx.store.accept(command)).await;
            match stored {
                Ok(Ok(_)) => {
                    self.ctx.metrics.command_received("accepted");
                    tracing::info!(operation_id = %id, "command accepted at shutdown; it runs at the next start");
                    if let Err(e) = settle(delivery.acker.ack(BasicAckOptions::default())).await {
                        tracing::warn!(operation_id = %id, error = %e, "acknowledging a command recorded at shutdown");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(operation_id = %id, error = %e, "command not recorded at shutdown; it returns to the queue")
                }
                Err(_) => {
                    tracing::warn!(operation_id = %id, "recording a command at shutdown timed out; it returns to the queue")
                }
            }
        }
    }

    /// Commits `command` with the persistent retry policy, each attempt bounded, and raced
    /// with shutdown: a half-open database connection must not keep this consumer (the queue's
    /// single active one) registered after a fence. `None`: not recorded, not acknowledged.
    async fn record(
        &self,
        command: Command,
        delivery: &Delivery,
    ) -> Result<Option<Accepted>, IntakeError> {
        let id = command.command_id.clone();
        let accepted = retry::persistent(
            "record the command",
            &self.ctx.halt,
            Some(ACCEPT_TIMEOUT),
            || self.ctx.store.accept(command.clone()),
        )
        .await;
        match accepted {
            Ok(a) => Ok(Some(a)),
            // At shutdown or after a fence the delivery returns to the queue (for the next
            // holder) when this consumer's channel closes.
            Err(GaveUp::Stopped) => Ok(None),
            Err(GaveUp::Fenced(f)) => {
                tracing::error!(operation_id = %id, error = %f, "command not recorded: fenced");
                self.ctx.fenced.cancel();
                Ok(None)
            }
            Err(GaveUp::Permanent(e)) => {
                // Back to the queue: each try counts against its delivery limit, after which
                // the broker dead-letters it.
                tracing::error!(operation_id = %id, error = %e, "command cannot be recorded; returned to the queue");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                settle(delivery.acker.nack(requeue)).await?;
                Ok(None)
            }
        }
    }

    /// Dead-letters an invalid message with its reason, and tells the producer when possible.
    async fn reject(
        &self,
        channel: &Channel,
        delivery: Delivery,
        invalid: InvalidCommand,
    ) -> Result<(), IntakeError> {
        self.ctx.metrics.command_received("invalid");
        tracing::warn!(
            operation_id = invalid.command_id.as_ref().map(|c| c.to_string()),
            routing_key = %delivery.routing_key,
            reason = %invalid.reason,
            "invalid command; dead-lettering it"
        );
        if let Some(event) = rejection_event(&invalid, delivery.routing_key.as_str()) {
            self.queue_rejection(&event, invalid.reply_to.as_deref())
                .await;
        }

        let props = dead_letter_properties(&delivery, &invalid.reason);
        let published = tokio::time::timeout(DEAD_LETTER_TIMEOUT, async {
            channel
                .basic_publish(
                    self.topology.dead_letter_exchange().into(),
                    delivery.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    props,
                )
                .await?
                .await
        })
        .await;
        match published {
            Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => {
                settle(delivery.acker.ack(BasicAckOptions::default())).await?;
            }
            other => {
                // Let the broker dead-letter it instead (without our reason header).
                let result = match other {
                    Ok(Ok(_)) => "refused (nack)".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no confirm within {DEAD_LETTER_TIMEOUT:?}"),
                };
                tracing::warn!(
                    result,
                    "publishing to the dead-letter exchange failed; rejecting"
                );
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
        Ok(())
    }
}

impl Intake {
    /// Queues the INVALID_COMMAND event of a rejected message, retried while the error is
    /// transient (a dropped connection, a killed session), within [`ACCEPT_TIMEOUT`].
    async fn queue_rejection(&self, event: &CloudEvent, reply_to: Option<&str>) {
        let queued = tokio::time::timeout(
            ACCEPT_TIMEOUT,
            retry::bounded(
                "queue the INVALID_COMMAND event",
                5,
                retry::transient,
                || self.ctx.store.queue_rejection_event(event, reply_to),
            ),
        )
        .await;
        match queued {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot queue the INVALID_COMMAND event"),
            Err(_) => {
                tracing::error!(timeout = ?ACCEPT_TIMEOUT, "queueing the INVALID_COMMAND event timed out")
            }
        }
    }
}

/// The reason header is cut to this many bytes: a hostile message cannot make it large.
const MAX_REASON_BYTES: usize = 1024;

/// The producer's own headers a dead-lettered copy keeps, at most this many bytes in all (as
/// AMQP encodes them): what does not fit is dropped, and the reason says so.
const MAX_KEPT_HEADER_BYTES: usize = 16 * 1024;

/// How long the dead-letter publish may wait for its confirm; past it the message is rejected
/// and the broker dead-letters it itself (without the reason header).
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// The properties a dead-lettered copy carries: those of the message, as the broker's own
/// dead-lettering keeps them (docs/wire.md (processing rule 3)), with its headers cut to
/// [`MAX_KEPT_HEADER_BYTES`], plus our two headers that say why and from where. Never the
/// producer's `user_id` (the broker refuses a publish whose `user_id` is not the connection's
/// user, and closes the channel) nor its `expiration` (the broker drops it too, so the copy
/// does not expire in the dead-letter queue).
fn dead_letter_properties(delivery: &Delivery, reason: &str) -> lapin::BasicProperties {
    let p = &delivery.properties;
    let (mut headers, dropped) = kept_headers(p.headers().as_ref());
    let mut reason = reason.to_owned();
    if !dropped.is_empty() {
        reason = format!(
            "{reason} (headers over {MAX_KEPT_HEADER_BYTES} bytes in all were dropped from this copy: {})",
            dropped.join(", ")
        );
    }
    let reason = schema::error::cut_to(reason, MAX_REASON_BYTES);
    headers.insert(
        headers::REJECTION_REASON.into(),
        AMQPValue::LongString(LongString::from(reason.as_str())),
    );
    headers.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
    );
    let mut props = lapin::BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(broker::PERSISTENT);
    if let Some(v) = p.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = p.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = p.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// The producer's headers that fit in [`MAX_KEPT_HEADER_BYTES`] (in key order; ours are set
/// afterwards, so a producer cannot forge them), and the names of those dropped.
fn kept_headers(from: Option<&FieldTable>) -> (FieldTable, Vec<String>) {
    let mut kept = FieldTable::default();
    let mut dropped = Vec::new();
    let mut used = 0;
    let ours = [headers::REJECTION_REASON, headers::ORIGINAL_ROUTING_KEY];
    for (name, value) in from.map(FieldTable::inner).into_iter().flatten() {
        if ours.contains(&name.as_str()) {
            continue;
        }
        let size = 1 + name.as_str().len() + encoded_len(value);
        if used + size > MAX_KEPT_HEADER_BYTES {
            dropped.push(name.to_string());
            continue;
        }
        used += size;
        kept.insert(name.clone(), value.clone());
    }
    (kept, dropped)
}

/// The bytes AMQP takes to encode `value` (type octet included).
fn encoded_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => {
            4 + (t.inner().iter())
                .map(|(k, v)| 1 + k.as_str().len() + encoded_len(v))
                .sum::<usize>()
        }
        AMQPValue::Void => 0,
    }
}

/// The failed event telling a producer its command was invalid, when the message carried a
/// valid command id (docs/wire.md (processing rule 3)). Its type is the body's when that names a known
/// command type, else the routing key's, else `unknown`.
fn rejection_event(invalid: &InvalidCommand, routing_key: &str) -> Option<CloudEvent> {
    let command_id = invalid.command_id.clone()?;
    let op_type = invalid
        .op_type
        .or_else(|| {
            routing_key
                .strip_prefix("volume.")
                .and_then(OperationType::parse)
        })
        .map_or(EventOpType::Unknown, EventOpType::from);
    let now = store::now();
    let error = EventError::new(ErrorCode::InvalidCommand, invalid.reason.clone());
    let data = EventData::rejected(
        command_id,
        op_type,
        invalid.correlation_id.clone(),
        error,
        now,
    );
    Some(CloudEvent::new(EventId::new_random(), now, data))
}

#[cfg(test)]
mod tests {
    use super::{COLD_PREFETCH, next_prefetch};

    /// A burst starts at two; a batch that fills the prefetch with commands opens it to the
    /// most; one oversized message closes it again; a batch that did not fill it changes
    /// nothing.
    #[test]
    fn the_prefetch_opens_for_a_stream_of_commands_and_closes_for_an_oversized_message() {
        let command = 300;
        let big = 10 << 20;
        assert_eq!(next_prefetch(COLD_PREFETCH, 16, &[command, command]), 16);
        assert_eq!(next_prefetch(COLD_PREFETCH, 16, &[command]), COLD_PREFETCH);
        assert_eq!(next_prefetch(16, 16, &[command; 5]), 16);
        assert_eq!(
            next_prefetch(16, 16, &[command, big, command]),
            COLD_PREFETCH
        );
        assert_eq!(next_prefetch(COLD_PREFETCH, 16, &[big, big]), COLD_PREFETCH);
        assert_eq!(next_prefetch(1, 1, &[command]), 1, "never above the most");
    }
}
