//! A typed stream of completion events for subscribers, with explicit acknowledgement.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Consumer};
use schema::CloudEvent;

use crate::client::{Error, VolumeClient, amqp, missing_or, short};

/// What to subscribe to.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// A durable queue of this name survives the subscriber (it receives events while nobody
    /// listens); `None`: a private queue that lives as long as the stream.
    pub queue: Option<String>,
    /// Routing-key patterns, e.g. `volume.#`, `volume.attach.*`, `volume.*.failed`.
    pub patterns: Vec<String>,
    /// Unacknowledged events in hand at most.
    pub prefetch: u16,
}

impl Default for Subscription {
    fn default() -> Self {
        Self {
            queue: None,
            patterns: vec!["volume.#".into()],
            prefetch: 32,
        }
    }
}

/// Events as they arrive. Each must be acknowledged ([`ReceivedEvent::ack`]) or it is
/// delivered again to the queue's next consumer.
#[derive(Debug)]
pub struct EventStream {
    _channel: Channel,
    consumer: Consumer,
}

/// One event, not yet acknowledged.
#[derive(Debug)]
pub struct ReceivedEvent {
    pub event: CloudEvent,
    /// Delivered before (to this or another subscriber): dedupe on `event.id`.
    pub redelivered: bool,
    acker: Acker,
}

impl ReceivedEvent {
    pub async fn ack(self) -> Result<(), Error> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(amqp("acknowledging an event"))
    }

    /// Gives the event back (`requeue`) or drops it.
    pub async fn reject(self, requeue: bool) -> Result<(), Error> {
        self.acker
            .reject(BasicRejectOptions { requeue })
            .await
            .map(|_| ())
            .map_err(amqp("rejecting an event"))
    }
}

impl VolumeClient {
    /// Subscribes to completion events.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), publisher::Error> {
    /// let client = publisher::VolumeClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "volume").await?;
    /// let mut events = client.subscribe(publisher::Subscription::default()).await?;
    /// while let Some(received) = events.next().await {
    ///     let received = received?;
    ///     println!("{} {}", received.event.event_type, received.event.data.command_id);
    ///     received.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, sub: Subscription) -> Result<EventStream, Error> {
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel for events"))?;
        channel
            .basic_qos(sub.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(amqp("setting the event prefetch"))?;
        let queue_name = short(
            "subscription queue name",
            sub.queue.as_deref().unwrap_or(""),
        )?;
        let patterns = sub
            .patterns
            .iter()
            .map(|p| Ok((p, short(format!("pattern {p:?}"), p)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let options = match &sub.queue {
            Some(_) => QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            None => QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        };
        let queue = channel
            .queue_declare(queue_name, options, FieldTable::default())
            .await
            .map_err(amqp("declaring the event queue"))?;
        let exchange = self.topology.events_exchange();
        for (pattern, key) in patterns {
            channel
                .queue_bind(
                    queue.name().clone(),
                    exchange.as_str().into(),
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(missing_or(
                    &exchange,
                    format!("binding {pattern:?} to {exchange}"),
                ))?;
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("consuming events"))?;
        Ok(EventStream {
            _channel: channel,
            consumer,
        })
    }
}

impl EventStream {
    /// The next event. A message that is not a volume event is dropped (rejected without
    /// requeue) with a warning and the stream goes on. `None` when the stream was cancelled.
    pub async fn next(&mut self) -> Option<Result<ReceivedEvent, Error>> {
        loop {
            let delivery = match self.consumer.next().await? {
                Ok(d) => d,
                Err(e) => return Some(Err(amqp("receiving events")(e))),
            };
            match serde_json::from_slice::<CloudEvent>(&delivery.data) {
                Ok(event) => {
                    return Some(Ok(ReceivedEvent {
                        event,
                        redelivered: delivery.redelivered,
                        acker: delivery.acker,
                    }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, routing_key = %delivery.routing_key, "dropping a message that is not a volume event");
                    if let Err(e) = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                    {
                        return Some(Err(amqp("rejecting a message that is not an event")(e)));
                    }
                }
            }
        }
    }
}
