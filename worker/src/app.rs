//! Building and running the daemon: [`Application::build`] connects and binds (so start-up
//! errors surface before anything runs), [`Application::run_until_stopped`] runs until the
//! shutdown future resolves, then stops everything in order.
//!
//! A daemon is a **standby** until it holds the execution lease (`lease.rs`), then
//! **active**: only then does it consume commands, execute operations, relay the outbox and
//! keep device mappings. Health, readiness, metrics, the broker probe and the device monitor
//! run in both roles. An active daemon that loses its lease (its database connection broke)
//! aborts its operations at once and competes for the lease again; whoever holds it next
//! resumes every unfinished operation from MySQL.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::MySqlPool;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cloudstack::{Client, Credentials, RetryPolicy};

use crate::broker;
use crate::cloud::{Cloud, CloudEnv};
use crate::config::Settings;
use crate::context::Context;
use crate::db::store::Store;
use crate::db::{self, DbError};
use crate::devices::{Devices, Monitor};
use crate::executor;
use crate::housekeeping;
use crate::http::{self, HttpState};
use crate::intake::Intake;
use crate::lease::{self, Lease, Renewal};
use crate::metrics::Metrics;
use crate::operation::Operation;
use crate::operation::host_files::ReconcileError;
use crate::relay::Relay;
use crate::selfcheck::{Checker, Checks};
use crate::status::Status;
use crate::stop::Stop;
use crate::supervise::Watch;

/// Connections of the main pool beyond one per concurrent operation: the intake, the relay
/// and its marking, the mapping sync.
const CONNECTIONS_BESIDE_OPERATIONS: u32 = 4;
const HOUR_S: u64 = 3600;
const DAY_S: u64 = 24 * HOUR_S;

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
    #[error("host appliance files: {0}")]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Appliance(#[from] db::appliance::ClaimError),
}

/// `volume-daemon set-host-vm <vm>`: records `vm` as the appliance's host VM in the database
/// `settings` name (refused while a daemon holds its lease), and logs the change.
pub async fn set_host_vm(settings: &Settings, vm: schema::VmId) -> Result<(), SetHostVmError> {
    let (pool, _) = db::connect(&settings.database_url, 1).await?;
    let name = lease::lease_name(&settings.amqp_prefix);
    let old = db::appliance::set_host_vm(&pool, &name, vm).await;
    pool.close().await;
    let old = old?;
    let old = old.unwrap_or_else(|| "(unset)".into());
    tracing::warn!(old, new = %vm, prefix = settings.amqp_prefix, "the appliance's host VM was changed: start the daemon with HOST_VM_ID={vm}");
    Ok(())
}

/// Why `set-host-vm` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SetHostVmError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Refused(#[from] db::appliance::SetHostError),
}

impl StartError {
    /// Whether restarting cannot help: the database is another program's or another
    /// appliance's (the operator must change the settings).
    pub fn refuses_restart(&self) -> bool {
        match self {
            Self::Database(e) => e.is_foreign(),
            Self::Appliance(db::appliance::ClaimError::Foreign(_)) => true,
            _ => false,
        }
    }
}

