//! Retention: ended operations and published outbox rows older than their cutoff are
//! deleted in small batches, each its own fenced transaction, so no sweep holds long locks.
//! What a duplicate of a swept command needs (its id and event) is kept in `ended_commands`.

use chrono::{DateTime, Utc};

use crate::db::outbox;
use crate::db::store::{Store, StoreError};

impl Store {
    /// Deletes up to `batch` outbox rows the broker confirmed before `cutoff`, oldest first;
    /// returns how many (a short transaction: small batches never hold long locks).
    pub(crate) async fn delete_published_outbox(
        &self,
        cutoff: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = outbox::delete_published_before(&mut tx, cutoff, batch).await?;
        self.commit_fenced(tx).await?;
        Ok(done)
    }

    /// Deletes up to `batch` operations that ended before `cutoff`, oldest first; returns how
    /// many.
    pub(crate) async fn delete_ended_operations(
        &self,
        cutoff: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(concat!(
            "SELECT id FROM volume_operations WHERE completed_at < ? AND NOT ",
            unended!(),
            " ORDER BY completed_at LIMIT ? FOR UPDATE"
        ))
        .bind(cutoff)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        // What a duplicate needs outlives the row (docs/wire.md (processing rule 2)): the id and the event
        // (from the outbox for rows that ended before `event_payload` was stored).
        let placeholders = vec!["?"; ids.len()].join(", ");
        let keep = format!(
            "INSERT IGNORE INTO ended_commands (id, type, event_payload, completed_at) \
             SELECT o.id, CAST(o.type AS CHAR), COALESCE(o.event_payload, \
               (SELECT x.payload FROM outbox x WHERE x.event_id = o.event_id ORDER BY x.id LIMIT 1)), \
             o.completed_at FROM volume_operations o WHERE o.id IN ({placeholders})"
        );
        let delete = format!("DELETE FROM volume_operations WHERE id IN ({placeholders})");
        // Only `?` placeholders are put into the texts; the ids are bound.
        let mut keep = sqlx::query(sqlx::AssertSqlSafe(keep));
        let mut delete = sqlx::query(sqlx::AssertSqlSafe(delete));
        for id in &ids {
            keep = keep.bind(id);
            delete = delete.bind(id);
        }
        keep.execute(&mut *tx).await?;
        let done = delete.execute(&mut *tx).await?.rows_affected();
        self.commit_fenced(tx).await?;
        Ok(done)
    }
}
