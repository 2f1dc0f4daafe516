//! The mapping sync's SQL: host mappings (`operation_mode = 'oma'`) follow the guest's devices.
//! Each runs inside the caller's (fenced) transaction.

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, MySqlPool};

/// A host mapping as the sync sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HostMapping {
    pub volume_id: String,
    pub serial: Option<String>,
    pub device_path: Option<String>,
    pub linux_state: String,
}

/// The device at `path` vanished: its mapping has no device any more.
pub async fn device_removed(
    tx: &mut MySqlConnection,
    path: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET linux_state = 'missing', device_path = NULL, last_sync = ? \
         WHERE operation_mode = 'oma' AND device_path = ?",
    )
    .bind(at)
    .bind(path)
    .execute(tx)
    .await?;
    Ok(())
}

/// A device with `serial` appeared at `path`: the mapping of that serial points there.
pub async fn device_added(
    tx: &mut MySqlConnection,
    serial: &str,
    path: &str,
    size: Option<u64>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET linux_state = 'present', device_path = ?, size = COALESCE(?, size), last_sync = ? \
         WHERE operation_mode = 'oma' AND serial = ? AND (device_path IS NULL OR device_path <> ? OR linux_state <> 'present')",
    )
    .bind(path)
    .bind(size)
    .bind(at)
    .bind(serial)
    .bind(path)
    .execute(tx)
    .await?;
    Ok(())
}

/// The device at `path` changed size.
pub async fn device_resized(
    tx: &mut MySqlConnection,
    path: &str,
    size: Option<u64>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET size = ?, last_sync = ? WHERE operation_mode = 'oma' AND device_path = ?",
    )
    .bind(size)
    .bind(at)
    .bind(path)
    .execute(tx)
    .await?;
    Ok(())
}

/// Every host mapping.
pub async fn host_mappings(pool: &MySqlPool) -> Result<Vec<HostMapping>, sqlx::Error> {
    sqlx::query_as(
        "SELECT volume_id, serial, device_path, linux_state FROM device_mappings WHERE operation_mode = 'oma'",
    )
    .fetch_all(pool)
    .await
}

/// Sets where `volume`'s device is (or that it is missing).
pub async fn set_host_device(
    tx: &mut MySqlConnection,
    volume: &str,
    path: Option<&str>,
    linux_state: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET device_path = ?, linux_state = ?, last_sync = ? WHERE volume_id = ?",
    )
    .bind(path)
    .bind(linux_state)
    .bind(at)
    .bind(volume)
    .execute(tx)
    .await?;
    Ok(())
}
