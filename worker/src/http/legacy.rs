//! The compatibility listener (`LEGACY_HTTP_ADDR`, off by default): the old Go daemon's routes
//! that have a command behind them, with its request bodies and response shapes, so its
//! callers keep working while they move to AMQP one at a time (docs/http.md, "The old
//! daemon's routes"). A mutating route publishes its command through the broker (so the one
//! executor still does everything) and answers 201 with the old operation object, `pending`,
//! once the broker confirmed it (503 when it cannot). Routes with nothing behind them answer
//! 501 naming the AMQP command to use instead.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::MySqlPool;

use schema::command::{AttachVolume, CreateVolume};
use schema::{ByteSize, Command, Topology, VmId, VolumeId};

use crate::broker::{self, Endpoint};
use crate::db::read::{self, LegacyMappingRow, LegacyOperationRow};

#[derive(Debug, Clone)]
pub(crate) struct LegacyState {
    pub pool: MySqlPool,
    pub broker: Endpoint,
    pub topology: Topology,
}

pub(crate) fn router(state: LegacyState) -> Router {
    Router::new()
        .route("/api/v1/volumes", post(create))
        .route("/api/v1/volumes/{id}", get(volume).delete(delete))
        .route("/api/v1/volumes/{id}/attach", post(attach))
        .route("/api/v1/volumes/{id}/attach-root", post(attach_root))
        .route("/api/v1/volumes/{id}/detach", post(detach))
        .route("/api/v1/volumes/{id}/device", get(device))
        .route("/api/v1/admin/force-sync", post(force_sync))
        .route("/api/v1/operations/{id}", get(operation))
        .route("/api/v1/health", get(health))
        .route("/api/v1/cleanup/test-failover", post(not_here("snapshot, detach, revert_snapshot and attach commands (docs/failover.md)")))
        .route("/api/v1/snapshots/{*rest}", axum::routing::any(not_here("the snapshot, revert_snapshot and delete_snapshot commands")))
        .route("/api/v1/exports", axum::routing::any(not_here("none: exports follow host attachments; `volumectl exports` or GET /api/v1/exports on HTTP_ADDR reads them")))
        .route("/api/v1/exports/{*rest}", axum::routing::any(not_here("none: exports follow host attachments")))
        .with_state(state)
}

/// An answer in the old daemon's error shape: `{"error": "<text>"}`.
fn error(status: StatusCode, text: impl Into<String>) -> Response {
    (status, Json(json!({"error": text.into()}))).into_response()
}

/// A route the old daemon had that has no command behind it here.
fn not_here(instead: &'static str) -> impl Fn() -> std::future::Ready<Response> + Clone {
    move || {
        std::future::ready(error(
            StatusCode::NOT_IMPLEMENTED,
            format!("not served by volume-daemon's compatibility listener; use {instead}"),
        ))
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "healthy", "timestamp": Utc::now()}))
}

