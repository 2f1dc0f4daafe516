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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    async fn insert_host_mapping(pool: &MySqlPool, volume: &str, serial: &str, path: &str) {
        sqlx::query(
            "INSERT INTO device_mappings (volume_id, vm_id, operation_mode, device_path, serial, \
             cloudstack_state, linux_state) VALUES (?, 'vm', 'oma', ?, ?, 'attached', 'present')",
        )
        .bind(volume)
        .bind(path)
        .bind(serial)
        .execute(pool)
        .await
        .expect("insert");
    }

    /// A device that vanishes leaves its mapping `missing` without a path; when it comes back
    /// under another name, the mapping follows it by serial.
    #[tokio::test]
    async fn host_mappings_follow_their_device_by_serial() {
        let db = TestDb::new().await;
        insert_host_mapping(&db.pool, "vol-a", "serial-a", "/dev/vdb").await;
        let mut tx = db.pool.begin().await.expect("tx");
        device_removed(&mut tx, "/dev/vdb", chrono::Utc::now())
            .await
            .expect("removed");
        tx.commit().await.expect("commit");
        let rows = host_mappings(&db.pool).await.expect("read");
        assert_eq!(
            (rows[0].device_path.as_deref(), rows[0].linux_state.as_str()),
            (None, "missing")
        );

        let mut tx = db.pool.begin().await.expect("tx");
        device_added(
            &mut tx,
            "serial-a",
            "/dev/vdc",
            Some(1 << 30),
            chrono::Utc::now(),
        )
        .await
        .expect("added");
        device_added(
            &mut tx,
            "serial-other",
            "/dev/vdd",
            None,
            chrono::Utc::now(),
        )
        .await
        .expect("another serial changes nothing");
        tx.commit().await.expect("commit");
        let rows = host_mappings(&db.pool).await.expect("read");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].device_path.as_deref(), rows[0].linux_state.as_str()),
            (Some("/dev/vdc"), "present")
        );
    }

    #[tokio::test]
    async fn a_resync_sets_the_device_of_one_volume_only() {
        let db = TestDb::new().await;
        insert_host_mapping(&db.pool, "vol-a", "serial-a", "/dev/vdb").await;
        insert_host_mapping(&db.pool, "vol-b", "serial-b", "/dev/vdc").await;
        let mut tx = db.pool.begin().await.expect("tx");
        set_host_device(&mut tx, "vol-a", None, "missing", chrono::Utc::now())
            .await
            .expect("set");
        tx.commit().await.expect("commit");
        let mut rows = host_mappings(&db.pool).await.expect("read");
        rows.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        assert_eq!(rows[0].linux_state, "missing");
        assert_eq!(
            rows[1].device_path.as_deref(),
            Some("/dev/vdc"),
            "untouched"
        );
    }
}
