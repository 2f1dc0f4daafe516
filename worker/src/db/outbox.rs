//! The outbox table: events waiting to be published.
//!
//! Rows are written in the same transaction as the result they announce ([`insert`]) and read
//! by the relay without locks ([`unpublished_except`]): only the lease holder relays, and the relay
//! must not hold row locks while it waits for the broker's confirms. There is no "highest id
//! seen" cursor: auto-increment ids commit out of order, so every read looks at all rows whose
//! `published_at` is still NULL.

use chrono::{DateTime, Utc};
use sqlx::{MySqlConnection, MySqlPool, Row};

use schema::CloudEvent;

use crate::db::fence::{Fence, StoreError};
use crate::db::{bucket, padded};

/// An event to publish, as stored.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub id: u64,
    pub event_id: String,
    pub exchange: String,
    pub routing_key: String,
    pub payload: String,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Earlier tries the broker refused (nack) or left unconfirmed.
    pub attempts: u32,
}

/// Adds `event` to the outbox, inside the caller's transaction.
pub(crate) async fn insert(
    conn: &mut MySqlConnection,
    event: &CloudEvent,
    exchange: &str,
    reply_to: Option<&str>,
) -> Result<(), sqlx::Error> {
    let payload = serde_json::to_string(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO outbox (event_id, exchange, routing_key, payload, correlation_id, reply_to) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(event.id.to_string())
    .bind(exchange)
    .bind(&event.event_type)
    .bind(payload)
    .bind(event.amqp_correlation_id())
    .bind(reply_to)
    .execute(conn)
    .await?;
    Ok(())
}

/// An outbox row to add: an event, its JSON (as the operation's row stores it too), where it
/// goes, and the copy to its `reply_to`.
pub(crate) struct NewRow<'a> {
    pub event: &'a CloudEvent,
    pub payload: &'a str,
    pub exchange: &'a str,
    pub reply_to: Option<&'a str>,
}

/// Adds every row of `rows` to the outbox in one INSERT, inside the caller's transaction (ids
/// in the order given).
pub(crate) async fn insert_all(
    conn: &mut MySqlConnection,
    rows: &[NewRow<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    // Only `?` placeholders are put into the text; the values are bound. A row's last `?`
    // says whether it is one of `rows` or padding (see `bucket`).
    let sql = format!(
        "INSERT INTO outbox (event_id, exchange, routing_key, payload, correlation_id, reply_to) {}",
        vec!["SELECT ?, ?, ?, ?, ?, ? FROM DUAL WHERE ?"; bucket(rows.len())].join(" UNION ALL ")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (i, row) in padded(rows).enumerate() {
        query = query
            .bind(row.event.id.to_string())
            .bind(row.exchange)
            .bind(&row.event.event_type)
            .bind(row.payload)
            .bind(row.event.amqp_correlation_id())
            .bind(row.reply_to)
            .bind(i < rows.len());
    }
    query.execute(conn).await?;
    Ok(())
}

/// Deletes up to `batch` rows the broker confirmed before `cutoff` (the retention sweep).
/// Unpublished rows are never deleted, however old.
pub(crate) async fn delete_published_before(
    conn: &mut MySqlConnection,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch: u32,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < ? \
         ORDER BY published_at, id LIMIT ?",
    )
    .bind(cutoff)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Up to `limit` unpublished rows, oldest first (a plain read: no locks held), without the
/// rows `except` names (published, their marking not yet committed): the server skips them in
/// its index, so their payloads are not sent again.
pub(crate) async fn unpublished_except(
    pool: &MySqlPool,
    limit: u32,
    except: &[u64],
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    const COLUMNS: &str = "SELECT id, event_id, exchange, routing_key, payload, correlation_id, reply_to, \
         publish_attempts FROM outbox WHERE published_at IS NULL";
    // Only `?` placeholders are put into the text; the ids are bound.
    let sql = if except.is_empty() {
        format!("{COLUMNS} ORDER BY id LIMIT ?")
    } else {
        let placeholders = vec!["?"; bucket(except.len())].join(", ");
        format!("{COLUMNS} AND id NOT IN ({placeholders}) ORDER BY id LIMIT ?")
    };
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for id in padded(except) {
        query = query.bind(*id);
    }
    let rows = query.bind(limit).fetch_all(pool).await?;
    rows.into_iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                exchange: r.try_get("exchange")?,
                routing_key: r.try_get("routing_key")?,
                payload: r.try_get("payload")?,
                correlation_id: r.try_get("correlation_id")?,
                reply_to: r.try_get("reply_to")?,
                attempts: r.try_get("publish_attempts")?,
            })
        })
        .collect()
}