/// A daemon ready to run.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    pool: MySqlPool,
    /// A pool of its own for the execution lease: renewals never wait behind operations.
    lease_pool: MySqlPool,
    /// A pool of its own for the HTTP server: its clients never wait for the operations'.
    http_pool: MySqlPool,
    /// The platform's database of `OSSEA_CONFIGS_URL`, if set.
    configs_pool: Option<MySqlPool>,
    broker: broker::Endpoint,
    listener: TcpListener,
    /// The compatibility listener's socket (`LEGACY_HTTP_ADDR`), if any.
    legacy_listener: Option<TcpListener>,
    cloud: Cloud,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let env_creds = env_credentials(&settings)?;
        let max_connections =
            u32::from(settings.max_concurrent_operations) + CONNECTIONS_BESIDE_OPERATIONS;
        let (pool, schema) = db::connect(&settings.database_url, max_connections).await?;
        schema.report();
        let me = db::appliance::Appliance {
            prefix: settings.amqp_prefix.clone(),
            host_vm: settings.host_vm_id,
        };
        db::appliance::claim(&pool, &me).await?;
        // Only once the database is this appliance's: a refused daemon creates nothing.
        settings.host_files().prepare().await?;
        let lease_pool = db::lease_pool(&settings.database_url)?;
        let http_pool = db::http_pool(&settings.database_url)?;
        let configs_pool = match &settings.ossea_configs_url {
            Some(url) => Some(db::configs_pool(url)?),
            None => None,
        };
        let broker = settings.broker_endpoint().map_err(StartError::Config)?;
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
        let cloud = Cloud::new(Client::http()?, env, retry, settings.job_deadlines());
        let legacy_listener = match settings.legacy_http_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            settings,
            pool,
            lease_pool,
            http_pool,
            configs_pool,
            broker,
            listener,
            legacy_listener,
            cloud,
        })
    }

    /// The bound HTTP address (useful when `HTTP_ADDR` asked for port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.http_addr)
    }

    /// Runs until `shutdown` resolves.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let Self {
            settings,
            pool,
            lease_pool,
            http_pool,
            configs_pool,
            broker,
            listener,
            legacy_listener,
            cloud,
        } = self;
        let http_addr = listener.local_addr().unwrap_or(settings.http_addr);
        let status = Arc::new(Status::default());
        let metrics = metrics_of(&settings);
        let stopping = CancellationToken::new();
        let watch_shutdown = async {
            shutdown.await;
            tracing::info!("shutting down");
            stopping.cancel();
        };

        // Both roles: device monitor, broker probe, HTTP.
        let background_stop = CancellationToken::new();
        let shared = Shared {
            settings: &settings,
            pool: &pool,
            http_pool: &http_pool,
            cloud: &cloud,
            broker: &broker,
            status: &status,
            metrics: &metrics,
        };
        let background = Background::spawn(shared, listener, legacy_listener, &background_stop);
        let devices = background.devices.clone();
        tracing::info!(http_addr = %http_addr, prefix = %settings.amqp_prefix, "volume-daemon running");

        let active = Active {
            settings: &settings,
            pool: &pool,
            configs_pool: &configs_pool,
            cloud: &cloud,
            status: &status,
            metrics: &metrics,
            devices: &devices,
            broker: &broker,
        };
        let roles = active.take_turns(&lease_pool, &stopping);
        // Both in this task: the shutdown future need not be `Send`.
        tokio::join!(watch_shutdown, roles);

        background_stop.cancel();
        background.join().await;
        close_pools(&[&pool, &lease_pool, &http_pool], configs_pool.as_ref()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The metrics of this instance, naming its appliance.
fn metrics_of(settings: &Settings) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    metrics.set_appliance(
        &settings.amqp_prefix,
        settings.host_vm_id.map(|vm| vm.to_string()).as_deref(),
    );
    metrics
}

/// Closes every pool: their connections end cleanly instead of being dropped.
async fn close_pools(pools: &[&MySqlPool], extra: Option<&MySqlPool>) {
    for p in pools.iter().copied().chain(extra) {
        p.close().await;
    }
}

/// The CloudStack credentials of `CLOUDSTACK_*`, if set (all three, or none).
fn env_credentials(settings: &Settings) -> Result<Option<Credentials>, StartError> {
    match (
        &settings.cloudstack_api_url,
        &settings.cloudstack_api_key,
        &settings.cloudstack_secret_key,
    ) {
        (None, _, _) => Ok(None),
        (Some(url), Some(key), Some(secret)) => {
            let credentials = Credentials {
                api_url: url.expose().to_owned(),
                api_key: schema::secret::ExposeSecret::expose_secret(key).to_owned(),
                secret_key: secret.clone(),
            };
            if credentials.plaintext_to_remote() {
                tracing::warn!(
                    url = %url,
                    "CLOUDSTACK_API_URL is plain http to another machine: the api key and \
                     replayable signatures cross the network unencrypted; use https"
                );
            }
            Ok(Some(credentials))
        }
        (Some(_), _, _) => Err(StartError::Config(
            "CLOUDSTACK_API_URL is set but CLOUDSTACK_API_KEY or CLOUDSTACK_SECRET_KEY is not"
                .into(),
        )),
    }
}

/// What both roles share.
struct Shared<'a> {
    settings: &'a Settings,
    pool: &'a MySqlPool,
    http_pool: &'a MySqlPool,
    cloud: &'a Cloud,
    broker: &'a broker::Endpoint,
    status: &'a Arc<Status>,
    metrics: &'a Arc<Metrics>,
}

