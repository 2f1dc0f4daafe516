//! The old Go daemon's tables (docs/configuration.md, "Taking over the old daemon's
//! installation"): read, never written, in either of their two forms; and the import of what
//! they hold into this daemon's tables, in one transaction, each row only once.

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, MySqlPool};

/// Which form the old tables have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// The appliance's schema: `device_mappings.volume_uuid`, `operation_mode`, persistent
    /// names, the platform's `nbd_exports`.
    Production,
    /// The old documentation's: `device_mappings.volume_id`, nothing else.
    Documented,
}

/// A row of the old `device_mappings`, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct OldMapping {
    pub volume: String,
    pub vm_id: String,
    pub mode: Option<String>,
    pub device_path: String,
    pub device_id: Option<i64>,
    pub size: Option<i64>,
    pub persistent_name: Option<String>,
}

/// A row of the old `nbd_exports`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct OldExport {
    pub volume: String,
    pub export_name: String,
    pub status: String,
}

/// A row of the old `volume_operations`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct OldOperation {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub volume_id: Option<String>,
    pub vm_id: Option<String>,
    pub request: Option<String>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// The active row of the old `ossea_configs`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct OldConfig {
    pub name: String,
    pub api_url: String,
    pub api_key: String,
    pub secret_key: String,
    pub domain: Option<String>,
    pub zone: Option<String>,
    pub oma_vm_id: Option<String>,
}

/// Everything of the old installation the import uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OldState {
    pub form: Form,
    pub mappings: Vec<OldMapping>,
    pub exports: Vec<OldExport>,
    pub operations: Vec<OldOperation>,
    pub config: Option<OldConfig>,
}

/// Why the old database cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("it has no `device_mappings` and `volume_operations` tables of the old daemon")]
    NotLegacy,
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
}

async fn has(pool: &MySqlPool, table: &str, column: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?",
    )
    .bind(table)
    .bind(column)
    .fetch_one(pool)
    .await?;
    Ok(n > 0)
}

/// Reads the old installation (plain SELECTs: nothing is locked or written).
pub(crate) async fn read(pool: &MySqlPool) -> Result<OldState, ReadError> {
    let form = if has(pool, "device_mappings", "volume_uuid").await? {
        Form::Production
    } else if has(pool, "device_mappings", "volume_id").await? {
        Form::Documented
    } else {
        return Err(ReadError::NotLegacy);
    };
    if !has(pool, "volume_operations", "status").await? {
        return Err(ReadError::NotLegacy);
    }
    let mappings = match form {
        Form::Production => sqlx::query_as(
            "SELECT volume_uuid AS volume, vm_id, CAST(operation_mode AS CHAR) AS mode, device_path, \
             CAST(cloudstack_device_id AS SIGNED) AS device_id, CAST(size AS SIGNED) AS size, \
             persistent_device_name AS persistent_name FROM device_mappings ORDER BY volume_uuid",
        ),
        Form::Documented => sqlx::query_as(
            "SELECT volume_id AS volume, vm_id, CAST(NULL AS CHAR) AS mode, device_path, \
             CAST(NULL AS SIGNED) AS device_id, CAST(size AS SIGNED) AS size, \
             CAST(NULL AS CHAR) AS persistent_name FROM device_mappings ORDER BY volume_id",
        ),
    }
    .fetch_all(pool)
    .await?;
    let exports = if has(pool, "nbd_exports", "export_name").await? {
        sqlx::query_as(
            "SELECT volume_id AS volume, export_name, CAST(status AS CHAR) AS status \
             FROM nbd_exports ORDER BY export_name",
        )
        .fetch_all(pool)
        .await?
    } else {
        Vec::new()
    };
    let operations = sqlx::query_as(
        "SELECT id, CAST(type AS CHAR) AS kind, CAST(status AS CHAR) AS status, volume_id, vm_id, \
         CAST(request AS CHAR) AS request, CAST(response AS CHAR) AS response, error, \
         created_at, completed_at FROM volume_operations ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await?;
    let config = if has(pool, "ossea_configs", "api_key").await? {
        sqlx::query_as(
            "SELECT name, api_url, api_key, secret_key, domain, zone, oma_vm_id FROM ossea_configs \
             WHERE is_active = TRUE ORDER BY updated_at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await?
    } else {
        None
    };
    Ok(OldState {
        form,
        mappings,
        exports,
        operations,
        config,
    })
}

/// A mapping as this daemon records it, from the import.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewMapping {
    pub volume_id: String,
    pub vm_id: String,
    /// `oma` (the host VM) or `failover`.
    pub mode: &'static str,
    pub device_path: Option<String>,
    pub serial: String,
    pub device_id: Option<i64>,
    pub linux_state: &'static str,
    pub size: Option<i64>,
    pub persistent_name: Option<String>,
    pub symlink_path: Option<String>,
}

/// An export as this daemon records it, from the import.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewExport {
    pub volume_id: String,
    pub export_name: String,
    pub target_path: String,
}

