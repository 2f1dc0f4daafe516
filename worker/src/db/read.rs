//! The read API's queries (docs/http.md): operations, mappings and exports as `schema::api`
//! views. Read-only; nothing here is fenced, since nothing here writes.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::MySqlPool;

use schema::api::{ExportView, MappingMode, MappingView, OperationView};
use schema::{CommandId, ErrorCode, EventError, OperationStatus, OperationType, VmId, VolumeId};

use crate::db::HOST_MODE as HOST;

/// The filters of `GET /api/v1/operations`, parsed and bounded by the HTTP layer.
#[derive(Debug, Clone, Default)]
pub(crate) struct OperationFilter {
    pub status: Option<OperationStatus>,
    pub op_type: Option<OperationType>,
    pub volume_id: Option<VolumeId>,
    pub vm_id: Option<VmId>,
    /// Only operations older than this one (the previous page's last): `(created_at, id)`.
    pub before: Option<(DateTime<Utc>, CommandId)>,
    pub limit: u32,
}

macro_rules! operation_view_columns {
    () => {
        "id, CAST(type AS CHAR) AS op_type, CAST(status AS CHAR) AS status, volume_id, vm_id, \
         correlation_id, error, error_code, CAST(error_detail AS CHAR) AS error_detail, \
         cloudstack_job_id, attempts, created_at, updated_at, completed_at, \
         CAST(request AS CHAR) AS request, CAST(response AS CHAR) AS response, imported"
    };
}

#[derive(sqlx::FromRow)]
struct OperationRow {
    id: String,
    op_type: String,
    status: String,
    volume_id: Option<String>,
    vm_id: Option<String>,
    correlation_id: Option<String>,
    error: Option<String>,
    error_code: Option<String>,
    error_detail: Option<String>,
    cloudstack_job_id: Option<String>,
    attempts: u32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    request: String,
    response: Option<String>,
    imported: bool,
}

/// A stored value this daemon did not write (edited by hand): named, not guessed around.
fn unexpected(table: &str, column: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.into(),
        source: format!("{table}.{column} holds a value this daemon never writes").into(),
    }
}

fn decode<T>(column: &str, value: Option<T>) -> Result<T, sqlx::Error> {
    value.ok_or_else(|| unexpected("volume_operations", column))
}

impl TryFrom<OperationRow> for OperationView {
    type Error = sqlx::Error;
    fn try_from(r: OperationRow) -> Result<Self, sqlx::Error> {
        let error = match (r.error_detail, r.error_code) {
            (Some(detail), _) => serde_json::from_str(&detail).ok(),
            // Rows written before error_detail existed: the code's own retryability and hint.
            (None, Some(code)) => ErrorCode::ALL
                .into_iter()
                .find(|c| c.as_str() == code)
                .map(|c| EventError::new(c, r.error.unwrap_or_default())),
            (None, None) => None,
        };
        Ok(OperationView {
            id: decode("id", CommandId::parse(&r.id).ok())?,
            op_type: decode("type", OperationType::parse(&r.op_type))?,
            status: decode("status", OperationStatus::parse(&r.status))?,
            volume_id: r.volume_id.and_then(|v| VolumeId::parse(&v).ok()),
            vm_id: r.vm_id.and_then(|v| VmId::parse(&v).ok()),
            correlation_id: r.correlation_id,
            error,
            cloudstack_job_id: r.cloudstack_job_id,
            attempts: r.attempts,
            created_at: r.created_at,
            updated_at: r.updated_at,
            completed_at: r.completed_at,
            request: serde_json::from_str(&r.request).unwrap_or(Value::Null),
            response: r.response.and_then(|v| serde_json::from_str(&v).ok()),
            imported: r.imported,
        })
    }
}

pub(crate) async fn operation(
    pool: &MySqlPool,
    id: &CommandId,
) -> Result<Option<OperationView>, sqlx::Error> {
    let row: Option<OperationRow> = sqlx::query_as(concat!(
        "SELECT ",
        operation_view_columns!(),
        " FROM volume_operations WHERE id = ?"
    ))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(OperationView::try_from).transpose()
}

