//! Inspecting and replaying dead-lettered commands (`<prefix>.commands.dead`).

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::client::{Error, VolumeClient, amqp, missing_or};

/// Header the daemon sets on a message it dead-letters.
use schema::topology::headers::{ORIGINAL_ROUTING_KEY, REJECTION_REASON as REASON_HEADER};

/// A dead-lettered command.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The AMQP `message_id`, else the body's `command_id`, when there is one.
    pub id: Option<String>,
    /// The routing key it was published with (`volume.<type>`).
    pub routing_key: String,
    /// Why: the daemon's `x-rejection-reason`, else the broker's `x-death` reason (for
    /// example `delivery_limit` for a poison message).
    pub reason: String,
    pub body: Vec<u8>,
    properties: BasicProperties,
}

/// A dead letter that was published again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// As [`DeadLetter::id`].
    pub id: Option<String>,
    pub routing_key: String,
}

/// Most messages looked at in one call.
const MAX: usize = 10_000;

fn header_string(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn death_reason(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_string(first, "reason")
}

impl DeadLetter {
    fn from_message(routing_key: String, properties: BasicProperties, body: Vec<u8>) -> Self {
        let headers = properties.headers().clone().unwrap_or_default();
        let id = properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .or_else(|| {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()?
                    .get("command_id")?
                    .as_str()
                    .map(str::to_owned)
            });
        let reason = header_string(&headers, REASON_HEADER)
            .or_else(|| death_reason(&headers))
            .unwrap_or_else(|| "unknown".into());
        Self {
            id,
            routing_key,
            reason,
            body,
            properties,
        }
    }

    /// The properties to publish it again with: without the dead-lettering headers.
    fn replay_properties(&self) -> BasicProperties {
        const DROPPED: [&str; 6] = [
            REASON_HEADER,
            ORIGINAL_ROUTING_KEY,
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
        ];
        let old = self.properties.headers().clone().unwrap_or_default();
        let mut headers = FieldTable::default();
        for (k, v) in old.inner() {
            if !DROPPED.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
        self.properties.clone().with_headers(headers)
    }
}

impl VolumeClient {
    async fn dead_channel(&self) -> Result<Channel, Error> {
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel for dead letters"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        Ok(channel)
    }

    /// The next dead letter, held unacknowledged (it returns to the queue when the channel
    /// closes, unless acknowledged), or `None` when the queue has no more.
    async fn next_dead(&self, channel: &Channel) -> Result<Option<(u64, DeadLetter)>, Error> {
        let queue = self.topology.dead_letter_queue();
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .map_err(missing_or(&queue, format!("reading {queue}")))?;
        Ok(got.map(|msg| {
            let d = msg.delivery;
            (
                d.delivery_tag,
                DeadLetter::from_message(d.routing_key.to_string(), d.properties, d.data),
            )
        }))
    }

    /// Shows `visit` every dead letter (at most `MAX`), oldest first, one at a time: each is
    /// dropped before the next is read, so however many and however large they are, one
    /// message is held in memory. They stay in the queue. Returns how many were shown.
    pub async fn each_dead_letter(
        &self,
        mut visit: impl FnMut(&DeadLetter),
    ) -> Result<usize, Error> {
        let channel = self.dead_channel().await?;
        let mut seen = 0;
        while seen < MAX {
            let Some((_, letter)) = self.next_dead(&channel).await? else {
                break;
            };
            visit(&letter);
            seen += 1;
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(seen)
    }

    /// The dead-lettered commands, oldest first (at most `MAX`, all in memory: prefer
    /// [`Self::each_dead_letter`] for a queue that may be large). They stay in the queue.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, Error> {
        let mut out = Vec::new();
        self.each_dead_letter(|l| out.push(l.clone())).await?;
        Ok(out)
    }

    /// Publishes the dead letters `pick` selects to the commands exchange again (with their
    /// original routing key, without the dead-lettering headers) and removes them from the
    /// dead-letter queue once the broker confirmed, one at a time (one message in memory).
    /// Returns the id and routing key of each one replayed.
    pub async fn replay_dead_letters(
        &self,
        pick: impl Fn(&DeadLetter) -> bool,
    ) -> Result<Vec<Replayed>, Error> {
        let channel = self.dead_channel().await?;
        let mut replayed = Vec::new();
        for _ in 0..MAX {
            let Some((tag, letter)) = self.next_dead(&channel).await? else {
                break;
            };
            if !pick(&letter) {
                continue;
            }
            let confirm = channel
                .basic_publish(
                    self.topology.commands_exchange().as_str().into(),
                    letter.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &letter.body,
                    letter.replay_properties(),
                )
                .await
                .map_err(amqp("replaying a dead letter"))?
                .await
                .map_err(amqp("waiting for the broker to confirm a replay"))?;
            match confirm {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                _ => {
                    return Err(Error::Unroutable {
                        command_id: schema::CommandId::parse(
                            letter.id.as_deref().unwrap_or("unknown"),
                        )
                        .unwrap_or_else(|_| schema::CommandId::random()),
                        exchange: self.topology.commands_exchange(),
                        routing_key: letter.routing_key.clone(),
                    });
                }
            }
            channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(amqp("removing a replayed dead letter"))?;
            replayed.push(Replayed {
                id: letter.id,
                routing_key: letter.routing_key,
            });
        }
        let _ = channel.close(200, "replayed".into()).await;
        Ok(replayed)
    }

    /// How many messages the dead-letter queue holds (a passive declare: creates nothing).
    pub async fn dead_letter_count(&self) -> Result<u32, Error> {
        let queue = self.topology.dead_letter_queue();
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel to count dead letters"))?;
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(missing_or(&queue, format!("counting {queue}")))?;
        let _ = channel.close(200, "counted".into()).await;
        Ok(declared.message_count())
    }

    /// Removes the dead letters `pick` selects from the dead-letter queue, one at a time, for
    /// good (the others stay). Returns the id and routing key of each one removed.
    pub async fn discard_dead_letters(
        &self,
        pick: impl Fn(&DeadLetter) -> bool,
    ) -> Result<Vec<Replayed>, Error> {
        let channel = self.dead_channel().await?;
        let mut discarded = Vec::new();
        for _ in 0..MAX {
            let Some((tag, letter)) = self.next_dead(&channel).await? else {
                break;
            };
            if !pick(&letter) {
                continue;
            }
            channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(amqp("removing a dead letter"))?;
            discarded.push(Replayed {
                id: letter.id,
                routing_key: letter.routing_key,
            });
        }
        // The ones not picked, still unacknowledged, return to the queue.
        let _ = channel.close(200, "discarded".into()).await;
        Ok(discarded)
    }
}
