//! Health, readiness and metrics (docs/http.md), and the server that serves them with the
//! read API ([`serve`]).

pub(crate) mod legacy;
mod serve;

pub(crate) use serve::{Limits, serve};

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use sqlx::MySqlPool;

use crate::db::{exports, outbox};
use crate::devices::Devices;
use crate::host::HostFiles;
use crate::metrics::Metrics;
use crate::status::Status;

/// How long a probe or a scrape waits for the database before it says so.
const DB_ANSWER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub(crate) struct HttpState {
    pub pool: MySqlPool,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub devices: Devices,
    pub host: HostFiles,
    /// The self-checks' last results.
    pub checks: tokio::sync::watch::Receiver<crate::selfcheck::Checks>,
}

pub(crate) fn router(state: HttpState) -> Router {
    let api = crate::api::ApiState {
        pool: state.pool.clone(),
        devices: state.devices.clone(),
        nbd_url: state.host.nbd_url().clone(),
    };
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(crate::api::routes(api))
}

/// Liveness: the process runs.
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

/// The outbox backlog, `None` when the database does not answer within 2 s. One more try on a
/// transient error (a connection the server dropped, a killed session): a single stale
/// connection is not an unready daemon.
async fn backlog(pool: &MySqlPool) -> Option<outbox::Backlog> {
    let read = tokio::time::timeout(DB_ANSWER, async {
        let read = || outbox::backlog(pool);
        crate::retry::bounded(
            "read the outbox backlog",
            2,
            crate::retry::transient_db,
            read,
        )
        .await
    })
    .await;
    read.ok().and_then(Result::ok)
}

/// The operations pending and executing and the schema version the database holds (`None`
/// for what cannot be read within [`DB_ANSWER`]).
async fn operations_and_schema(pool: &MySqlPool) -> (Option<crate::db::read::Gauges>, Option<i64>) {
    let read = async {
        let gauges = crate::db::read::gauges(pool).await.ok();
        (gauges, crate::db::migrations::database_version(pool).await)
    };
    tokio::time::timeout(DB_ANSWER, read)
        .await
        .unwrap_or((None, None))
}

/// Readiness: the database answers, the broker connections are up, the device monitor scans.
async fn ready(State(s): State<HttpState>) -> Response {
    let backlog = backlog(&s.pool).await;
    let db_ok = backlog.is_some();
    let (gauges, schema_version) = if db_ok {
        operations_and_schema(&s.pool).await
    } else {
        (None, None)
    };
    let active = s.status.active();
    // A standby neither consumes nor publishes: it needs the broker reachable, no more.
    let broker_ok = if active {
        s.status.intake_connected() && s.status.relay_connected()
    } else {
        s.status.broker_reachable()
    };
    let monitor = s.devices.state() == crate::devices::MonitorState::Running;
    let ready = db_ok && broker_ok && monitor;
    let oldest_age_s = backlog.as_ref().and_then(oldest_age_s);
    if let Some(b) = backlog {
        s.metrics.set_outbox(b.count, oldest_age_s.unwrap_or(0.0));
    }
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "role": s.status.role(),
        "components": components(&s, db_ok).await,
        "outbox": {
            "backlog": backlog.map(|b| b.count),
            "oldest_unpublished_age_s": oldest_age_s,
        },
        "operations": {
            "pending": gauges.as_ref().map(|g| g.pending),
            "executing": gauges.as_ref().map(|g| g.executing),
        },
        "version": env!("CARGO_PKG_VERSION"),
        "schema": {
            "database": schema_version,
            "binary": crate::db::migrations::binary_version(),
        },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// `/ready`'s `components`: each one's state.
async fn components(s: &HttpState, db_ok: bool) -> serde_json::Value {
    let up = |ok: bool| if ok { "up" } else { "down" };
    let active = s.status.active();
    let checks = *s.checks.borrow();
    // Reported, not gating: exports are one consumer of the appliance among others.
    let nbd = if !s.host.exports_on() {
        "off"
    } else {
        up(s.host.nbd_url().reachable().await)
    };
    json!({
        "database": up(db_ok),
        "broker": up(s.status.broker_reachable()),
        "broker_intake": if active { up(s.status.intake_connected()) } else { "idle" },
        "broker_relay": if active { up(s.status.relay_connected()) } else { "idle" },
        "device_monitor": s.devices.state().as_str(),
        "device_monitor_mode": s.devices.mode().as_str(),
        "nbd": nbd,
        "cloudstack": checks.cloudstack.as_str(),
        "host_vm": checks.host_vm.as_str(),
    })
}

/// How old the oldest unpublished event is, in seconds (`None`: there is none).
fn oldest_age_s(b: &outbox::Backlog) -> Option<f64> {
    b.oldest
        .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
}

/// The outbox, exports, operations and mappings gauges, read from the database (each read
/// bounded; a slow one leaves the last value).
async fn read_shared_gauges(s: &HttpState) {
    if let Ok(Ok(b)) = tokio::time::timeout(DB_ANSWER, outbox::backlog(&s.pool)).await {
        s.metrics
            .set_outbox(b.count, oldest_age_s(&b).unwrap_or(0.0));
    }
    if let Ok(Ok(n)) = tokio::time::timeout(DB_ANSWER, exports::active_count(&s.pool)).await {
        s.metrics.set_nbd_exports(n);
    }
    if let Ok(Ok(g)) = tokio::time::timeout(DB_ANSWER, crate::db::read::gauges(&s.pool)).await {
        s.metrics.set_gauges(&g);
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let active = s.status.active();
    // The database's figures are the appliance's, reported by its active instance only.
    if active {
        read_shared_gauges(&s).await;
    }
    s.metrics.set_role(active);
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.encode(active),
    )
        .into_response()
}