/// Operations matching `f`, newest first (`created_at`, then `id`, both descending), at most
/// `f.limit`.
pub(crate) async fn operations(
    pool: &MySqlPool,
    f: &OperationFilter,
) -> Result<Vec<OperationView>, sqlx::Error> {
    let (before_at, before_id) = match &f.before {
        Some((at, id)) => (Some(*at), Some(id.as_str())),
        None => (None, None),
    };
    let rows: Vec<OperationRow> = sqlx::query_as(concat!(
        "SELECT ",
        operation_view_columns!(),
        " FROM volume_operations \
         WHERE (? IS NULL OR status = ?) AND (? IS NULL OR type = ?) \
         AND (? IS NULL OR volume_id = ?) AND (? IS NULL OR vm_id = ?) \
         AND (? IS NULL OR created_at < ? OR (created_at = ? AND id < ?)) \
         ORDER BY created_at DESC, id DESC LIMIT ?"
    ))
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.op_type.map(|t| t.as_str()))
    .bind(f.op_type.map(|t| t.as_str()))
    .bind(f.volume_id.map(|v| v.to_string()))
    .bind(f.volume_id.map(|v| v.to_string()))
    .bind(f.vm_id.map(|v| v.to_string()))
    .bind(f.vm_id.map(|v| v.to_string()))
    .bind(before_at)
    .bind(before_at)
    .bind(before_at)
    .bind(before_id)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(OperationView::try_from).collect()
}

#[derive(sqlx::FromRow)]
struct MappingRow {
    volume_id: String,
    vm_id: String,
    mode: String,
    device_path: Option<String>,
    by_id_path: Option<String>,
    symlink_path: Option<String>,
    serial: Option<String>,
    cloudstack_state: String,
    linux_state: String,
    size: Option<u64>,
    last_sync: Option<DateTime<Utc>>,
}

macro_rules! mapping_columns {
    () => {
        "volume_id, vm_id, CAST(operation_mode AS CHAR) AS mode, device_path, by_id_path, \
         symlink_path, serial, cloudstack_state, linux_state, size, last_sync \
         FROM device_mappings"
    };
}

impl TryFrom<MappingRow> for MappingView {
    type Error = sqlx::Error;
    fn try_from(r: MappingRow) -> Result<Self, sqlx::Error> {
        let bad = |column: &str| unexpected("device_mappings", column);
        Ok(MappingView {
            volume_id: VolumeId::parse(&r.volume_id).map_err(|_| bad("volume_id"))?,
            vm_id: VmId::parse(&r.vm_id).map_err(|_| bad("vm_id"))?,
            mode: if r.mode == HOST {
                MappingMode::Oma
            } else {
                MappingMode::Failover
            },
            device_path: r.device_path,
            by_id_path: r.by_id_path,
            persistent_path: r.symlink_path,
            serial: r.serial,
            cloudstack_state: r.cloudstack_state,
            linux_state: r.linux_state,
            size: r.size,
            last_sync: r.last_sync,
        })
    }
}

fn views(rows: Vec<MappingRow>) -> Result<Vec<MappingView>, sqlx::Error> {
    rows.into_iter().map(MappingView::try_from).collect()
}