/// What runs in both roles: the device monitor, the self-checks, the broker probe and the HTTP
/// server.
struct Background {
    devices: Devices,
    monitor: tokio::task::JoinHandle<()>,
    checks: tokio::task::JoinHandle<()>,
    probe: tokio::task::JoinHandle<()>,
    http: tokio::task::JoinHandle<()>,
    /// The compatibility listener, when `LEGACY_HTTP_ADDR` is set.
    legacy: Option<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn spawn(
        shared: Shared<'_>,
        listener: TcpListener,
        legacy: Option<TcpListener>,
        stop: &CancellationToken,
    ) -> Self {
        let Shared {
            settings,
            pool,
            http_pool,
            cloud,
            broker,
            status,
            metrics,
        } = shared;
        let mut monitor =
            Monitor::new(settings.sysfs_root.clone(), settings.device_poll_interval())
                .with_metrics(metrics.clone());
        if let Some(socket) = settings.uevent_socket() {
            monitor = monitor.with_uevents(socket);
        }
        let devices = devices_of(settings, &monitor);
        let (checks_tx, checks) = tokio::sync::watch::channel(Checks::default());
        let checker = Checker {
            cloud: cloud.clone(),
            pool: pool.clone(),
            devices: devices.clone(),
            metrics: metrics.clone(),
            period: Duration::from_secs(settings.self_check_interval_s),
        };
        let app = http::router(HttpState {
            pool: http_pool.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            devices: devices.clone(),
            host: settings.host_files(),
            checks,
        });
        let http_stop = stop.clone();
        Self {
            legacy: legacy.map(|l| spawn_legacy(l, settings, http_pool, broker, stop)),
            devices,
            monitor: tokio::spawn(monitor.run(stop.clone())),
            checks: tokio::spawn(checker.run(checks_tx, stop.clone())),
            probe: tokio::spawn(broker::probe(
                broker.clone(),
                settings.topology().dead_letter_queue(),
                status.clone(),
                metrics.clone(),
                stop.clone(),
            )),
            http: tokio::spawn(http::serve(
                listener,
                app,
                http::Limits::default(),
                http_stop,
            )),
        }
    }

    /// Waits for the three to end (after their stop token fired).
    async fn join(self) {
        report("device monitor", self.monitor.await);
        report("self-checks", self.checks.await);
        report("broker probe", self.probe.await);
        report("http", self.http.await);
        if let Some(legacy) = self.legacy {
            report("compatibility listener", legacy.await);
        }
    }
}

/// The handle operations use on the monitor's table and events.
fn devices_of(settings: &Settings, monitor: &Monitor) -> Devices {
    Devices::new(
        monitor.table(),
        monitor.events(),
        settings.device_by_id_dir.clone(),
        settings.device_poll_interval(),
    )
    .with_nodes(
        settings.device_node_dir.clone(),
        Duration::from_millis(settings.by_id_link_wait_ms),
    )
    .with_mode(monitor.mode())
}

/// The compatibility listener on `listener` (`LEGACY_HTTP_ADDR`), until `stop`.
fn spawn_legacy(
    listener: TcpListener,
    settings: &Settings,
    pool: &MySqlPool,
    broker: &broker::Endpoint,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = http::legacy::router(http::legacy::LegacyState {
        pool: pool.clone(),
        broker: broker.clone(),
        topology: settings.topology(),
    });
    tokio::spawn(http::serve(
        listener,
        app,
        http::Limits::default(),
        stop.clone(),
    ))
}

/// How long the relay may take to publish what the outbox holds at shutdown.
const RELAY_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// After a migration that failed for good, how long the lease is left to others before this
/// instance tries again.
const MIGRATION_RETRY: Duration = Duration::from_secs(5);
/// Tries of each step of the activation's schema check (a connection the server dropped, a
/// killed session: transient; anything else ends it at once).
const MIGRATION_ATTEMPTS: usize = 5;

