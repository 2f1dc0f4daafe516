//! The execution lease: at most one daemon executes operations (CONTRACT §3 rule 5).
//!
//! The lease is a MySQL named lock (`GET_LOCK`) held by a dedicated connection. MySQL releases
//! it when that connection ends, so a killed daemon frees it at once and a standby blocked in
//! `GET_LOCK` takes over. The holder checks every second that it still owns the lock; when the
//! connection breaks (a database outage) it must stop executing at once: another instance may
//! already hold the lock.

use std::time::Duration;

use sqlx::{Connection, MySqlConnection, Row};
use tokio_util::sync::CancellationToken;

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    conn: MySqlConnection,
    name: String,
}

/// How long one `GET_LOCK` waits inside MySQL before we look at shutdown again.
const WAIT_STEP_S: i32 = 1;
/// Connecting for the lease gives up after this and tries again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A lease check slower than this counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The lock name for one database and prefix (MySQL lock names are server-wide and at most
/// 64 characters).
pub fn lock_name(database: &str, prefix: &str) -> String {
    let name = format!("volume-daemon:{database}:{prefix}");
    if name.len() <= 64 {
        return name;
    }
    // Long names: keep a readable start and a stable hash of the whole.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{}:{hash:016x}", &name[..64 - 17])
}

impl Lease {
    /// Waits until the lease is ours; `None` when shutdown came first. Database errors are
    /// retried every second (a standby outlives database outages).
    pub async fn acquire(url: &str, prefix: &str, shutdown: &CancellationToken) -> Option<Lease> {
        let mut logged = false;
        loop {
            let attempt = async {
                let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, MySqlConnection::connect(url))
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                let db: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
                    .fetch_one(&mut conn)
                    .await?;
                let name = lock_name(db.as_deref().unwrap_or(""), prefix);
                loop {
                    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                        .bind(&name)
                        .bind(WAIT_STEP_S)
                        .fetch_one(&mut conn)
                        .await?;
                    if got == Some(1) {
                        return Ok::<_, sqlx::Error>(Lease { conn, name });
                    }
                    if !logged {
                        tracing::info!(lock = %name, "another instance holds the execution lease; standing by");
                        logged = true;
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return None,
                got = attempt => match got {
                    Ok(lease) => {
                        tracing::info!(lock = %lease.name, "execution lease acquired; this instance is active");
                        return Some(lease);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the database for the execution lease; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return None,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
            }
        }
    }

    /// Whether this connection still owns the lock.
    pub async fn held(&mut self) -> bool {
        let check = sqlx::query("SELECT IS_USED_LOCK(?) = CONNECTION_ID() AS mine")
            .bind(&self.name)
            .fetch_one(&mut self.conn);
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(row)) => row.try_get::<Option<i64>, _>("mine").ok().flatten() == Some(1),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "execution lease check failed");
                false
            }
            Err(_) => {
                tracing::warn!("execution lease check timed out");
                false
            }
        }
    }

    /// Gives the lease up (a clean shutdown), so a standby takes over without waiting.
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&self.name)
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_fit_mysqls_limit_and_stay_distinct() {
        assert_eq!(
            lock_name("volume_daemon", "volume"),
            "volume-daemon:volume_daemon:volume"
        );
        let a = lock_name(&"d".repeat(60), "p1");
        let b = lock_name(&"d".repeat(60), "p2");
        assert!(a.len() <= 64 && b.len() <= 64);
        assert_ne!(a, b);
    }
}
