//! Prometheus metrics (docs/http.md), served at `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{Operation, Terminal};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    r#type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    command: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    exchange: String,
    routing_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplianceLabels {
    prefix: String,
    host_vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// What [`Metrics::encode`] produces: `prometheus-client` encodes OpenMetrics 1.0 text (`# EOF`,
/// `_total` samples of `counter` families), and a scraper picks its parser by this header.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The daemon's metrics. Handles are cheap atomics; the registry is only locked to encode.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// [`SharedMetrics`]' families: encoded only by the active instance.
    shared_registry: Mutex<Registry>,
    shared: SharedMetrics,
    operations: Family<OperationLabels, Counter>,
    duration: Family<TypeLabels, Histogram>,
    commands: Family<ResultLabels, Counter>,
    events_published: Counter,
    events_refused: Family<DestinationLabels, Counter>,
    device_events: Family<ResultLabels, Counter>,
    correlation: Histogram,
    cloudstack_calls: Family<CallLabels, Counter>,
    cloudstack_retries: Family<CommandLabels, Counter>,
    state: StateMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A family of counters by label set.
type Counters<L> = Family<L, Counter>;

/// Registers a handle of `metric` under its name and help, and returns the metric.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    (name, help): (&str, &str),
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a family of counters by label set under its name and help, and returns it.
fn counters<L>(registry: &mut Registry, name: (&str, &str)) -> Counters<L>
where
    L: prometheus_client::encoding::EncodeLabelSet
        + Clone
        + std::hash::Hash
        + Eq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    registered(registry, name, Counters::<L>::default())
}

/// Every family's name (after the `volume_daemon_` prefix) and help text.
mod names {
    /// `volume_daemon_operations`.
    pub(super) const OPERATIONS: (&str, &str) =
        ("operations", "Operations ended, by type and outcome");
    /// `volume_daemon_operation_duration_seconds`.
    pub(super) const DURATION: (&str, &str) = (
        "operation_duration_seconds",
        "Time from acceptance to the end of an operation",
    );
    /// `volume_daemon_commands_received`.
    pub(super) const COMMANDS: (&str, &str) =
        ("commands_received", "Command messages received, by result");
    /// `volume_daemon_events_published`.
    pub(super) const EVENTS_PUBLISHED: (&str, &str) =
        ("events_published", "Events confirmed by the broker");
    /// `volume_daemon_events_refused`.
    pub(super) const EVENTS_REFUSED: (&str, &str) = (
        "events_refused",
        "Events (or reply_to copies) given up after the broker kept refusing them, by exchange and routing key",
    );
    /// `volume_daemon_outbox_backlog`.
    pub(super) const OUTBOX_BACKLOG: (&str, &str) =
        ("outbox_backlog", "Events not yet confirmed by the broker");
    /// `volume_daemon_outbox_oldest_age_seconds`.
    pub(super) const OUTBOX_OLDEST_AGE: (&str, &str) = (
        "outbox_oldest_age_seconds",
        "Age of the oldest unpublished event (publish lag)",
    );
    /// `volume_daemon_nbd_exports`.
    pub(super) const NBD_EXPORTS: (&str, &str) = (
        "nbd_exports",
        "Active NBD exports (host attachments exported)",
    );
    /// `volume_daemon_device_events`.
    pub(super) const DEVICE_EVENTS: (&str, &str) = (
        "device_events",
        "Device changes seen by the monitor, by kind",
    );
    /// `volume_daemon_correlation_latency_seconds`.
    pub(super) const CORRELATION: (&str, &str) = (
        "correlation_latency_seconds",
        "Time from registering a device expectation to finding the device",
    );
    /// `volume_daemon_cloudstack_calls`.
    pub(super) const CLOUDSTACK_CALLS: (&str, &str) = (
        "cloudstack_calls",
        "CloudStack API calls, by command and result (ok, an error code, transport)",
    );
    /// `volume_daemon_cloudstack_retries`.
    pub(super) const CLOUDSTACK_RETRIES: (&str, &str) = (
        "cloudstack_retries",
        "CloudStack calls retried after a transient error",
    );
    /// `volume_daemon_operations_in_flight`.
    pub(super) const IN_FLIGHT: (&str, &str) = (
        "operations_in_flight",
        "Operations not yet ended, by status (pending, executing)",
    );
    /// `volume_daemon_mappings`.
    pub(super) const MAPPINGS: (&str, &str) = (
        "mappings",
        "Attached volumes in device_mappings, by mode (oma = host VM, failover = remote)",
    );
    /// `volume_daemon_role`.
    pub(super) const ROLE: (&str, &str) = (
        "role",
        "1 for this instance's role (active or standby), 0 for the other",
    );
    /// `volume_daemon_self_check`.
    pub(super) const SELF_CHECK: (&str, &str) = (
        "self_check",
        "1 for each self-check's current state (cloudstack: up, down, unauthorized; host_vm: ok, mismatch, unknown), 0 for the others",
    );
    /// `volume_daemon_retention_deleted`.
    pub(super) const RETENTION: (&str, &str) = (
        "retention_deleted",
        "Rows deleted by the retention sweep, by table",
    );
    /// `volume_daemon_reconcile_changes`.
    pub(super) const RECONCILE: (&str, &str) =
        ("reconcile_changes", "Repairs made by reconciles, by kind");
    /// `volume_daemon_dead_letters`.
    pub(super) const DEAD_LETTERS: (&str, &str) = (
        "dead_letters",
        "Messages in the commands' dead-letter queue (<prefix>.commands.dead)",
    );
    /// `volume_daemon_appliance_info`.
    pub(super) const APPLIANCE: (&str, &str) = (
        "appliance",
        "The appliance this instance serves: its AMQP prefix and host VM (always 1)",
    );
    /// `volume_daemon_build_info`.
    pub(super) const BUILD: (&str, &str) = ("build_info", "The daemon's version (always 1)");
}