/// An old ended operation as one of this daemon's, with its terminal event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImportedOperation {
    pub id: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub volume_id: Option<String>,
    pub vm_id: Option<String>,
    pub request: String,
    pub response: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<&'static str>,
    pub error_detail: Option<String>,
    pub event_id: String,
    pub event_payload: String,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// What an import writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    pub mappings: Vec<NewMapping>,
    pub exports: Vec<NewExport>,
    /// Every old operation, verbatim, as history.
    pub operations: Vec<OldOperation>,
    /// The ended ones of a command type this daemon has, as its own operations.
    pub imported: Vec<ImportedOperation>,
    pub config: Option<OldConfig>,
}

/// Rows an import wrote (a row already there counts nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Written {
    pub mappings: u64,
    pub exports: u64,
    pub operations: u64,
    pub imported: u64,
    pub configs: u64,
}

/// Writes `plan` into this daemon's database, in one transaction; a row whose key is already
/// there is left as it is, so a second import writes nothing.
pub(crate) async fn write(pool: &MySqlPool, plan: &Plan) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut done = Written::default();
    for m in &plan.mappings {
        done.mappings += mapping(&mut tx, m).await?;
    }
    for e in &plan.exports {
        done.exports += sqlx::query(
            "INSERT IGNORE INTO nbd_exports (volume_id, export_name, target_path, status) \
             VALUES (?, ?, ?, 'active')",
        )
        .bind(&e.volume_id)
        .bind(&e.export_name)
        .bind(&e.target_path)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    for o in &plan.operations {
        done.operations += operation(&mut tx, o).await?;
    }
    for o in &plan.imported {
        done.imported += imported(&mut tx, o).await?;
    }
    if let Some(c) = &plan.config {
        done.configs += sqlx::query(
            "INSERT IGNORE INTO ossea_configs \
             (name, api_url, api_key, secret_key, domain, zone, oma_vm_id, is_active) \
             VALUES (?, ?, ?, ?, ?, ?, ?, TRUE)",
        )
        .bind(&c.name)
        .bind(&c.api_url)
        .bind(&c.api_key)
        .bind(&c.secret_key)
        .bind(&c.domain)
        .bind(&c.zone)
        .bind(&c.oma_vm_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(done)
}

async fn mapping(tx: &mut MySqlConnection, m: &NewMapping) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT IGNORE INTO device_mappings (volume_id, vm_id, operation_mode, device_path, serial, \
         cloudstack_device_id, cloudstack_state, linux_state, size, persistent_device_name, \
         symlink_path, last_sync) VALUES (?, ?, ?, ?, ?, ?, 'attached', ?, ?, ?, ?, UTC_TIMESTAMP(3))",
    )
    .bind(&m.volume_id)
    .bind(&m.vm_id)
    .bind(m.mode)
    .bind(&m.device_path)
    .bind(&m.serial)
    .bind(m.device_id)
    .bind(m.linux_state)
    .bind(m.size)
    .bind(&m.persistent_name)
    .bind(&m.symlink_path)
    .execute(tx)
    .await?
    .rows_affected())
}

async fn imported(tx: &mut MySqlConnection, o: &ImportedOperation) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT IGNORE INTO volume_operations (id, type, status, volume_id, vm_id, request, \
         response, error, error_code, error_detail, event_id, event_payload, attempts, created_at, \
         completed_at, imported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, TRUE)",
    )
    .bind(&o.id)
    .bind(o.kind)
    .bind(o.status)
    .bind(&o.volume_id)
    .bind(&o.vm_id)
    .bind(&o.request)
    .bind(&o.response)
    .bind(&o.error)
    .bind(o.error_code)
    .bind(&o.error_detail)
    .bind(&o.event_id)
    .bind(&o.event_payload)
    .bind(o.created_at)
    .bind(o.completed_at)
    .execute(tx)
    .await?
    .rows_affected())
}

async fn operation(tx: &mut MySqlConnection, o: &OldOperation) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT IGNORE INTO legacy_operations (id, type, status, volume_id, vm_id, request, \
         response, error, created_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&o.id)
    .bind(&o.kind)
    .bind(&o.status)
    .bind(&o.volume_id)
    .bind(&o.vm_id)
    .bind(&o.request)
    .bind(&o.response)
    .bind(&o.error)
    .bind(o.created_at)
    .bind(o.completed_at)
    .execute(tx)
    .await?
    .rows_affected())
}

/// A plain read-only pool on the old database (no migration, no session settings).
pub(crate) async fn connect(url: &schema::SecretUrl) -> Result<MySqlPool, sqlx::Error> {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect(url.expose())
        .await
}
