//! The mapping sync's SQL: host mappings (`operation_mode = 'oma'`) follow the guest's devices.
//! Each runs inside the caller's (fenced) transaction.

use chrono::{DateTime, Utc};
use schema::VolumeId;
use sqlx::{MySqlConnection, MySqlPool};

use crate::db::HOST_MODE as HOST;
use crate::db::store::{Store, StoreError, now};
use crate::mappings::LinuxState;

/// What the device monitor saw happen to a guest device, as the mapping sync records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceFact<'a> {
    /// The device at `path` vanished: its mapping has no device any more.
    Removed { path: &'a str },
    /// A device with `serial` appeared at `path`.
    Added {
        serial: &'a str,
        path: &'a str,
        size: Option<u64>,
    },
    /// The device at `path` has a new size.
    Resized { path: &'a str, size: Option<u64> },
}

/// A host mapping as the sync sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct HostMapping {
    #[sqlx(try_from = "String")]
    pub volume_id: VolumeId,
    pub serial: Option<String>,
    pub device_path: Option<String>,
    #[sqlx(try_from = "String")]
    pub linux_state: LinuxState,
}

/// The device at `path` vanished: its mapping has no device any more.
pub(crate) async fn device_removed(
    tx: &mut MySqlConnection,
    path: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET linux_state = ?, device_path = NULL, last_sync = ? \
         WHERE operation_mode = ? AND device_path = ?",
    )
    .bind(LinuxState::Missing.as_str())
    .bind(at)
    .bind(HOST)
    .bind(path)
    .execute(tx)
    .await?;
    Ok(())
}

/// A device with `serial` appeared at `path`: the mapping of that serial points there.
pub(crate) async fn device_added(
    tx: &mut MySqlConnection,
    serial: &str,
    path: &str,
    size: Option<u64>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET linux_state = ?, device_path = ?, size = COALESCE(?, size), last_sync = ? \
         WHERE operation_mode = ? AND serial = ? AND (device_path IS NULL OR device_path <> ? OR linux_state <> ?)",
    )
    .bind(LinuxState::Present.as_str())
    .bind(path)
    .bind(size)
    .bind(at)
    .bind(HOST)
    .bind(serial)
    .bind(path)
    .bind(LinuxState::Present.as_str())
    .execute(tx)
    .await?;
    Ok(())
}

/// The device at `path` changed size.
pub(crate) async fn device_resized(
    tx: &mut MySqlConnection,
    path: &str,
    size: Option<u64>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET size = ?, last_sync = ? WHERE operation_mode = ? AND device_path = ?",
    )
    .bind(size)
    .bind(at)
    .bind(HOST)
    .bind(path)
    .execute(tx)
    .await?;
    Ok(())
}

/// Every host mapping.
pub(crate) async fn host_mappings(pool: &MySqlPool) -> Result<Vec<HostMapping>, sqlx::Error> {
    sqlx::query_as(
        "SELECT volume_id, serial, device_path, linux_state FROM device_mappings WHERE operation_mode = ?",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
}

/// Sets where `volume`'s device is (or that it is missing).
pub(crate) async fn set_host_device(
    tx: &mut MySqlConnection,
    volume: VolumeId,
    path: Option<&str>,
    linux_state: LinuxState,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET device_path = ?, linux_state = ?, last_sync = ? WHERE volume_id = ?",
    )
    .bind(path)
    .bind(linux_state.as_str())
    .bind(at)
    .bind(volume.to_string())
    .execute(tx)
    .await?;
    Ok(())
}

/// The mapping sync's reads, and its writes, which fence themselves.
impl Store {
    /// Every host mapping, as the sync compares it with the device table.
    pub(crate) async fn host_mappings(&self) -> Result<Vec<HostMapping>, sqlx::Error> {
        host_mappings(&self.pool).await
    }

    /// Records `fact` in the host mappings it concerns, fenced.
    pub(crate) async fn record_device(&self, fact: &DeviceFact<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        match *fact {
            DeviceFact::Removed { path } => device_removed(&mut tx, path, now()).await?,
            DeviceFact::Added { serial, path, size } => {
                device_added(&mut tx, serial, path, size, now()).await?
            }
            DeviceFact::Resized { path, size } => {
                device_resized(&mut tx, path, size, now()).await?
            }
        }
        self.commit_fenced(tx).await
    }

    /// Sets where `volume`'s device is (or that it is missing), fenced.
    pub(crate) async fn set_host_device(
        &self,
        volume: VolumeId,
        path: Option<&str>,
        linux_state: LinuxState,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        set_host_device(&mut tx, volume, path, linux_state, now()).await?;
        self.commit_fenced(tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    async fn insert_host_mapping(pool: &MySqlPool, volume: VolumeId, serial: &str, path: &str) {
        sqlx::query(
            "INSERT INTO device_mappings (volume_id, vm_id, operation_mode, device_path, serial, \
             cloudstack_state, linux_state) VALUES (?, 'vm', 'oma', ?, ?, 'attached', 'present')",
        )
        .bind(volume.to_string())
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
        insert_host_mapping(&db.pool, VolumeId::new_random(), "serial-a", "/dev/vdb").await;
        let mut tx = db.pool.begin().await.expect("tx");
        device_removed(&mut tx, "/dev/vdb", chrono::Utc::now())
            .await
            .expect("removed");
        tx.commit().await.expect("commit");
        let rows = host_mappings(&db.pool).await.expect("read");
        assert_eq!(
            (rows[0].device_path.as_deref(), rows[0].linux_state),
            (None, LinuxState::Missing)
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
            (rows[0].device_path.as_deref(), rows[0].linux_state),
            (Some("/dev/vdc"), LinuxState::Present)
        );
    }

    #[tokio::test]
    async fn a_resync_sets_the_device_of_one_volume_only() {
        let db = TestDb::new().await;
        let (a, b) = (VolumeId::new_random(), VolumeId::new_random());
        insert_host_mapping(&db.pool, a, "serial-a", "/dev/vdb").await;
        insert_host_mapping(&db.pool, b, "serial-b", "/dev/vdc").await;
        let mut tx = db.pool.begin().await.expect("tx");
        set_host_device(&mut tx, a, None, LinuxState::Missing, chrono::Utc::now())
            .await
            .expect("set");
        tx.commit().await.expect("commit");
        let rows = host_mappings(&db.pool).await.expect("read");
        let row = |v| rows.iter().find(|r| r.volume_id == v).expect("row");
        assert_eq!(row(a).linux_state, LinuxState::Missing);
        assert_eq!(row(b).device_path.as_deref(), Some("/dev/vdc"), "untouched");
    }
}