/// Marks rows published (a relay batch the broker confirmed) in one fenced autocommit
/// statement (`lease` and `epoch` are the fence's): how many rows it marked, none when the
/// lease has moved on. One round trip, not one per row.
pub(crate) async fn mark_all_published(
    pool: &MySqlPool,
    ids: &[u64],
    lease: &str,
    epoch: u64,
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    // Only `?` placeholders are put into the text; the ids are bound.
    let placeholders = vec!["?"; bucket(ids.len())].join(", ");
    let sql = format!(
        concat!(
            "UPDATE outbox SET published_at = UTC_TIMESTAMP(3) WHERE published_at IS NULL \
             AND id IN ({}) AND ",
            fenced!()
        ),
        placeholders
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for id in padded(ids) {
        query = query.bind(*id);
    }
    let done = query.bind(lease).bind(epoch).execute(pool).await?;
    Ok(done.rows_affected())
}

/// [`mark_all_published`] under `fence`: [`StoreError::Fenced`] when it marked nothing because
/// the lease moved on (nothing marked while the fence holds: the rows were marked already).
pub(crate) async fn mark_published_fenced(
    pool: &MySqlPool,
    ids: &[u64],
    fence: &Fence,
) -> Result<u64, StoreError> {
    let marked = mark_all_published(pool, ids, fence.name(), fence.epoch()).await?;
    if marked == 0 && !ids.is_empty() {
        let mut conn = pool.acquire().await?;
        fence.check(&mut conn).await?;
    }
    Ok(marked)
}

/// [`record_refusals`] under `fence`: [`StoreError::Fenced`] when it changed nothing because
/// the lease moved on.
pub(crate) async fn record_refusals_fenced(
    pool: &MySqlPool,
    ids: &[u64],
    give_up: &[u64],
    fence: &Fence,
) -> Result<u64, StoreError> {
    let changed = record_refusals(pool, ids, give_up, fence.name(), fence.epoch()).await?;
    if changed == 0 && !ids.is_empty() {
        let mut conn = pool.acquire().await?;
        fence.check(&mut conn).await?;
    }
    Ok(changed)
}

/// Counts one more refused (or unconfirmed) try of each row of `ids` and, for the rows of
/// `give_up`, records that the relay gave them up: `refused_at` and `published_at` set, so they
/// leave the backlog (docs/wire.md). One fenced autocommit statement; how many rows it changed,
/// none when the lease has moved on.
pub(crate) async fn record_refusals(
    pool: &MySqlPool,
    ids: &[u64],
    give_up: &[u64],
    lease: &str,
    epoch: u64,
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    // Only `?` placeholders are put into the text; the ids are bound. `give_up` may be empty:
    // `id IN (NULL)` is then never true.
    let list = |n: usize| {
        if n == 0 {
            "NULL".to_owned()
        } else {
            vec!["?"; n].join(", ")
        }
    };
    let sql = format!(
        concat!(
            "UPDATE outbox SET publish_attempts = publish_attempts + 1, \
             refused_at = IF(id IN ({give_up}), UTC_TIMESTAMP(3), NULL), \
             published_at = IF(id IN ({give_up}), UTC_TIMESTAMP(3), NULL) \
             WHERE published_at IS NULL AND id IN ({ids}) AND ",
            fenced!()
        ),
        give_up = list(give_up.len()),
        ids = list(ids.len()),
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for id in give_up.iter().chain(give_up).chain(ids) {
        query = query.bind(*id);
    }
    let done = query.bind(lease).bind(epoch).execute(pool).await?;
    Ok(done.rows_affected())
}

/// How many events wait, and since when the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    pub count: u64,
    pub oldest: Option<DateTime<Utc>>,
}

pub(crate) async fn backlog(pool: &MySqlPool) -> Result<Backlog, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    let count: i64 = row.try_get("n")?;
    Ok(Backlog {
        count: u64::try_from(count).unwrap_or(0),
        oldest: row.try_get("oldest")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn unpublished(pool: &MySqlPool, limit: u32) -> Result<Vec<OutboxRow>, sqlx::Error> {
        unpublished_except(pool, limit, &[]).await
    }
    use crate::db::testdb::{TestDb, rejected_event as event};

    /// The ids of the unpublished rows, oldest first.
    async fn unpublished_ids(pool: &MySqlPool) -> Vec<u64> {
        let rows = unpublished(pool, 10).await.expect("read");
        rows.iter().map(|r| r.id).collect()
    }

    /// Auto-increment ids commit out of order: a row with a lower id that commits later is
    /// still read (there is no "last id seen" cursor), and marked rows are not read again.
    #[tokio::test]
    async fn rows_that_commit_out_of_order_are_not_skipped() {
        let db = TestDb::new().await;
        let mut slow = db.pool.begin().await.expect("tx");
        insert(&mut slow, &event("first-id"), "x.events", None)
            .await
            .expect("insert");
        let mut fast = db.pool.begin().await.expect("tx");
        insert(
            &mut fast,
            &event("second-id"),
            "x.events",
            Some("amq.gen-r"),
        )
        .await
        .expect("insert");
        fast.commit().await.expect("commit");

        let seen = unpublished(&db.pool, 10).await.expect("read");
        assert_eq!(seen.len(), 1, "only the committed row");
        let fence = db.lease().await.fence();
        mark_all_published(&db.pool, &[seen[0].id], fence.name(), fence.epoch())
            .await
            .expect("mark");
        slow.commit().await.expect("commit");

        let seen = unpublished(&db.pool, 10).await.expect("read");
        assert_eq!(seen.len(), 1, "the lower id, committed last, is read");
        assert!(seen[0].payload.contains("first-id"));
        assert_eq!(seen[0].correlation_id.as_deref(), Some("first-id"));
        let backlog = backlog(&db.pool).await.expect("backlog");
        assert_eq!(backlog.count, 1);
        assert!(backlog.oldest.is_some());
    }

    /// Rows published but not yet marked are left out by the server, and the limit still
    /// counts only the rows returned.
    #[tokio::test]
    async fn unpublished_except_leaves_out_the_named_rows() {
        let db = TestDb::new().await;
        let mut tx = db.pool.begin().await.expect("tx");
        for n in 0..6 {
            insert(&mut tx, &event(&format!("except-{n}")), "x.events", None)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        let all = unpublished_ids(&db.pool).await;
        assert_eq!(all.len(), 6);
        let rest: Vec<u64> = unpublished_except(&db.pool, 3, &all[..2])
            .await
            .expect("read")
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(rest, all[2..5].to_vec());
    }

    /// The relay's fenced marking marks the rows while the lease has its epoch, and nothing
    /// once it has another (the new holder's relay publishes them again).
    #[tokio::test]
    async fn a_fenced_marking_of_an_old_epoch_marks_nothing() {
        let db = TestDb::new().await;
        let fence = db.lease().await.fence();
        let mut tx = db.pool.begin().await.expect("tx");
        for n in 0..4 {
            insert(&mut tx, &event(&format!("mark-{n}")), "x.events", None)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        let ids = unpublished_ids(&db.pool).await;
        let (name, epoch) = (fence.name(), fence.epoch());
        let marked = mark_all_published(&db.pool, &ids[..2], name, epoch)
            .await
            .expect("mark");
        assert_eq!(marked, 2);
        sqlx::query("UPDATE execution_lease SET epoch = epoch + 1")
            .execute(&db.pool)
            .await
            .expect("take over");
        let marked = mark_all_published(&db.pool, &ids[2..], name, epoch)
            .await
            .expect("mark");
        assert_eq!(marked, 0, "an old epoch marks nothing");
        let left = unpublished_ids(&db.pool).await;
        assert_eq!(left, ids[2..].to_vec());
    }

    /// A refused try is counted; a row given up leaves the backlog with `refused_at` and
    /// `published_at`; an old epoch records nothing.
    #[tokio::test]
    async fn refusals_are_counted_and_a_row_given_up_leaves_the_backlog() {
        let db = TestDb::new().await;
        let fence = db.lease().await.fence();
        let mut tx = db.pool.begin().await.expect("tx");
        for n in 0..3 {
            insert(&mut tx, &event(&format!("refuse-{n}")), "x.events", None)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        let ids = unpublished_ids(&db.pool).await;
        let (name, epoch) = (fence.name(), fence.epoch());
        let changed = record_refusals(&db.pool, &ids[..2], &[], name, epoch)
            .await
            .expect("count");
        assert_eq!(changed, 2);
        let changed = record_refusals(&db.pool, &ids[..2], &ids[..1], name, epoch)
            .await
            .expect("give up");
        assert_eq!(changed, 2);
        let rows = unpublished(&db.pool, 10).await.expect("read");
        let left: Vec<(u64, u32)> = rows.iter().map(|r| (r.id, r.attempts)).collect();
        assert_eq!(
            left,
            vec![(ids[1], 2), (ids[2], 0)],
            "the row given up is out"
        );
        let refused: Vec<u64> = sqlx::query_scalar(
            "SELECT id FROM outbox WHERE refused_at IS NOT NULL AND published_at IS NOT NULL",
        )
        .fetch_all(&db.pool)
        .await
        .expect("refused");
        assert_eq!(refused, vec![ids[0]]);
        assert_eq!(backlog(&db.pool).await.expect("backlog").count, 2);
        sqlx::query("UPDATE execution_lease SET epoch = epoch + 1")
            .execute(&db.pool)
            .await
            .expect("take over");
        let changed = record_refusals(&db.pool, &ids[1..], &ids[1..], name, epoch)
            .await
            .expect("fenced");
        assert_eq!(changed, 0, "an old epoch records nothing");
    }

    /// Retention deletes published rows older than the cutoff, a batch at a time, and never
    /// an unpublished one however old.
    #[tokio::test]
    async fn retention_deletes_old_published_rows_only_a_batch_at_a_time() {
        let db = TestDb::new().await;
        let mut tx = db.pool.begin().await.expect("tx");
        for id in ["old-1", "old-2", "old-3", "old-unpublished", "recent"] {
            insert(&mut tx, &event(id), "x.events", None)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        sqlx::query(
            "UPDATE outbox SET created_at = NOW(3) - INTERVAL 3 DAY, \
             published_at = IF(payload LIKE '%old-unpublished%', NULL, NOW(3) - INTERVAL 2 DAY) \
             WHERE payload NOT LIKE '%recent%'",
        )
        .execute(&db.pool)
        .await
        .expect("back-date");
        sqlx::query("UPDATE outbox SET published_at = NOW(3) WHERE payload LIKE '%recent%'")
            .execute(&db.pool)
            .await
            .expect("publish the recent one");
        let cutoff = chrono::Utc::now() - chrono::TimeDelta::days(1);
        let mut conn = db.pool.acquire().await.expect("conn");
        assert_eq!(
            delete_published_before(&mut conn, cutoff, 2)
                .await
                .expect("batch"),
            2
        );
        assert_eq!(
            delete_published_before(&mut conn, cutoff, 2)
                .await
                .expect("batch"),
            1
        );
        assert_eq!(
            delete_published_before(&mut conn, cutoff, 2)
                .await
                .expect("batch"),
            0
        );
        let left: Vec<String> = sqlx::query_scalar("SELECT payload FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
        assert_eq!(left.len(), 2);
        assert!(left[0].contains("old-unpublished") && left[1].contains("recent"));
    }
}