/// Every state of each self-check, so each series exists from the first scrape.
const SELF_CHECK_STATES: [(&str, &[&str]); 2] = [
    ("cloudstack", &["up", "down", "unauthorized"]),
    ("host_vm", &["ok", "mismatch", "unknown"]),
];

/// The families of the daemon's state (read at scrape time or set by the housekeeping).
#[derive(Debug)]
struct StateMetrics {
    role: Family<RoleLabels, Gauge>,
    self_check: Family<CheckLabels, Gauge>,
    retention_deleted: Family<TableLabels, Counter>,
    reconcile_changes: Family<WhatLabels, Counter>,
}

impl StateMetrics {
    /// Registers them.
    fn register(r: &mut Registry) -> Self {
        let role = registered(r, names::ROLE, Family::<RoleLabels, Gauge>::default());
        let self_check = registered(
            r,
            names::SELF_CHECK,
            Family::<CheckLabels, Gauge>::default(),
        );
        let retention_deleted = registered(r, names::RETENTION, Counters::<TableLabels>::default());
        let reconcile_changes = registered(r, names::RECONCILE, Counters::<WhatLabels>::default());
        let build = registered(r, names::BUILD, Family::<BuildLabels, Gauge>::default());
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        let state = Self {
            role,
            self_check,
            retention_deleted,
            reconcile_changes,
        };
        state.zero_series();
        state
    }

    /// Every label value a dashboard expects, present (at 0) from the first scrape.
    fn zero_series(&self) {
        let Self {
            self_check,
            retention_deleted,
            reconcile_changes,
            ..
        } = self;
        for (check, states) in SELF_CHECK_STATES {
            for state in states {
                self_check
                    .get_or_create(&CheckLabels {
                        check: check.into(),
                        state: (*state).into(),
                    })
                    .set(0);
            }
        }
        for what in schema::event::ChangeKind::ALL {
            reconcile_changes
                .get_or_create(&WhatLabels {
                    what: what.as_str().into(),
                })
                .inc_by(0);
        }
        for table in ["outbox", "volume_operations"] {
            retention_deleted
                .get_or_create(&TableLabels {
                    table: table.into(),
                })
                .inc_by(0);
        }
    }
}

