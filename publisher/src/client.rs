//! Publishing commands and waiting for their terminal events.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};

use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use schema::{CloudEvent, Command, CommandId, Topology};

/// What can go wrong publishing a command or waiting for its event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the broker at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("no broker address accepted a connection: {failures}")]
    ConnectList { failures: String },
    #[error(
        "exchange {exchange:?} does not exist: volume-daemon's topology is not declared for this prefix (start the daemon, or call declare_topology)"
    )]
    TopologyMissing { exchange: String },
    #[error("broker error while {doing}: {source}")]
    Amqp {
        doing: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "command {command_id} was not routed: exchange {exchange:?} has no queue bound for {routing_key:?} (is volume-daemon's topology declared?)"
    )]
    Unroutable {
        command_id: CommandId,
        exchange: String,
        routing_key: String,
    },
    #[error("the broker refused command {command_id} (publisher confirm nack)")]
    Nacked { command_id: CommandId },
    #[error("no terminal event for command {command_id} within {waited:?}")]
    Timeout {
        command_id: CommandId,
        waited: Duration,
    },
    #[error("the event stream for command {command_id} ended before its event arrived")]
    StreamEnded { command_id: CommandId },
    #[error("{what} is {len} bytes; AMQP allows at most 255")]
    TooLong { what: String, len: usize },
    #[error("invalid AMQP prefix: {0}")]
    Prefix(#[from] schema::topology::PrefixError),
}

/// `s` as an AMQP short string, or [`Error::TooLong`] naming `what` (never a panic).
pub(crate) fn short(what: impl std::fmt::Display, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|_| Error::TooLong {
        what: what.to_string(),
        len: s.len(),
    })
}

pub(crate) fn amqp(doing: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    let doing = doing.into();
    move |source| Error::Amqp { doing, source }
}

/// The broker's 404: an exchange or queue that does not exist.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404)
}

/// A broker error while using `name`: [`Error::TopologyMissing`] when it does not exist.
pub(crate) fn missing_or(
    name: &str,
    doing: impl Into<String>,
) -> impl FnOnce(lapin::Error) -> Error {
    let (name, doing) = (name.to_owned(), doing.into());
    move |e| {
        if is_not_found(&e) {
            Error::TopologyMissing { exchange: name }
        } else {
            Error::Amqp { doing, source: e }
        }
    }
}

/// Connects to the first URL of a comma-separated list that accepts a connection.
async fn connect_first(urls: &str) -> Result<Connection, Error> {
    let list = schema::SecretUrl::new(urls).split_list();
    let mut failures = Vec::new();
    for url in &list {
        match Connection::connect(url.expose(), ConnectionProperties::default()).await {
            Ok(conn) => return Ok(conn),
            Err(source) if list.len() == 1 => {
                return Err(Error::Connect {
                    url: url.to_string(),
                    source,
                });
            }
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    Err(Error::ConnectList {
        failures: if failures.is_empty() {
            "the URL list is empty".into()
        } else {
            failures.join("; ")
        },
    })
}

/// A connection to the broker for publishing volume commands.
pub struct VolumeClient {
    pub(crate) conn: Connection,
    channel: Channel,
    pub(crate) topology: Topology,
}

impl std::fmt::Debug for VolumeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeClient")
            .field("topology", &self.topology)
            .finish()
    }
}

