//! The read-only JSON API under `/api/v1` (docs/http.md). Every input is parsed here, at the
//! edge: a malformed id or parameter is a 400 naming it, an unknown id a 404, a database that
//! does not answer a 503, all with `{"error": {"code", "message"}}`. Nothing here writes.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use schema::api::{
    ApiError, ApiErrorBody, DEFAULT_PAGE, DeviceView, ExportList, MAX_PAGE, OperationPage,
    VmVolumes, VolumeView,
};
use schema::{CommandId, OperationStatus, OperationType, VmId, VolumeId};

use crate::db::read::{self, OperationFilter};
use crate::devices::Devices;
use crate::host::NbdUrl;

/// What the read API reads: the database, the device monitor's table, the NBD URL.
#[derive(Debug, Clone)]
pub(crate) struct ApiState {
    pub pool: sqlx::MySqlPool,
    pub devices: Devices,
    pub nbd_url: NbdUrl,
}

/// How long a query may take before the API answers 503.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/operations", get(operations))
        .route("/api/v1/operations/{id}", get(operation))
        .route("/api/v1/volumes/{id}", get(volume))
        .route("/api/v1/vms/{id}/volumes", get(vm_volumes))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{name}/volume", get(device_volume))
        .route("/api/v1/exports", get(exports))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(|| async { Failure::NotFound("no such endpoint".into()) })
        .with_state(state)
}

/// Why a request got no answer.
#[derive(Debug)]
enum Failure {
    BadRequest(String),
    NotFound(String),
    Unavailable(String),
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "BAD_REQUEST", m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, "NOT_FOUND", m),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", m),
        };
        let body = ApiError {
            error: ApiErrorBody {
                code: code.into(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}

type Answer<T> = Result<Json<T>, Failure>;

/// Runs a query, bounded; a failure is a 503 that says what could not be read.
async fn query<T>(
    what: &str,
    q: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(QUERY_TIMEOUT, q).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            // The driver's words stay in the log: they may name hosts, users or schema.
            tracing::warn!(error = %e, "read API: cannot read {what}");
            Err(Failure::Unavailable(format!(
                "cannot read {what}: the database is unavailable (the daemon's log says why)"
            )))
        }
        Err(_) => Err(Failure::Unavailable(format!(
            "cannot read {what}: the database did not answer within {}s",
            QUERY_TIMEOUT.as_secs()
        ))),
    }
}

fn parse<T, E: std::fmt::Display>(
    what: &str,
    raw: &str,
    f: impl Fn(&str) -> Result<T, E>,
) -> Result<T, Failure> {
    f(raw).map_err(|e| Failure::BadRequest(format!("{what} {raw:?}: {e}")))
}

async fn operation(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<schema::api::OperationView> {
    let id = parse("operation id", &id, CommandId::parse)?;
    query(&format!("operation {id}"), read::operation(&s.pool, &id))
        .await?
        .map(Json)
        .ok_or_else(|| Failure::NotFound(format!("no operation has the id {id}")))
}

/// `GET /api/v1/operations`: filtered, newest first, a page at a time.
async fn operations(
    State(s): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Answer<OperationPage> {
    let mut filter = filter_of(&params)?;
    let limit = filter.limit;
    // One more than asked: whether there is a next page.
    filter.limit = limit + 1;
    let mut items = query("operations", read::operations(&s.pool, &filter)).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items
            .last()
            .map(|last| cursor_of(last.created_at, &last.id))
    } else {
        None
    };
    Ok(Json(OperationPage { items, next_cursor }))
}

const FILTERS: [&str; 6] = ["status", "type", "volume_id", "vm_id", "limit", "cursor"];

fn filter_of(params: &HashMap<String, String>) -> Result<OperationFilter, Failure> {
    if let Some(unknown) = params.keys().find(|k| !FILTERS.contains(&k.as_str())) {
        return Err(Failure::BadRequest(format!(
            "unknown parameter {unknown:?}; expected one of {}",
            FILTERS.join(", ")
        )));
    }
    let get = |k: &str| params.get(k).map(String::as_str);
    let limit = match get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(Failure::BadRequest(format!(
                    "limit {raw:?}: expected a whole number from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let unknown_value = |what: &str, raw: &str, allowed: &[&str]| {
        Failure::BadRequest(format!(
            "{what} {raw:?}: expected one of {}",
            allowed.join(", ")
        ))
    };
    let status = get("status")
        .map(|raw| {
            OperationStatus::parse(raw).ok_or_else(|| {
                let all: Vec<&str> = OperationStatus::ALL.iter().map(|s| s.as_str()).collect();
                unknown_value("status", raw, &all)
            })
        })
        .transpose()?;
    let op_type = get("type")
        .map(|raw| {
            OperationType::parse(raw).ok_or_else(|| {
                let all: Vec<&str> = OperationType::ALL.iter().map(|t| t.as_str()).collect();
                unknown_value("type", raw, &all)
            })
        })
        .transpose()?;
    Ok(OperationFilter {
        status,
        op_type,
        volume_id: get("volume_id")
            .map(|raw| parse("volume_id", raw, VolumeId::parse))
            .transpose()?,
        vm_id: get("vm_id")
            .map(|raw| parse("vm_id", raw, VmId::parse))
            .transpose()?,
        before: get("cursor").map(cursor_from).transpose()?,
        limit,
    })
}

/// A cursor is the last item's `created_at` (milliseconds) and id, opaque to clients.
fn cursor_of(at: DateTime<Utc>, id: &CommandId) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_millis()))
}