/// Why an instance that took the lease cannot start its period.
#[derive(Debug, thiserror::Error)]
enum MigrationError {
    #[error("reading the schema's version: {0}")]
    Read(#[source] sqlx::Error),
    #[error("migrating the schema to version {version}: {source}")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("recording the schema version in the lease row: {0}")]
    Record(#[source] sqlx::Error),
    #[error("the execution lease was lost while migrating")]
    LeaseLost,
    #[error("stopped while migrating")]
    Stopped,
}

/// Whether a migration error may pass on a second try (the database's, not the migration's).
fn transient_migration(e: &sqlx::migrate::MigrateError) -> bool {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => crate::retry::transient_db(e),
        _ => false,
    }
}

/// Applies this binary's pending migrations while `lease` is held and renewed (a long
/// `ALTER TABLE` must not let it lapse), then records the schema version in the lease row.
/// Only the holder migrates: a standby of a newer build never changes the schema under a
/// running active of an older one (docs/upgrading.md). Transient database errors are tried
/// again at once: the activation must not wait (operations wait on it).
async fn migrate_holding(
    pool: &MySqlPool,
    lease: &mut Lease,
    stopping: &CancellationToken,
) -> Result<(), MigrationError> {
    let version = db::migrations::binary_version();
    let check = async {
        let state = crate::retry::bounded(
            "read the schema's version",
            MIGRATION_ATTEMPTS,
            crate::retry::transient_db,
            || db::migrations::state(pool),
        )
        .await
        .map_err(MigrationError::Read)?;
        if state.pending > 0 {
            tracing::info!(from = ?state.database, to = version, "migrating the schema");
            crate::retry::bounded(
                "migrate the schema",
                MIGRATION_ATTEMPTS,
                transient_migration,
                || db::migrations::migrate(pool),
            )
            .await
            .map_err(|source| MigrationError::Migrate { version, source })?;
        }
        Ok(())
    };
    tokio::pin!(check);
    loop {
        tokio::select! {
            done = &mut check => {
                done?;
                break;
            }
            () = tokio::time::sleep_until(lease.next_renewal()) => {
                if let Renewal::Lost = lease.renew().await {
                    return Err(MigrationError::LeaseLost);
                }
            }
            () = stopping.cancelled() => return Err(MigrationError::Stopped),
        }
    }
    let fence = lease.fence();
    crate::retry::bounded(
        "record the schema version in the lease row",
        MIGRATION_ATTEMPTS,
        crate::retry::transient_db,
        || db::migrations::record_in_lease(pool, fence.name(), fence.epoch()),
    )
    .await
    .map_err(MigrationError::Record)
}

/// The housekeeping and intake tasks of an active period, once its repair ended.
type Started = (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>);

/// Why an active period ended.
enum ActiveEnd {
    Shutdown,
    LeaseLost,
    /// One of its tasks ended before the period did ([`crate::supervise`]).
    TaskDied,
}

/// What an active period needs.
struct Active<'a> {
    settings: &'a Settings,
    pool: &'a MySqlPool,
    configs_pool: &'a Option<MySqlPool>,
    cloud: &'a Cloud,
    status: &'a Arc<Status>,
    metrics: &'a Arc<Metrics>,
    devices: &'a Devices,
    broker: &'a broker::Endpoint,
}