impl VolumeClient {
    /// Connects and opens a channel in publisher-confirm mode. `url` may be a comma-separated
    /// list (the nodes of a cluster): the first that accepts a connection is used. The topology is not declared:
    /// call [`declare_topology`](Self::declare_topology) if this client may be first.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, Error> {
        let topology = Topology::parse(prefix)?;
        let conn = connect_first(url).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        Ok(Self {
            conn,
            channel,
            topology,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares the exchanges and queues of docs/wire.md (idempotent).
    pub async fn declare_topology(&self) -> Result<(), Error> {
        schema::amqp::declare(&self.channel, &self.topology)
            .await
            .map_err(amqp(format!(
                "declaring the topology for prefix {:?}",
                self.topology.prefix()
            )))
    }

    /// Publishes `command` (persistent, mandatory, confirmed) and returns a handle that waits
    /// for its terminal event. The event listener is bound *before* publishing, so an event
    /// that arrives before [`PendingCommand::wait`] is called is not missed.
    pub async fn publish(&self, command: &Command) -> Result<PendingCommand, Error> {
        let events = self.listen(command).await?;
        self.publish_only(command).await?;
        Ok(events)
    }

    /// Publishes without listening for the event.
    pub async fn publish_only(&self, command: &Command) -> Result<(), Error> {
        let id = &command.command_id;
        let body = serde_json::to_vec(&command.to_body()).unwrap_or_default();
        let routing_key = Topology::command_routing_key(command.operation_type());
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into())
            .with_delivery_mode(2);
        if let Some(c) = &command.correlation_id {
            props = props.with_correlation_id(short(format!("correlation id of {id}"), c)?);
        }
        if let Some(r) = &command.reply_to {
            props = props.with_reply_to(short(format!("reply_to of {id}"), r)?);
        }
        if let Some(trace) = &command.trace {
            // W3C Trace Context: the daemon's events come back in the same trace.
            let mut headers = lapin::types::FieldTable::default();
            let long = |v: &str| lapin::types::AMQPValue::LongString(v.to_owned().into());
            headers.insert("traceparent".into(), long(&trace.traceparent));
            if let Some(state) = &trace.tracestate {
                headers.insert("tracestate".into(), long(state));
            }
            props = props.with_headers(headers);
        }
        let confirm = self
            .channel
            .basic_publish(
                self.topology.commands_exchange().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                props,
            )
            .await
            .map_err(amqp(format!("publishing command {id}")))?
            .await
            .map_err(missing_or(
                &self.topology.commands_exchange(),
                format!("waiting for the broker to confirm command {id}"),
            ))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::Unroutable {
                command_id: id.clone(),
                exchange: self.topology.commands_exchange(),
                routing_key,
            }),
            Confirmation::Nack(None) => Err(Error::Nacked {
                command_id: id.clone(),
            }),
        }
    }

    /// Binds a private queue to the command's completed and failed events.
    async fn listen(&self, command: &Command) -> Result<PendingCommand, Error> {
        let id = &command.command_id;
        let queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("declaring the event queue for command {id}")))?;
        let pattern = format!("volume.{}.*", command.operation_type());
        self.channel
            .queue_bind(
                queue.name().clone(),
                self.topology.events_exchange().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(missing_or(
                &self.topology.events_exchange(),
                format!("binding to {}", self.topology.events_exchange()),
            ))?;
        let consumer = self
            .channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("consuming events for command {id}")))?;
        Ok(PendingCommand {
            command_id: id.clone(),
            consumer,
        })
    }
}

/// A published command whose terminal event can be awaited.
#[derive(Debug)]
pub struct PendingCommand {
    command_id: CommandId,
    consumer: Consumer,
}

impl PendingCommand {
    pub fn command_id(&self) -> &CommandId {
        &self.command_id
    }

    /// The command's terminal event (`completed` or `failed`). Events of other commands and
    /// messages that are not events are skipped.
    pub async fn wait(mut self, timeout: Duration) -> Result<CloudEvent, Error> {
        let id = self.command_id.clone();
        let found = tokio::time::timeout(timeout, async {
            while let Some(delivery) = self.consumer.next().await {
                let delivery =
                    delivery.map_err(amqp(format!("receiving events for command {id}")))?;
                match serde_json::from_slice::<CloudEvent>(&delivery.data) {
                    Ok(event) if event.data.command_id == id => return Ok(event),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a message that is not a volume event")
                    }
                }
            }
            Err(Error::StreamEnded {
                command_id: id.clone(),
            })
        })
        .await;
        found.unwrap_or(Err(Error::Timeout {
            command_id: self.command_id,
            waited: timeout,
        }))
    }
}
