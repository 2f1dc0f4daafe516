//! The `execution_lease` row's SQL. The rules (who may take it, when the holder fences itself)
//! are in the lease module (`lease.rs`, above this layer); times here are the server's (`UTC_TIMESTAMP(3)`), so no two
//! daemons' clocks are ever compared.

use sqlx::{MySqlConnection, MySqlPool};

/// The lease's current epoch, read with a shared lock inside the caller's transaction: a
/// takeover (an exclusive update of the row) waits until that transaction ends.
pub(crate) async fn epoch_shared(
    tx: &mut MySqlConnection,
    name: &str,
) -> Result<Option<u64>, sqlx::Error> {
    sqlx::query_scalar("SELECT epoch FROM execution_lease WHERE name = ? LOCK IN SHARE MODE")
        .bind(name)
        .fetch_optional(tx)
        .await
}

/// Takes the lease for `holder` if it has expired (or was released): the new epoch, or `None`
/// while another holder's lease runs.
///
/// One autocommitted UPDATE, one round trip: the new epoch comes back through
/// `LAST_INSERT_ID(expr)` in the statement's own answer. A standby on a slow link (hundreds of
/// ms per round trip) thus takes the lease within its query bound, and its first renewal is
/// due soon after it sent the take. Only when no row exists yet is it inserted (expired) and
/// the take tried once more.
pub(crate) async fn take_if_expired(
    pool: &MySqlPool,
    name: &str,
    holder: &str,
    ttl_micros: u64,
) -> Result<Option<u64>, sqlx::Error> {
    if let Some(epoch) = take(pool, name, holder, ttl_micros).await? {
        return Ok(Some(epoch));
    }
    let created = sqlx::query(
        "INSERT IGNORE INTO execution_lease (name, holder, epoch, expires_at) \
         VALUES (?, '', 0, '1970-01-01 00:00:01')",
    )
    .bind(name)
    .execute(pool)
    .await?;
    if created.rows_affected() == 0 {
        return Ok(None);
    }
    take(pool, name, holder, ttl_micros).await
}

async fn take(
    pool: &MySqlPool,
    name: &str,
    holder: &str,
    ttl_micros: u64,
) -> Result<Option<u64>, sqlx::Error> {
    let taken = sqlx::query(
        "UPDATE execution_lease SET holder = ?, epoch = LAST_INSERT_ID(epoch + 1), \
         expires_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND, \
         acquired_at = UTC_TIMESTAMP(3), renewed_at = UTC_TIMESTAMP(3) \
         WHERE name = ? AND expires_at < UTC_TIMESTAMP(3)",
    )
    .bind(holder)
    .bind(ttl_micros)
    .bind(name)
    .execute(pool)
    .await?;
    Ok((taken.rows_affected() == 1).then(|| taken.last_insert_id()))
}

/// Pushes the expiry `ttl_micros` ahead if `holder` still holds `epoch`; `false` otherwise.
pub(crate) async fn renew(
    pool: &MySqlPool,
    name: &str,
    holder: &str,
    epoch: u64,
    ttl_micros: u64,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE execution_lease SET expires_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND, \
         renewed_at = UTC_TIMESTAMP(3) WHERE name = ? AND holder = ? AND epoch = ?",
    )
    .bind(ttl_micros)
    .bind(name)
    .bind(holder)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Expires the lease now if `holder` still holds `epoch` (a clean shutdown).
pub(crate) async fn release(
    pool: &MySqlPool,
    name: &str,
    holder: &str,
    epoch: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE execution_lease SET expires_at = '1970-01-01 00:00:01' \
         WHERE name = ? AND holder = ? AND epoch = ?",
    )
    .bind(name)
    .bind(holder)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(())
}

/// Makes the lease look expired, as time would (tests).
#[cfg(test)]
pub(crate) async fn expire(pool: &MySqlPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE execution_lease SET expires_at = UTC_TIMESTAMP(3) - INTERVAL 1 SECOND WHERE name = ?",
    )
    .bind(name)
    .execute(pool)
    .await?;
    Ok(())
}
