//! Broker connections. Each long-running task (intake, relay) owns its own connection and
//! reconnects it with backoff; nothing from an old connection (channels, delivery tags) is
//! used after it broke, because acknowledgements on a dead channel fail.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use schema::SecretUrl;
use tokio_util::sync::CancellationToken;

/// AMQP `delivery_mode` of a message the broker keeps on disk.
pub(crate) const PERSISTENT: u8 = 2;

/// Where the broker is: its URL (or a comma-separated list of URLs, tried in order: the nodes
/// of a cluster) and, for `amqps://`, the CA certificates (PEM) to trust besides the public
/// roots. `amqps://` is always TLS (rustls); it never falls back to plaintext.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: SecretUrl,
    /// Public certificates, not a secret.
    pub ca_pem: Option<String>,
}

/// Connecting to one address gives up after this (a half-open network must not hang a
/// reconnect loop).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `name` (visible in the management UI) to the first address of the
/// endpoint that accepts one, trying them in order every time (docs/configuration.md).
pub(crate) async fn connect(endpoint: &Endpoint, name: &str) -> Result<Connection, lapin::Error> {
    let urls = endpoint.url.split_list();
    let mut failures = Vec::with_capacity(urls.len());
    for url in &urls {
        match connect_one(endpoint, url, name).await {
            Ok(conn) => {
                if !failures.is_empty() {
                    tracing::info!(connection = name, broker = %url, skipped = %failures.join("; "), "connected to a later broker address");
                }
                return Ok(conn);
            }
            Err(e) if urls.len() == 1 => return Err(e),
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    Err(io_error(format!(
        "no broker address accepted a connection: {}",
        if failures.is_empty() {
            "AMQP_URL lists none".to_owned()
        } else {
            failures.join("; ")
        }
    )))
}

/// The largest AMQP frame the daemon's connections ask for, unless the URL sets `frame_max`.
/// lapin keeps a receive and a send buffer of 32 frames for each connection, written through:
/// at RabbitMQ's default of 128 KiB that is 8 MiB of memory per connection, three per
/// instance. A command (at most 64 KiB) or an event fits in one or two frames of 32 KiB.
const FRAME_MAX: u32 = 32 * 1024;

async fn connect_one(
    endpoint: &Endpoint,
    url: &SecretUrl,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: endpoint.ca_pem.clone(),
    };
    let runtime = lapin::runtime::default_runtime()?;
    let mut uri: lapin::uri::AMQPUri = (url.expose().parse())
        .map_err(|e: String| io_error(format!("the broker URL does not parse: {e}")))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let connecting = Connection::connect_uri_with_config(uri, props, tls, runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected,
        Err(_) => Err(io_error(format!(
            "connecting to the broker timed out after {CONNECT_TIMEOUT:?}"
        ))),
    }
}

fn io_error(message: String) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
        std::io::Error::other(message),
    )))
}

/// Reconnection delays: 200 ms growing to 5 s, with jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    delays: ExponentialBackoff,
}

fn delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delays: delays() }
    }
}

impl Backoff {
    /// Sleeps for the next delay; `false` when `stop` resolved first.
    pub(crate) async fn wait(&mut self, stop: impl Future<Output = ()>) -> bool {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = stop => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Starts again from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.delays = delays();
    }
}

/// How often the probe counts the dead-letter queue's messages.
const DEAD_LETTER_COUNT_EVERY: Duration = Duration::from_secs(5);

/// Keeps one idle connection to the broker and reports whether it is up: how a standby (which
/// neither consumes nor publishes) knows the broker is reachable. Every
/// [`DEAD_LETTER_COUNT_EVERY`] it also counts `dead_queue`'s messages (a passive declare, which
/// creates nothing) for `volume_daemon_dead_letters`.
pub(crate) async fn probe(
    url: Endpoint,
    dead_queue: String,
    status: std::sync::Arc<crate::status::Status>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        match connect(&url, "volume-daemon probe").await {
            Ok(conn) => {
                status.set_broker_reachable(true);
                backoff.reset();
                let closed = watch_probe(&conn, &dead_queue, &metrics, &shutdown).await;
                if !closed {
                    let _ = conn.close(200, "shutting down".into()).await;
                    return;
                }
                status.set_broker_reachable(false);
            }
            Err(e) => {
                status.set_broker_reachable(false);
                tracing::debug!(error = %e, "broker probe cannot connect");
            }
        }
        if !backoff.wait(shutdown.cancelled()).await {
            return;
        }
    }
}