impl Active<'_> {
    /// The role loop: standby until the lease is ours, active until shutdown or lease loss,
    /// then standby again.
    async fn take_turns(&self, lease_pool: &MySqlPool, stopping: &CancellationToken) {
        let holder = lease::holder_name();
        loop {
            self.status.set_active(false);
            let prefix = &self.settings.amqp_prefix;
            let Some(mut lease) = Lease::acquire(lease_pool, prefix, &holder, stopping).await
            else {
                break;
            };
            if let Err(e) = migrate_holding(self.pool, &mut lease, stopping).await {
                tracing::error!(error = %e, "the schema could not be migrated: lease released; standing by to try again");
                lease.release().await;
                tokio::select! {
                    () = stopping.cancelled() => break,
                    () = tokio::time::sleep(MIGRATION_RETRY) => continue,
                }
            }
            self.status.set_active(true);
            match self.run(lease, stopping).await {
                ActiveEnd::Shutdown => break,
                ActiveEnd::LeaseLost => tracing::error!(
                    "execution lease lost: operations stopped; standing by to take it again"
                ),
                ActiveEnd::TaskDied => tracing::error!(
                    "active period ended by a task that died: lease released; standing by to take it again"
                ),
            }
        }
        self.status.set_active(false);
    }

    /// The store of an active period fenced by `lease`.
    fn store(&self, lease: &Lease) -> Store {
        Store::new(self.pool.clone(), self.settings.topology(), lease.fence())
            .with_configs_from(self.configs_pool.clone())
    }

    /// Consumes, executes and relays while the lease is held.
    async fn run(&self, mut lease: Lease, stopping: &CancellationToken) -> ActiveEnd {
        // `halt`: shutdown or lease loss (operations watch it); the executor and the relay each
        // get a two-level `Stop` (drain: shutdown; abort: lease loss); `fenced`: a write found
        // the lease taken over.
        let halt = stopping.child_token();
        let watch = Watch::new();
        let executor_stop = Stop::new();
        let fenced = CancellationToken::new();
        let store = self.store(&lease);
        let ctx = self.context(store.clone(), halt.clone(), fenced.clone());
        let relay_stop = Stop::new();
        let relay = self.spawn_relay(&ctx, &lease, &watch, relay_stop.clone(), fenced.clone());
        let sync = self.spawn_sync(store, &ctx, &watch);
        let (ops_tx, ops_rx) = mpsc::channel(usize::from(self.settings.max_concurrent_operations));
        let executor = self.spawn_executor(&ctx, &watch, ops_rx, executor_stop.clone());
        let (end, started) = {
            let held = hold(&mut lease, stopping, &fenced, &watch);
            self.start_while(held, &ctx, stopping, &watch, ops_tx).await
        };
        watch.end();
        match end {
            ActiveEnd::Shutdown => executor_stop.drain(),
            // A task died: fence as on a lost lease (what the others were doing may depend on
            // it), then give the lease up below.
            ActiveEnd::LeaseLost | ActiveEnd::TaskDied => {
                // Fence: another instance may hold the lease soon. Nothing of this period may
                // act on CloudStack or publish any more; their writes are fenced anyway, so do
                // not wait for one stuck on a dead connection.
                executor_stop.abort();
                relay_stop.abort();
                sync.abort();
                relay.abort();
            }
        }
        halt.cancel();
        let housekeeping = match started {
            Some((housekeeping, intake)) => {
                report("intake", intake.await);
                Some(housekeeping)
            }
            // Stopped while repairing: no command was taken.
            None => None,
        };
        report("executor", executor.await);
        report("mapping sync", sync.await);
        if let Some(housekeeping) = housekeeping {
            report("housekeeping", housekeeping.await);
        }
        // The outcomes recorded up to now are in the outbox: the relay publishes them and
        // returns (bounded: a broker that is gone gets them at the next start).
        report("relay", drain_relay(relay, &relay_stop).await);
        self.status.set_intake_connected(false);
        self.status.set_relay_connected(false);
        if let ActiveEnd::Shutdown | ActiveEnd::TaskDied = end {
            lease.release().await;
        }
        end
    }

    /// Repairs the host files, then starts the housekeeping and the intake (commands are taken
    /// only after the repair), all while `held` renews the lease: a repair slowed by the
    /// database must not let the lease lapse under it. Returns how the period ended and, when
    /// the repair ended first, the housekeeping and intake tasks.
    async fn start_while(
        &self,
        held: impl Future<Output = ActiveEnd>,
        ctx: &Arc<Context>,
        stopping: &CancellationToken,
        watch: &Watch,
        ops: mpsc::Sender<Operation>,
    ) -> (ActiveEnd, Option<Started>) {
        let start = async {
            reconcile_host(&ctx.store, &ctx.host, self.devices, &ctx.halt).await;
            let housekeeping = self.spawn_housekeeping(ctx, &ctx.halt, watch);
            let intake = self.spawn_intake(ctx.clone(), stopping.clone(), watch, ops);
            (housekeeping, intake)
        };
        tokio::pin!(start, held);
        tokio::select! {
            end = &mut held => (end, None),
            started = &mut start => (held.await, Some(started)),
        }
    }

    /// The mapping sync of this period: the tables follow the device monitor's changes.
    fn spawn_sync(
        &self,
        store: Store,
        ctx: &Context,
        watch: &Watch,
    ) -> tokio::task::JoinHandle<()> {
        watch.spawn(
            "mapping sync",
            crate::operation::mapping_sync::run(
                store,
                self.devices.clone(),
                ctx.host.clone(),
                ctx.halt.clone(),
                ctx.fenced.clone(),
            ),
        )
    }

    /// The retention sweep and, when configured, the periodic reconcile, until `halt`.
    fn spawn_housekeeping(
        &self,
        ctx: &Arc<Context>,
        halt: &CancellationToken,
        watch: &Watch,
    ) -> tokio::task::JoinHandle<()> {
        let s = self.settings;
        let policy = housekeeping::Retention {
            outbox: Duration::from_secs(s.outbox_retention_h * HOUR_S),
            operations: Duration::from_secs(s.operations_retention_d * DAY_S),
            period: Duration::from_secs(s.retention_interval_s),
        };
        let retention = housekeeping::retention(ctx.clone(), policy, halt.clone());
        let every = Duration::from_secs(s.reconcile_interval_s);
        let reconcile = (!every.is_zero())
            .then(|| housekeeping::periodic_reconcile(ctx.clone(), every, halt.clone()));
        watch.spawn("housekeeping", async move {
            match reconcile {
                Some(reconcile) => {
                    tokio::join!(retention, reconcile);
                }
                None => retention.await,
            }
        })
    }

    /// The executor of this period: operations run with `ctx`, at most
    /// `MAX_CONCURRENT_OPERATIONS` at once.
    fn spawn_executor(
        &self,
        ctx: &Arc<Context>,
        watch: &Watch,
        ops: mpsc::Receiver<Operation>,
        stop: Stop,
    ) -> tokio::task::JoinHandle<()> {
        watch.spawn(
            "executor",
            executor::run(
                Operations(ctx.clone()),
                ops,
                usize::from(self.settings.max_concurrent_operations),
                stop,
                self.settings.shutdown_grace(),
            ),
        )
    }

    /// What every operation of this period shares.
    fn context(
        &self,
        store: Store,
        halt: CancellationToken,
        fenced: CancellationToken,
    ) -> Arc<Context> {
        Arc::new(Context {
            store,
            cloud: self.cloud.clone().with_observer(self.metrics.clone()),
            metrics: self.metrics.clone(),
            devices: self.devices.clone(),
            correlation_timeout: self.settings.correlation_timeout(),
            create_resume_settle: Duration::from_secs(self.settings.create_resume_settle_s),
            host: self.settings.host_files(),
            halt,
            fenced,
            vm_locks: Default::default(),
        })
    }

    fn spawn_relay(
        &self,
        ctx: &Context,
        lease: &Lease,
        watch: &Watch,
        stop: Stop,
        fenced: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        watch.spawn(
            "relay",
            Relay {
                pool: self.pool.clone(),
                broker: self.broker.clone(),
                wakeup: ctx.store.relay_bell(),
                status: self.status.clone(),
                metrics: self.metrics.clone(),
                stop,
                fence: lease.fence(),
                fenced,
            }
            .run(),
        )
    }

    /// Unfinished operations first, in the order they were accepted; then new commands, so
    /// arrival order per volume holds across restarts and takeovers.
    fn spawn_intake(
        &self,
        ctx: Arc<Context>,
        stopping: CancellationToken,
        watch: &Watch,
        ops: mpsc::Sender<Operation>,
    ) -> tokio::task::JoinHandle<()> {
        let intake = Intake {
            ctx: ctx.clone(),
            stopping,
            broker: self.broker.clone(),
            topology: self.settings.topology(),
            prefetch: intake_prefetch(self.settings.max_concurrent_operations),
            ops: ops.clone(),
            status: self.status.clone(),
            reply_to_allowed: self.settings.reply_to_allowed(),
        };
        watch.spawn("intake", async move {
            let resumed = resume(&ctx).await;
            drop(ops);
            intake.run(resumed).await;
        })
    }
}