fn cursor_from(raw: &str) -> Result<(DateTime<Utc>, CommandId), Failure> {
    let bad = || Failure::BadRequest(format!("cursor {raw:?} is not one this API gave out"));
    let text = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let text = String::from_utf8(text).map_err(|_| bad())?;
    let (millis, id) = text.split_once('|').ok_or_else(bad)?;
    let at = millis
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(bad)?;
    Ok((at, CommandId::parse(id).map_err(|_| bad())?))
}

async fn volume(State(s): State<ApiState>, Path(id): Path<String>) -> Answer<VolumeView> {
    let volume = parse("volume id", &id, VolumeId::parse)?;
    let what = format!("volume {volume}");
    let mapping = query(&what, read::mapping(&s.pool, volume)).await?;
    let nbd = s.nbd_url.clone();
    let export = query(
        &what,
        read::exports(&s.pool, Some(volume), |n| nbd.export_url(n)),
    )
    .await?;
    let last_operation = query(&what, read::last_operation(&s.pool, volume)).await?;
    let snapshots = query(&what, crate::db::snapshots::of_volume(&s.pool, volume)).await?;
    if mapping.is_none() && export.is_empty() && last_operation.is_none() {
        return Err(Failure::NotFound(format!(
            "the daemon knows nothing of volume {volume}: no mapping, export or operation"
        )));
    }
    Ok(Json(VolumeView {
        volume_id: volume,
        mapping,
        nbd_export: export.into_iter().next(),
        last_operation,
        snapshots,
    }))
}

async fn vm_volumes(State(s): State<ApiState>, Path(id): Path<String>) -> Answer<VmVolumes> {
    let vm = parse("VM id", &id, VmId::parse)?;
    let items = query(
        &format!("the mappings of VM {vm}"),
        read::mappings(&s.pool, Some(vm)),
    )
    .await?;
    Ok(Json(VmVolumes { vm_id: vm, items }))
}

/// The device monitor's table, each device with the volume of the host mapping on it.
async fn devices(State(s): State<ApiState>) -> Answer<Vec<DeviceView>> {
    let table = s.devices.table();
    let mappings = query("the host mappings", read::mappings(&s.pool, None)).await?;
    let volume_on = |name: &str| {
        let path = format!("/dev/{name}");
        mappings
            .iter()
            .find(|m| {
                m.mode == schema::api::MappingMode::Oma && m.device_path.as_deref() == Some(&path)
            })
            .map(|m| m.volume_id)
    };
    Ok(Json(
        table
            .devices
            .values()
            .map(|p| DeviceView {
                name: p.device.name.clone(),
                size: p.device.size,
                serial: p.device.serial.clone(),
                controller: p.device.controller.clone(),
                volume_id: volume_on(&p.device.name),
            })
            .collect(),
    ))
}

async fn device_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Answer<schema::api::MappingView> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !valid {
        return Err(Failure::BadRequest(format!(
            "device name {name:?}: expected a block device name such as vdb or sdc"
        )));
    }
    let path = format!("/dev/{name}");
    query(
        &format!("the mapping on {path}"),
        read::mapping_on_device(&s.pool, &path),
    )
    .await?
    .map(Json)
    .ok_or_else(|| Failure::NotFound(format!("no volume of the host VM is on {path}")))
}

async fn exports(State(s): State<ApiState>) -> Answer<ExportList> {
    let nbd = s.nbd_url.clone();
    let items = query(
        "the exports",
        read::exports(&s.pool, None, |n| nbd.export_url(n)),
    )
    .await?;
    Ok(Json(ExportList { items }))
}

/// The OpenAPI document of this API (the one committed as `openapi.json`).
async fn openapi() -> Json<serde_json::Value> {
    Json(schema::api::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_the_item_it_was_made_from() {
        let at = DateTime::from_timestamp_millis(1_764_633_600_123).expect("time");
        let id = CommandId::parse("op-7").expect("id");
        let (back_at, back_id) = cursor_from(&cursor_of(at, &id)).expect("cursor");
        assert_eq!((back_at, back_id), (at, id));
        for bad in ["", "!!", "bm9waXBl", &URL_SAFE_NO_PAD.encode("12|bad id")] {
            assert!(cursor_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters_are_checked_and_named() {
        let of = |pairs: &[(&str, &str)]| {
            filter_of(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let message = |r: Result<OperationFilter, Failure>| match r {
            Err(Failure::BadRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        };
        assert!(message(of(&[("limit", "0")])).contains("limit"));
        assert!(message(of(&[("limit", "501")])).contains("1 to 500"));
        assert!(message(of(&[("status", "done")])).contains("status"));
        assert!(message(of(&[("type", "grow")])).contains("reconcile"));
        assert!(message(of(&[("volume_id", "x")])).contains("volume_id"));
        assert!(message(of(&[("colour", "red")])).contains("colour"));
        let ok = of(&[("status", "failed"), ("type", "attach"), ("limit", "500")]).expect("valid");
        assert_eq!(ok.status, Some(OperationStatus::Failed));
        assert_eq!(ok.op_type, Some(OperationType::Attach));
        assert_eq!(ok.limit, 500);
        assert_eq!(of(&[]).expect("defaults").limit, DEFAULT_PAGE);
    }
}
