//! Building and running the daemon: [`Application::build`] connects and binds (so start-up
//! errors surface before anything runs), [`Application::run_until_stopped`] runs every task
//! until the shutdown future resolves, then stops them in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::MySqlPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use cloudstack::{Client, Credentials, RetryPolicy};

use crate::cloud::{Cloud, CloudEnv};
use crate::config::Settings;
use crate::context::Context;
use crate::db::{self, DbError};
use crate::devices::{self, Devices, Monitor};
use crate::executor;
use crate::http::{self, HttpState};
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::status::Status;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot listen on HTTP_ADDR {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot build the HTTP client for CloudStack: {0}")]
    Http(#[from] cloudstack::CloudStackError),
}

/// A daemon ready to run.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    pool: MySqlPool,
    listener: TcpListener,
    cloud: Cloud,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let env_creds = match (
            &settings.cloudstack_api_url,
            &settings.cloudstack_api_key,
            &settings.cloudstack_secret_key,
        ) {
            (None, _, _) => None,
            (Some(url), Some(key), Some(secret)) => Some(Credentials {
                api_url: url.clone(),
                api_key: key.clone(),
                secret_key: secret.clone(),
            }),
            (Some(_), _, _) => {
                return Err(StartError::Config(
                    "CLOUDSTACK_API_URL is set but CLOUDSTACK_API_KEY or CLOUDSTACK_SECRET_KEY is not".into(),
                ));
            }
        };
        let max_connections = u32::from(settings.max_concurrent_operations) + 4;
        let pool = db::connect_and_migrate(&settings.database_url, max_connections).await?;
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.http_addr,
                source,
            })?;
        let retry = RetryPolicy {
            deadline: Duration::from_secs(settings.cloudstack_retry_deadline_s),
            ..RetryPolicy::default()
        };
        let env = CloudEnv {
            credentials: env_creds,
            zone: settings.cloudstack_zone_id,
            host_vm: settings.host_vm_id,
        };
        let cloud = Cloud::new(
            Client::http()?,
            pool.clone(),
            env,
            retry,
            settings.job_deadlines(),
        );
        Ok(Self {
            settings,
            pool,
            listener,
            cloud,
        })
    }

    /// The bound HTTP address (useful when `HTTP_ADDR` asked for port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.http_addr)
    }

    /// Runs until `shutdown` resolves, then: stop consuming, give in-flight operations
    /// `SHUTDOWN_GRACE_S` to reach a safe point, publish what the outbox holds, stop serving.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let Self {
            settings,
            pool,
            listener,
            cloud,
        } = self;
        let topology = settings.topology();
        let status = Arc::new(Status::default());
        let metrics = Arc::new(Metrics::new());

        // The device monitor runs from the start: correlation reads its table.
        let monitor = Monitor::new(settings.sysfs_root.clone(), settings.device_poll_interval());
        let devices = Devices::new(
            monitor.table(),
            monitor.events(),
            settings.device_by_id_dir.clone(),
            settings.device_poll_interval(),
        );
        let monitor_stop = CancellationToken::new();
        let monitor_task = tokio::spawn(monitor.run(monitor_stop.clone()));
        let sync_task = tokio::spawn(devices::sync::run(
            pool.clone(),
            devices.clone(),
            metrics.clone(),
            monitor_stop.clone(),
        ));

        let ctx = Arc::new(Context {
            store: Store::new(pool.clone(), topology.clone()),
            cloud,
            metrics: metrics.clone(),
            devices: devices.clone(),
            correlation_timeout: settings.correlation_timeout(),
            relay_wakeup: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
        });

        let http_stop = CancellationToken::new();
        let http = tokio::spawn({
            let app = http::router(HttpState {
                pool: pool.clone(),
                status: status.clone(),
                metrics: metrics.clone(),
                devices: devices.clone(),
            });
            let stop = http_stop.clone();
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }
        });

        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(
            Relay {
                pool: pool.clone(),
                amqp_url: settings.amqp_url.clone(),
                wakeup: ctx.relay_wakeup.clone(),
                status: status.clone(),
                metrics: metrics.clone(),
                stop: relay_stop.clone(),
            }
            .run(),
        );

        let max = usize::from(settings.max_concurrent_operations);
        let (ops_tx, ops_rx) = mpsc::channel(max);
        let executor = tokio::spawn(executor::run(
            ctx.clone(),
            ops_rx,
            max,
            settings.shutdown_grace(),
        ));

        // Operations accepted before a restart go first.
        let resumed = match ctx.store.resumable().await {
            Ok(ops) => ops,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unfinished operations; they resume at the next start");
                Vec::new()
            }
        };
        if !resumed.is_empty() {
            tracing::info!(count = resumed.len(), "resuming unfinished operations");
        }
        let resume = tokio::spawn({
            let tx = ops_tx.clone();
            async move {
                for op in resumed {
                    if tx.send(op).await.is_err() {
                        break;
                    }
                }
            }
        });

        let intake = tokio::spawn(
            Intake {
                ctx: ctx.clone(),
                amqp_url: settings.amqp_url.clone(),
                topology,
                prefetch: settings.max_concurrent_operations,
                ops: ops_tx,
                status: status.clone(),
            }
            .run(),
        );
        tracing::info!(http = %settings.http_addr, prefix = %settings.amqp_prefix, "volume-daemon running");

        shutdown.await;
        tracing::info!("shutting down");
        ctx.shutdown.cancel();
        report("intake", intake.await);
        report("resume", resume.await);
        report("executor", executor.await);
        // Give the relay a moment to publish the outcomes just recorded.
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay_stop.cancel();
        report("relay", relay.await);
        monitor_stop.cancel();
        report("device monitor", monitor_task.await);
        report("mapping sync", sync_task.await);
        http_stop.cancel();
        match http.await {
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP server failed"),
            other => report("http", other.map(|_| ())),
        }
        pool.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Logs how a task ended.
fn report(task: &str, result: Result<(), tokio::task::JoinError>) {
    match result {
        Ok(()) => tracing::debug!(task, "task stopped"),
        Err(e) if e.is_panic() => tracing::error!(task, error = %e, "task panicked"),
        Err(e) => tracing::warn!(task, error = %e, "task was cancelled"),
    }
}