/// Holds the probe's connection until it fails (`true`) or `shutdown` (`false`), counting the
/// dead letters meanwhile.
async fn watch_probe(
    conn: &lapin::Connection,
    dead_queue: &str,
    metrics: &crate::metrics::Metrics,
    shutdown: &CancellationToken,
) -> bool {
    use futures_util::StreamExt;
    let mut events = conn.events_listener();
    let mut count = tokio::time::interval(DEAD_LETTER_COUNT_EVERY);
    count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            event = events.next() => match event {
                // A channel the broker closed (the count's passive declare of a queue not
                // declared yet): the connection is fine.
                Some(lapin::Event::Error(e)) if channel_error(&e) => {
                    tracing::debug!(error = %e, "a channel of the broker probe was closed");
                }
                Some(lapin::Event::Error(e)) => {
                    tracing::debug!(error = %e, "broker probe lost its connection");
                    return true;
                }
                Some(_) => {}
                None => return true,
            },
            _ = count.tick() => {
                if let Some(n) = count_messages(conn, dead_queue).await {
                    metrics.set_dead_letters(n);
                }
            }
        }
    }
}

/// Whether `e` is the broker closing one channel (a soft AMQP error), not the connection.
fn channel_error(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
    )
}

/// The messages in `queue`, from a passive declare on a channel of its own (a missing queue
/// closes that channel, not the connection); `None` when it cannot be read within 5 s.
async fn count_messages(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let count = async {
        let channel = conn.create_channel().await.ok()?;
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
            .await;
        let _ = channel.close(200, "counted".into()).await;
        declared.ok().map(|q| q.message_count())
    };
    tokio::time::timeout(Duration::from_secs(5), count)
        .await
        .ok()
        .flatten()
}

/// Publishes `command` to the commands exchange of `topology` with confirms and the mandatory
/// flag, on a connection of its own (the compatibility listener: a few commands a minute);
/// `Ok` once the broker confirmed it. The reason otherwise.
pub(crate) async fn publish_command(
    endpoint: &Endpoint,
    topology: &schema::Topology,
    command: &schema::Command,
) -> Result<(), String> {
    use lapin::BasicProperties;
    use lapin::Confirmation;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let publish = async {
        let conn = connect(endpoint, "volume-daemon compatibility listener")
            .await
            .map_err(|e| e.to_string())?;
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&command.to_body()).map_err(|e| e.to_string())?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(command.command_id.as_str().into())
            .with_delivery_mode(PERSISTENT);
        let routing_key = schema::Topology::command_routing_key(command.operation_type());
        let confirmed = channel
            .basic_publish(
                topology.commands_exchange().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close(200, "published".into()).await;
        match confirmed {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err("the broker returned it: no queue is bound".into()),
            Confirmation::Nack(_) => Err("the broker refused it".into()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), publish)
        .await
        .map_err(|_| "the broker did not confirm within 10 s".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dead-letter count's passive declare of a queue that does not exist (yet: a daemon
    /// whose topology another instance declares) closes its channel; the probe keeps its
    /// connection and the broker stays reachable (the status test saw "broker: down" once).
    #[tokio::test]
    async fn a_missing_dead_letter_queue_does_not_make_the_broker_unreachable() {
        let url = std::env::var("TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let endpoint = Endpoint {
            url: url.as_str().into(),
            ca_pem: None,
        };
        let status = std::sync::Arc::new(crate::status::Status::default());
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let stop = CancellationToken::new();
        let missing = format!("vd-unit-{}.dead", uuid::Uuid::new_v4().simple());
        let probe = tokio::spawn(probe(
            endpoint,
            missing,
            status.clone(),
            metrics,
            stop.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !status.broker_reachable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "unit tests of the probe need RabbitMQ (scripts/test starts it)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first count runs at once; a reconnect would show as "down" for 200 ms or more.
        for _ in 0..150 {
            assert!(
                status.broker_reachable(),
                "the probe dropped its connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        probe.await.expect("probe");
    }
}