/// The most deliveries the broker may send ahead of the intake, and so the most one batch
/// records in one statement: as many as operations may run at once, at most
/// [`crate::db::group::MAX_GROUP`]. The intake starts each burst at two (its memory follows
/// the deliveries it holds, each as large as the broker's `max_message_size`), goes up to this
/// once a batch filled its prefetch with commands, and back to two after an oversized message
/// or 2 s without one (`intake::next_prefetch`).
fn intake_prefetch(max_concurrent_operations: u16) -> u16 {
    let most = crate::db::group::MAX_GROUP as u16;
    max_concurrent_operations.clamp(1, most)
}

/// Renews the lease when due ([`Lease::next_renewal`]) until shutdown, or until it is lost: taken
/// over, a write found it fenced, or no renewal succeeded before the fence deadline (the
/// renewal in progress is cut short by that deadline too); or until a task of the period died.
async fn hold(
    lease: &mut Lease,
    stopping: &CancellationToken,
    fenced: &CancellationToken,
    watch: &Watch,
) -> ActiveEnd {
    loop {
        tokio::select! {
            biased;
            () = stopping.cancelled() => return ActiveEnd::Shutdown,
            () = fenced.cancelled() => return ActiveEnd::LeaseLost,
            () = watch.died() => return ActiveEnd::TaskDied,
            () = tokio::time::sleep_until(lease.next_renewal()) => {}
        }
        let deadline = lease.fence_deadline();
        let renewal = tokio::select! {
            r = lease.renew() => r,
            () = tokio::time::sleep_until(deadline) => {
                tracing::error!("no lease renewal succeeded in time; fencing");
                Renewal::Lost
            }
        };
        if renewal == Renewal::Lost {
            return ActiveEnd::LeaseLost;
        }
    }
}