/// The old `CreateVolumeRequest`: `size` in bytes.
#[derive(Debug, Deserialize)]
struct CreateBody {
    name: String,
    size: u64,
    #[serde(default)]
    disk_offering_id: Option<String>,
    #[serde(default)]
    zone_id: Option<String>,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

/// The old `AttachVolumeRequest` (its `volume_id` is the path's).
#[derive(Debug, Deserialize)]
struct AttachBody {
    vm_id: String,
}

fn bad(text: String) -> Response {
    error(StatusCode::BAD_REQUEST, text)
}

fn volume_of(id: &str) -> Result<VolumeId, String> {
    VolumeId::parse(id).map_err(|e| format!("volume id {id:?}: {e}"))
}

async fn create(State(s): State<LegacyState>, body: Json<Value>) -> Response {
    let request = body.0.clone();
    let parsed: CreateBody = match serde_json::from_value(body.0) {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    let size = match ByteSize::new(parsed.size) {
        Ok(s) => s,
        Err(e) => return bad(format!("size: {e}")),
    };
    let mut create = CreateVolume::new(parsed.name, size);
    create.disk_offering_id = match parsed.disk_offering_id.filter(|d| !d.is_empty()) {
        Some(d) => match schema::DiskOfferingId::parse(&d) {
            Ok(d) => Some(d),
            Err(e) => return bad(format!("disk_offering_id: {e}")),
        },
        None => None,
    };
    create.zone_id = match parsed.zone_id.filter(|z| !z.is_empty()) {
        Some(z) => match schema::ZoneId::parse(&z) {
            Ok(z) => Some(z),
            Err(e) => return bad(format!("zone_id: {e}")),
        },
        None => None,
    };
    let mut command = Command::from(create);
    for (k, v) in parsed.metadata {
        command = command.with_metadata(k, v);
    }
    publish(&s, command, request, "").await
}

async fn attach(s: State<LegacyState>, id: Path<String>, body: Json<Value>) -> Response {
    attach_at(s, id, body, None).await
}

async fn attach_root(s: State<LegacyState>, id: Path<String>, body: Json<Value>) -> Response {
    attach_at(s, id, body, Some(0)).await
}

async fn attach_at(
    State(s): State<LegacyState>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
    device: Option<u32>,
) -> Response {
    let volume = match volume_of(&id) {
        Ok(v) => v,
        Err(e) => return bad(e),
    };
    let parsed: AttachBody = match serde_json::from_value(body.clone()) {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    let vm = match VmId::parse(&parsed.vm_id) {
        Ok(v) => v,
        Err(e) => return bad(format!("vm_id {:?}: {e}", parsed.vm_id)),
    };
    let mut attach = AttachVolume::new(volume, vm);
    if let Some(d) = device {
        attach = match attach.device_id(d) {
            Ok(a) => a,
            Err(e) => return bad(e.to_string()),
        };
    }
    publish(&s, Command::from(attach), body, &id).await
}

async fn detach(State(s): State<LegacyState>, Path(id): Path<String>) -> Response {
    match volume_of(&id) {
        Ok(v) => publish(&s, Command::detach(v), json!({"volume_id": id}), &id).await,
        Err(e) => bad(e),
    }
}

async fn delete(State(s): State<LegacyState>, Path(id): Path<String>) -> Response {
    match volume_of(&id) {
        Ok(v) => publish(&s, Command::delete(v), json!({"volume_id": id}), &id).await,
        Err(e) => bad(e),
    }
}

async fn force_sync(State(s): State<LegacyState>) -> Response {
    publish(&s, Command::reconcile(None), json!({}), "").await
}

/// Publishes `command` through the broker and answers 201 with the old operation object,
/// `pending`, once the broker confirmed it; 503 when it cannot.
async fn publish(s: &LegacyState, command: Command, request: Value, volume: &str) -> Response {
    if let Err(e) = broker::publish_command(&s.broker, &s.topology, &command).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the command could not be handed to the broker: {e}"),
        );
    }
    let now = Utc::now();
    let vm = command.action.vm_id().map(|v| v.to_string());
    let body = json!({
        "id": command.command_id.as_str(),
        "type": command.operation_type().as_str(),
        "status": "pending",
        "volume_id": volume,
        "vm_id": vm,
        "request": request,
        "created_at": now,
        "updated_at": now,
    });
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn operation(State(s): State<LegacyState>, Path(id): Path<String>) -> Response {
    match read::legacy_operation(&s.pool, &id).await {
        Ok(Some(row)) => Json(old_operation(row)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("operation {id} not found")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, database(e)),
    }
}

fn database(e: sqlx::Error) -> String {
    tracing::warn!(error = %e, "compatibility listener: database read failed");
    "the database did not answer".into()
}

/// An operation in the old shape: `error` a string, `request` and `response` objects.
fn old_operation(r: LegacyOperationRow) -> Value {
    let parse = |t: Option<String>| t.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    json!({
        "id": r.id,
        "type": r.kind,
        "status": r.status,
        "volume_id": r.volume_id.unwrap_or_default(),
        "vm_id": r.vm_id,
        "request": parse(r.request).unwrap_or(json!({})),
        "response": parse(r.response),
        "error": r.error,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "completed_at": r.completed_at,
    })
}

async fn device(State(s): State<LegacyState>, Path(id): Path<String>) -> Response {
    let volume = match volume_of(&id) {
        Ok(v) => v,
        Err(e) => return bad(e),
    };
    match read::legacy_mapping(&s.pool, volume).await {
        Ok(Some(m)) => Json(old_mapping(m)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no device mapping for volume {id}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, database(e)),
    }
}

/// A device mapping in the old shape (`volume_uuid`, a device path always a string).
fn old_mapping(m: LegacyMappingRow) -> Value {
    json!({
        "id": m.id.to_string(),
        "volume_uuid": m.volume_id,
        "vm_id": m.vm_id,
        "operation_mode": m.mode,
        "cloudstack_device_id": m.device_id,
        "requires_device_correlation": m.mode == "oma",
        "device_path": m.device_path.clone().unwrap_or_default(),
        "cloudstack_state": m.cloudstack_state,
        "linux_state": m.linux_state,
        "size": m.size.unwrap_or_default(),
        "last_sync": m.last_sync,
        "snapshot_status": "none",
        "persistent_device_name": m.persistent_device_name,
        "symlink_path": m.symlink_path,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    })
}

async fn volume(State(s): State<LegacyState>, Path(id): Path<String>) -> Response {
    let volume = match volume_of(&id) {
        Ok(v) => v,
        Err(e) => return bad(e),
    };
    let mapping = read::legacy_mapping(&s.pool, volume).await;
    let last = read::legacy_last_operation(&s.pool, volume).await;
    match (mapping, last) {
        (Ok(None), Ok(None)) => error(StatusCode::NOT_FOUND, format!("volume {id} not found")),
        (Ok(m), Ok(last)) => {
            let state = m
                .as_ref()
                .map_or("detached", |m| m.cloudstack_state.as_str());
            Json(json!({
                "volume_id": id,
                "vm_id": m.as_ref().map(|m| m.vm_id.clone()),
                "device_path": m.as_ref().and_then(|m| m.device_path.clone()),
                "state": state,
                "size": m.as_ref().and_then(|m| m.size).unwrap_or_default(),
                "cloudstack_data": {},
                "last_operation": last.map(old_operation),
            }))
            .into_response()
        }
        (Err(e), _) | (_, Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, database(e)),
    }
}