pub(crate) async fn mapping(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Option<MappingView>, sqlx::Error> {
    let row: Option<MappingRow> = sqlx::query_as(concat!(
        "SELECT ",
        mapping_columns!(),
        " WHERE volume_id = ?"
    ))
    .bind(volume.to_string())
    .fetch_optional(pool)
    .await?;
    row.map(MappingView::try_from).transpose()
}

/// The mappings on `vm`, or every mapping.
pub(crate) async fn mappings(
    pool: &MySqlPool,
    vm: Option<VmId>,
) -> Result<Vec<MappingView>, sqlx::Error> {
    let rows: Vec<MappingRow> = sqlx::query_as(concat!(
        "SELECT ",
        mapping_columns!(),
        " WHERE (? IS NULL OR vm_id = ?) ORDER BY vm_id, volume_id"
    ))
    .bind(vm.map(|v| v.to_string()))
    .bind(vm.map(|v| v.to_string()))
    .fetch_all(pool)
    .await?;
    views(rows)
}

/// The host mapping whose device is `device_path`.
pub(crate) async fn mapping_on_device(
    pool: &MySqlPool,
    device_path: &str,
) -> Result<Option<MappingView>, sqlx::Error> {
    let row: Option<MappingRow> = sqlx::query_as(concat!(
        "SELECT ",
        mapping_columns!(),
        " WHERE operation_mode = ? AND device_path = ?"
    ))
    .bind(HOST)
    .bind(device_path)
    .fetch_optional(pool)
    .await?;
    row.map(MappingView::try_from).transpose()
}

#[derive(sqlx::FromRow)]
struct ExportRow {
    volume_id: String,
    export_name: String,
    target_path: String,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Active exports (of one volume, or all), with their URL made by `url_of(name)`.
pub(crate) async fn exports(
    pool: &MySqlPool,
    volume: Option<VolumeId>,
    url_of: impl Fn(&str) -> String,
) -> Result<Vec<ExportView>, sqlx::Error> {
    let rows: Vec<ExportRow> = sqlx::query_as(
        "SELECT volume_id, export_name, target_path, CAST(status AS CHAR) AS status, created_at, \
         updated_at FROM nbd_exports WHERE status = 'active' AND (? IS NULL OR volume_id = ?) \
         ORDER BY export_name",
    )
    .bind(volume.map(|v| v.to_string()))
    .bind(volume.map(|v| v.to_string()))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(ExportView {
                volume_id: VolumeId::parse(&r.volume_id).ok()?,
                url: url_of(&r.export_name),
                name: r.export_name,
                target_path: r.target_path,
                status: r.status,
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
        })
        .collect())
}

/// The newest operation on `volume`.
pub(crate) async fn last_operation(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Option<OperationView>, sqlx::Error> {
    let page = operations(
        pool,
        &OperationFilter {
            volume_id: Some(volume),
            limit: 1,
            ..OperationFilter::default()
        },
    )
    .await?;
    Ok(page.into_iter().next())
}

/// What `/metrics` reads at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    pub pending: u64,
    pub executing: u64,
    pub host_mappings: u64,
    pub remote_mappings: u64,
}

pub(crate) async fn gauges(pool: &MySqlPool) -> Result<Gauges, sqlx::Error> {
    let (pending, executing): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(status = 'pending'), 0) AS SIGNED), \
         CAST(COALESCE(SUM(status = 'executing'), 0) AS SIGNED) \
         FROM volume_operations WHERE status IN ('pending', 'executing')",
    )
    .fetch_one(pool)
    .await?;
    let (host, remote): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(operation_mode = ?), 0) AS SIGNED), \
         CAST(COALESCE(SUM(operation_mode <> ?), 0) AS SIGNED) FROM device_mappings",
    )
    .bind(HOST)
    .bind(HOST)
    .fetch_one(pool)
    .await?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(Gauges {
        pending: n(pending),
        executing: n(executing),
        host_mappings: n(host),
        remote_mappings: n(remote),
    })
}
/// An operation as the old daemon's compatibility routes show it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct LegacyOperationRow {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub volume_id: Option<String>,
    pub vm_id: Option<String>,
    pub request: Option<String>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A mapping as the old daemon's compatibility routes show it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct LegacyMappingRow {
    pub id: u64,
    pub volume_id: String,
    pub vm_id: String,
    pub mode: String,
    pub device_id: Option<u32>,
    pub device_path: Option<String>,
    pub cloudstack_state: String,
    pub linux_state: String,
    pub size: Option<u64>,
    pub last_sync: Option<DateTime<Utc>>,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const LEGACY_OPERATION: &str = "SELECT id, CAST(type AS CHAR) AS kind, CAST(status AS CHAR) AS status, \
     volume_id, vm_id, CAST(request AS CHAR) AS request, CAST(response AS CHAR) AS response, error, \
     created_at, updated_at, completed_at FROM volume_operations";

/// One operation, for the old daemon's `GET /api/v1/operations/{id}`.
pub(crate) async fn legacy_operation(
    pool: &MySqlPool,
    id: &str,
) -> Result<Option<LegacyOperationRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{LEGACY_OPERATION} WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The newest operation on `volume`, for the old daemon's volume status.
pub(crate) async fn legacy_last_operation(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Option<LegacyOperationRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{LEGACY_OPERATION} WHERE volume_id = ? ORDER BY created_at DESC, seq DESC LIMIT 1"
    )))
    .bind(volume.to_string())
    .fetch_optional(pool)
    .await
}

/// The mapping of `volume`, for the old daemon's `/volumes/{id}/device`.
pub(crate) async fn legacy_mapping(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Option<LegacyMappingRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, volume_id, vm_id, CAST(operation_mode AS CHAR) AS mode, \
         cloudstack_device_id AS device_id, device_path, cloudstack_state, linux_state, size, \
         last_sync, persistent_device_name, symlink_path, created_at, updated_at \
         FROM device_mappings WHERE volume_id = ?",
    )
    .bind(volume.to_string())
    .fetch_optional(pool)
    .await
}

impl crate::db::store::Store {
    /// The mappings (of `vm`, else all), as a reconcile compares them with CloudStack.
    pub(crate) async fn mappings(&self, vm: Option<VmId>) -> Result<Vec<MappingView>, sqlx::Error> {
        mappings(&self.pool, vm).await
    }
}
