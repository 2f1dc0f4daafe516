//! The host appliance's rows: `nbd_exports` and the persistent-name columns of host mappings
//! (`device_mappings.persistent_device_name`, `symlink_path`). Writes run inside the caller's
//! (fenced) transaction.

use sqlx::{MySqlConnection, MySqlPool};

use schema::VolumeId;

use crate::db::HOST_MODE as HOST;
use crate::db::store::{Store, StoreError};

const ACTIVE: &str = "active";
const REMOVED: &str = "removed";

/// An `active` row of `nbd_exports`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct ExportRow {
    #[sqlx(try_from = "String")]
    pub volume_id: VolumeId,
    pub export_name: String,
    pub target_path: String,
}

/// A host mapping with what its files should be.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct HostLinkRow {
    #[sqlx(try_from = "String")]
    pub volume_id: VolumeId,
    pub persistent_device_name: Option<String>,
    pub device_path: Option<String>,
    pub by_id_path: Option<String>,
}

/// The volume's export is `name` → `target`, active (a re-attach reuses the row).
pub(crate) async fn upsert_active(
    conn: &mut MySqlConnection,
    volume: VolumeId,
    name: &str,
    target: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nbd_exports (volume_id, export_name, target_path, status) VALUES (?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE export_name = VALUES(export_name), \
         target_path = VALUES(target_path), status = VALUES(status)",
    )
    .bind(volume.to_string())
    .bind(name)
    .bind(target)
    .bind(ACTIVE)
    .execute(conn)
    .await?;
    Ok(())
}

/// The volume's export, if any, is gone.
pub(crate) async fn mark_removed(
    conn: &mut MySqlConnection,
    volume: VolumeId,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nbd_exports SET status = ? WHERE volume_id = ? AND status = ?")
        .bind(REMOVED)
        .bind(volume.to_string())
        .bind(ACTIVE)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every active export.
pub(crate) async fn active(pool: &MySqlPool) -> Result<Vec<ExportRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT volume_id, export_name, target_path FROM nbd_exports WHERE status = ? ORDER BY id",
    )
    .bind(ACTIVE)
    .fetch_all(pool)
    .await
}

/// How many exports are active (`/metrics`).
pub(crate) async fn active_count(pool: &MySqlPool) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports WHERE status = ?")
        .bind(ACTIVE)
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Every host mapping, with its persistent name.
pub(crate) async fn host_links(pool: &MySqlPool) -> Result<Vec<HostLinkRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT volume_id, persistent_device_name, device_path, by_id_path \
         FROM device_mappings WHERE operation_mode = ? ORDER BY id",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
}

/// The persistent names held by volumes other than `volume`.
pub(crate) async fn names_in_use(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT persistent_device_name FROM device_mappings \
         WHERE persistent_device_name IS NOT NULL AND volume_id <> ?",
    )
    .bind(volume.to_string())
    .fetch_all(pool)
    .await
}

/// The persistent name of `volume`'s host mapping, if it has one.
pub(crate) async fn persistent_name_of(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Option<String>, sqlx::Error> {
    let name: Option<Option<String>> = sqlx::query_scalar(
        "SELECT persistent_device_name FROM device_mappings WHERE volume_id = ? AND operation_mode = ?",
    )
    .bind(volume.to_string())
    .bind(HOST)
    .fetch_optional(pool)
    .await?;
    Ok(name.flatten())
}

/// Whether `volume` has an active export row.
pub(crate) async fn has_active(pool: &MySqlPool, volume: VolumeId) -> Result<bool, sqlx::Error> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports WHERE volume_id = ? AND status = ?")
            .bind(volume.to_string())
            .bind(ACTIVE)
            .fetch_one(pool)
            .await?;
    Ok(n > 0)
}

/// Records the persistent name of a host mapping (the reconcile's repair).
pub(crate) async fn set_persistent_name(
    conn: &mut MySqlConnection,
    volume: VolumeId,
    name: &str,
    path: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_mappings SET persistent_device_name = ?, symlink_path = ? WHERE volume_id = ?",
    )
    .bind(name)
    .bind(path)
    .bind(volume.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// The host files' rows as the operations and the host repair use them: reads, and writes that
/// fence themselves.
impl Store {
    /// Every host mapping, with its persistent name.
    pub(crate) async fn host_links(&self) -> Result<Vec<HostLinkRow>, sqlx::Error> {
        host_links(&self.pool).await
    }

    /// Every active `nbd_exports` row.
    pub(crate) async fn active_exports(&self) -> Result<Vec<ExportRow>, sqlx::Error> {
        active(&self.pool).await
    }

    /// The persistent names held by volumes other than `volume`.
    pub(crate) async fn names_in_use(&self, volume: VolumeId) -> Result<Vec<String>, sqlx::Error> {
        names_in_use(&self.pool, volume).await
    }

    /// The persistent name of `volume`'s host mapping, if it has one.
    pub(crate) async fn persistent_name_of(
        &self,
        volume: VolumeId,
    ) -> Result<Option<String>, sqlx::Error> {
        persistent_name_of(&self.pool, volume).await
    }

    /// Whether `volume` has an active export row.
    pub(crate) async fn has_active_export(&self, volume: VolumeId) -> Result<bool, sqlx::Error> {
        has_active(&self.pool, volume).await
    }

    /// `volume`'s export row is removed (its export entry is gone), fenced.
    pub(crate) async fn drop_export(&self, volume: VolumeId) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        mark_removed(&mut tx, volume).await?;
        self.commit_fenced(tx).await
    }

    /// Records what the host repair made for `volume`: its persistent `name` (shown as
    /// `path`) when the mapping had none, an active export row `export` when it had none;
    /// one fenced transaction.
    pub(crate) async fn record_host_files(
        &self,
        volume: VolumeId,
        name: Option<&str>,
        export: Option<&str>,
        path: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(name) = name {
            set_persistent_name(&mut tx, volume, name, path).await?;
        }
        if let Some(export) = export {
            upsert_active(&mut tx, volume, export, path).await?;
        }
        self.commit_fenced(tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    /// A re-attach reuses the row; removing marks it, and only the volume asked about.
    #[tokio::test]
    async fn an_export_row_is_reused_and_removed_per_volume() {
        let db = TestDb::new().await;
        let (a, b) = (VolumeId::new_random(), VolumeId::new_random());
        let mut tx = db.pool.begin().await.expect("tx");
        upsert_active(&mut tx, a, "migration-vol-a", "/run/d/vola")
            .await
            .expect("a");
        upsert_active(&mut tx, b, "migration-vol-b", "/run/d/volb")
            .await
            .expect("b");
        mark_removed(&mut tx, a).await.expect("remove a");
        tx.commit().await.expect("commit");
        let rows = active(&db.pool).await.expect("read");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].volume_id, b);
        assert!(!has_active(&db.pool, a).await.expect("a"));

        let mut tx = db.pool.begin().await.expect("tx");
        upsert_active(&mut tx, a, "migration-vol-a", "/run/d/vola")
            .await
            .expect("again");
        tx.commit().await.expect("commit");
        assert_eq!(
            active(&db.pool).await.expect("read").len(),
            2,
            "one row per volume"
        );
        let ids: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nbd_exports")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(ids, 2, "the re-attach reused a's row");
    }
}
