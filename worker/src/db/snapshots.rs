//! The `snapshots` table: the volume snapshots the daemon took (docs/database.md), written in
//! the transaction that ends their operation, read by the read API.

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, MySqlPool};

use schema::api::SnapshotView;
use schema::{CommandId, SnapshotId, VolumeId};

use crate::model::SnapshotChange;

/// A row of `snapshots` as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct SnapshotRow {
    #[sqlx(try_from = "String")]
    id: SnapshotId,
    name: String,
    state: String,
    created_at: DateTime<Utc>,
    operation_id: Option<String>,
}

impl From<SnapshotRow> for SnapshotView {
    fn from(r: SnapshotRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            state: r.state,
            created: r.created_at,
            operation_id: r.operation_id.and_then(|o| CommandId::parse(&o).ok()),
        }
    }
}

/// Applies `change` in the caller's transaction.
pub(crate) async fn apply(
    conn: &mut MySqlConnection,
    change: &SnapshotChange,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    match change {
        SnapshotChange::Taken { info, operation_id } => {
            sqlx::query(
                "INSERT INTO snapshots (id, volume_id, name, state, operation_id, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE state = VALUES(state), deleted_at = NULL",
            )
            .bind(info.id.to_string())
            .bind(info.volume_id.to_string())
            .bind(&info.name)
            .bind(&info.state)
            .bind(operation_id.as_str())
            .bind(info.created)
            .execute(conn)
            .await?;
        }
        SnapshotChange::Deleted(id) => {
            sqlx::query("UPDATE snapshots SET deleted_at = COALESCE(deleted_at, ?) WHERE id = ?")
                .bind(at)
                .bind(id.to_string())
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// The snapshots of `volume` that were not deleted, newest first.
pub(crate) async fn of_volume(
    pool: &MySqlPool,
    volume: VolumeId,
) -> Result<Vec<SnapshotView>, sqlx::Error> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(
        "SELECT id, name, state, created_at, operation_id FROM snapshots \
         WHERE volume_id = ? AND deleted_at IS NULL ORDER BY created_at DESC, id",
    )
    .bind(volume.to_string())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(SnapshotView::from).collect())
}