/// Every `pending` and `executing` operation, oldest first: the intake hands them to the
/// executor before anything it consumes (it consumes meanwhile, so the instance is ready at
/// once, however long the executor takes to work through them).
async fn resume(ctx: &Context) -> VecDeque<Operation> {
    // Raced with shutdown: a half-open connection must not keep this period alive.
    let listed =
        crate::retry::persistent("list unfinished operations", &ctx.halt, None, || async {
            Ok(ctx.store.resumable().await?)
        })
        .await;
    let Ok(resumed) = listed else {
        return VecDeque::new();
    };
    if !resumed.is_empty() {
        tracing::info!(count = resumed.len(), "resuming unfinished operations");
    }
    resumed.into()
}

/// Makes the host appliance's directories and tables agree before commands are taken (only
/// the active instance writes either). A failure is logged; attaches repair their own files.
/// A failed repair is tried again this many times in all (a connection the server dropped, a
/// killed session), then left to the next `reconcile`.
const REPAIR_ATTEMPTS: usize = 5;

async fn reconcile_host(
    store: &Store,
    files: &crate::host::HostFiles,
    devices: &Devices,
    halt: &CancellationToken,
) {
    let _held = files.lock().await;
    let repaired = crate::retry::bounded(
        "reconcile the host files with the tables",
        REPAIR_ATTEMPTS,
        ReconcileError::is_transient,
        || crate::operation::host_files::run(store, files, devices),
    );
    let repaired = tokio::select! {
        () = halt.cancelled() => return,
        r = repaired => r,
    };
    match repaired {
        Ok(r) if r == Default::default() => tracing::info!("host files and tables agree"),
        Ok(r) => tracing::warn!(
            links = r.links,
            rows = r.rows,
            dropped = r.dropped,
            strays = r.strays,
            "host files and tables repaired"
        ),
        Err(e) => tracing::error!(error = %e, "cannot reconcile the host files with the tables"),
    }
}

/// Asks the relay to drain and waits for it, at most [`RELAY_DRAIN_LIMIT`] (a broker that is
/// gone gets the rest at the next start); an aborted relay returns at once.
async fn drain_relay(
    mut relay: tokio::task::JoinHandle<()>,
    stop: &Stop,
) -> Result<(), tokio::task::JoinError> {
    stop.drain();
    match tokio::time::timeout(RELAY_DRAIN_LIMIT, &mut relay).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(
                limit_s = RELAY_DRAIN_LIMIT.as_secs(),
                "the relay did not empty the outbox in time; the rest is published at the next start"
            );
            stop.abort();
            relay.await
        }
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

/// The daemon's operations as the executor runs them: prepared while they wait for a slot
/// ([`crate::operation::prepare`]), then executed ([`crate::operation::execute`]).
#[derive(Clone)]
struct Operations(Arc<Context>);

impl executor::Runner for Operations {
    type Prepared = crate::operation::Prepared;

    fn prepare(&self, op: Operation) -> impl Future<Output = Self::Prepared> + Send + 'static {
        crate::operation::prepare(self.0.clone(), op)
    }

    fn run(
        &self,
        prepared: Self::Prepared,
        slot: executor::Slot,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::operation::execute(self.0.clone(), prepared, slot)
    }
}