/// The families read from what an appliance's instances share (its database and broker): the
/// same figures whichever instance reads them, so only the active reports them and a sum over
/// an appliance's instances never counts them twice (docs/http.md).
#[derive(Debug)]
struct SharedMetrics {
    outbox_backlog: Gauge,
    outbox_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    nbd_exports: Gauge,
    in_flight: Family<StatusLabels, Gauge>,
    mappings: Family<ModeLabels, Gauge>,
    dead_letters: Gauge,
}

impl SharedMetrics {
    /// Registers them, every series present (at 0) from the first scrape.
    fn register(r: &mut Registry) -> Self {
        let shared = Self {
            outbox_backlog: registered(r, names::OUTBOX_BACKLOG, Gauge::default()),
            outbox_oldest_age: registered(r, names::OUTBOX_OLDEST_AGE, Gauge::default()),
            nbd_exports: registered(r, names::NBD_EXPORTS, Gauge::default()),
            in_flight: registered(r, names::IN_FLIGHT, Family::default()),
            mappings: registered(r, names::MAPPINGS, Family::default()),
            dead_letters: registered(r, names::DEAD_LETTERS, Gauge::default()),
        };
        for status in ["pending", "executing"] {
            shared
                .in_flight
                .get_or_create(&StatusLabels {
                    status: status.into(),
                })
                .set(0);
        }
        for mode in ["oma", "failover"] {
            shared
                .mappings
                .get_or_create(&ModeLabels { mode: mode.into() })
                .set(0);
        }
        shared
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("volume_daemon");
        let operations = counters::<OperationLabels>(&mut r, names::OPERATIONS);
        let duration = registered(
            &mut r,
            names::DURATION,
            Family::<TypeLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 14))
            }),
        );
        let commands = registered(&mut r, names::COMMANDS, Counters::<ResultLabels>::default());
        let events_published = registered(&mut r, names::EVENTS_PUBLISHED, Counter::default());
        let events_refused = counters::<DestinationLabels>(&mut r, names::EVENTS_REFUSED);
        let device_events = counters::<ResultLabels>(&mut r, names::DEVICE_EVENTS);
        let correlation = registered(
            &mut r,
            names::CORRELATION,
            Histogram::new(exponential_buckets(0.01, 2.0, 14)),
        );
        let cloudstack_calls = counters::<CallLabels>(&mut r, names::CLOUDSTACK_CALLS);
        let cloudstack_retries = counters::<CommandLabels>(&mut r, names::CLOUDSTACK_RETRIES);
        let state = StateMetrics::register(&mut r);
        let mut shared_registry = Registry::with_prefix("volume_daemon");
        let shared = SharedMetrics::register(&mut shared_registry);
        Self {
            state,
            registry: Mutex::new(r),
            shared_registry: Mutex::new(shared_registry),
            shared,
            cloudstack_calls,
            cloudstack_retries,
            device_events,
            correlation,
            operations,
            duration,
            commands,
            events_published,
            events_refused,
        }
    }

    pub fn operation_ended(&self, op: &Operation, terminal: &Terminal) {
        let r#type = op.command.operation_type().as_str().to_owned();
        let outcome = match &terminal.error {
            None => "completed".to_owned(),
            Some(e) => e.code.as_str().to_owned(),
        };
        self.operations
            .get_or_create(&OperationLabels {
                r#type: r#type.clone(),
                outcome,
            })
            .inc();
        let seconds = (crate::db::store::now() - op.created_at)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0;
        self.duration
            .get_or_create(&TypeLabels { r#type })
            .observe(seconds);
    }

    /// Operations pending and executing, and mappings by mode (read at scrape time).
    pub fn set_gauges(&self, g: &crate::db::read::Gauges) {
        let set = |family: &Family<StatusLabels, Gauge>, status: &str, v: u64| {
            family
                .get_or_create(&StatusLabels {
                    status: status.into(),
                })
                .set(v as i64);
        };
        set(&self.shared.in_flight, "pending", g.pending);
        set(&self.shared.in_flight, "executing", g.executing);
        for (mode, v) in [("oma", g.host_mappings), ("failover", g.remote_mappings)] {
            self.shared
                .mappings
                .get_or_create(&ModeLabels { mode: mode.into() })
                .set(v as i64);
        }
    }

    /// This instance's role.
    pub fn set_role(&self, active: bool) {
        for (role, on) in [("active", active), ("standby", !active)] {
            self.state
                .role
                .get_or_create(&RoleLabels { role: role.into() })
                .set(i64::from(on));
        }
    }

    /// The self-checks' current states (`selfcheck::CloudState::as_str`, `HostVmState::as_str`).
    pub fn set_self_checks(&self, cloudstack: &str, host_vm: &str) {
        for ((check, states), now) in SELF_CHECK_STATES.iter().zip([cloudstack, host_vm]) {
            for state in *states {
                self.state
                    .self_check
                    .get_or_create(&CheckLabels {
                        check: (*check).into(),
                        state: (*state).into(),
                    })
                    .set(i64::from(*state == now));
            }
        }
    }

    pub fn retention_deleted(&self, table: &str, rows: u64) {
        self.state
            .retention_deleted
            .get_or_create(&TableLabels {
                table: table.into(),
            })
            .inc_by(rows);
    }

    pub fn reconcile_change(&self, what: schema::event::ChangeKind) {
        let what = serde_json::to_value(what)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.state
            .reconcile_changes
            .get_or_create(&WhatLabels { what })
            .inc();
    }

    /// A pending operation of type `ty` was cancelled (outcome `cancelled`; no duration).
    pub fn operation_cancelled(&self, ty: schema::OperationType) {
        self.operations
            .get_or_create(&OperationLabels {
                r#type: ty.as_str().to_owned(),
                outcome: "cancelled".to_owned(),
            })
            .inc();
    }

    /// `accepted`, `duplicate` or `invalid`.
    pub fn command_received(&self, result: &str) {
        self.commands
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// `added`, `removed` or `resized`.
    pub fn device_event(&self, kind: &str) {
        self.device_events
            .get_or_create(&ResultLabels {
                result: kind.to_owned(),
            })
            .inc();
    }

    pub fn correlated(&self, after: std::time::Duration) {
        self.correlation.observe(after.as_secs_f64());
    }

    pub fn event_published(&self) {
        self.events_published.inc();
    }

    /// An event (or a `reply_to` copy, exchange `""`) given up after refusals.
    pub fn event_refused(&self, exchange: &str, routing_key: &str) {
        self.events_refused
            .get_or_create(&DestinationLabels {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            })
            .inc();
    }

    pub fn set_outbox(&self, backlog: u64, oldest_age_seconds: f64) {
        self.shared
            .outbox_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        self.shared.outbox_oldest_age.set(oldest_age_seconds);
    }

    pub fn set_nbd_exports(&self, active: u64) {
        self.shared
            .nbd_exports
            .set(i64::try_from(active).unwrap_or(i64::MAX));
    }

    /// Messages in the dead-letter queue (a passive declare by the broker probe).
    pub fn set_dead_letters(&self, messages: u32) {
        self.shared.dead_letters.set(i64::from(messages));
    }

    /// Which appliance this instance serves (`volume_daemon_appliance_info`): for joins with
    /// the scrape's `appliance` target label. Call once, at start.
    pub fn set_appliance(&self, prefix: &str, host_vm: Option<&str>) {
        let info = prometheus_client::metrics::info::Info::new(ApplianceLabels {
            prefix: prefix.into(),
            host_vm: host_vm.unwrap_or_default().into(),
        });
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let (name, help) = names::APPLIANCE;
        registry.register(name, help, info);
    }

    /// The text exposition: this instance's own families, and the shared ones when `active`.
    pub fn encode(&self, active: bool) -> String {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        let own = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = text::encode_registry(&mut out, &own);
        drop(own);
        if active {
            let shared = self
                .shared_registry
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            done = done.and_then(|()| text::encode_registry(&mut out, &shared));
        }
        if let Err(e) = done.and_then(|()| text::encode_eof(&mut out)) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl cloudstack::Observer for Metrics {
    fn call(&self, command: &str, result: &str) {
        self.cloudstack_calls
            .get_or_create(&CallLabels {
                command: command.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    fn retry(&self, command: &str) {
        self.cloudstack_retries
            .get_or_create(&CommandLabels {
                command: command.to_owned(),
            })
            .inc();
    }
}
