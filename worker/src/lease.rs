//! The execution lease: at most one daemon executes operations (docs/wire.md (processing rule 5)), and one
//! that lost the lease can no longer change anything (fencing).
//!
//! The lease is a row of `execution_lease` per AMQP prefix: `(holder, epoch, expires_at)`.
//! - A standby takes the row only once `expires_at` has passed, in the **server's** clock, and
//!   increments `epoch`. The holder renews it every [`RENEW_EVERY`], pushing `expires_at`
//!   [`TTL`] ahead.
//! - The holder **fences itself** (aborts its operations, stops consuming and relaying) when it
//!   has had no successful renewal for [`FENCE_AFTER`], measured from when it *sent* the last
//!   renewal that succeeded. Since that renewal was processed after it was sent, the server's
//!   `expires_at` is at least `TTL` later in real time: the old holder is fenced at least
//!   `TTL - FENCE_AFTER` before any other instance can take over. That gap covers requests
//!   already on the wire to CloudStack when the fence came.
//! - Every state write of an active period carries its epoch ([`Fence::check`](crate::db::fence::Fence::check)) inside the
//!   write's own transaction, with a shared lock on the lease row: a takeover waits for writes
//!   in progress, and no write of an older epoch commits after it.
//!
//! Why a table and not `GET_LOCK`: a named lock belongs to one connection. It is freed when a
//! DBA or a proxy kills that session while its owner goes on executing (two actives), and kept
//! when the owner vanishes without closing the connection (a silent partition: no takeover until
//! the server's `wait_timeout`). It is also node-local on Galera and lost on a Group Replication
//! primary switch. A row with an expiry in the server's clock has none of these problems, costs
//! one small UPDATE a second, and the same row gives the fencing epoch.

use std::time::Duration;

use sqlx::MySqlPool;

use crate::db;
use crate::db::fence::Fence;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a renewal keeps the lease, in the server's clock.
pub(crate) const TTL: Duration = Duration::from_secs(5);
/// How often the holder renews (and a standby tries to take an expired lease).
pub(crate) const RENEW_EVERY: Duration = Duration::from_secs(1);
/// The holder fences itself after this long without a successful renewal. Above a 2 s stall
/// of the database (not a loss), below [`TTL`] by a margin for requests in flight.
pub(crate) const FENCE_AFTER: Duration = Duration::from_secs(3);
/// One lease query slower than this counts as failed.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum LeaseError {
    #[error("execution lease query on the database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("execution lease query timed out after {QUERY_TIMEOUT:?}")]
    Timeout,
}

/// A held lease.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: MySqlPool,
    holder: String,
    fence: Fence,
    /// When the last successful renewal (or the acquisition) was sent.
    renewed: Instant,
    /// When the last renewal, successful or not, was sent.
    attempted: Instant,
}

/// The least time between two renewal attempts, so failing ones do not spin.
const RETRY_GAP: Duration = Duration::from_millis(250);

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Still ours.
    Held,
    /// The database did not answer in time; still ours until the fence deadline.
    Unconfirmed,
    /// Another instance holds it, or we passed the fence deadline: stop now.
    Lost,
}

/// The lease row's name for one prefix.
pub(crate) fn lease_name(prefix: &str) -> String {
    format!("volume-daemon:{prefix}")
}

/// Runs one lease query with a timeout.
async fn bounded<T>(q: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, LeaseError> {
    tokio::time::timeout(QUERY_TIMEOUT, q)
        .await
        .map_err(|_| LeaseError::Timeout)?
        .map_err(LeaseError::from)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Lease {
    /// Waits until the lease is ours; `None` when shutdown came first. Database errors are
    /// retried (a standby outlives database outages). `holder` names this process in the row.
    pub(crate) async fn acquire(
        pool: &MySqlPool,
        prefix: &str,
        holder: &str,
        shutdown: &CancellationToken,
    ) -> Option<Lease> {
        let name = lease_name(prefix);
        let mut logged_standby = false;
        let mut logged_error = false;
        loop {
            let sent = Instant::now();
            match Self::try_take(pool, &name, holder).await {
                Ok(Some(epoch)) => {
                    tracing::info!(lease = %name, epoch, "execution lease acquired; this instance is active");
                    return Some(Lease {
                        pool: pool.clone(),
                        holder: holder.to_owned(),
                        fence: Fence::new(name, epoch),
                        renewed: sent,
                        attempted: sent,
                    });
                }
                Ok(None) => {
                    if !logged_standby {
                        tracing::info!(lease = %name, "another instance holds the execution lease; standing by");
                        logged_standby = true;
                    }
                    logged_error = false;
                }
                Err(e) => {
                    if !logged_error {
                        tracing::warn!(error = %e, "cannot reach the database for the execution lease; retrying");
                        logged_error = true;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(RENEW_EVERY) => {}
            }
        }
    }

    /// Takes the lease if it expired (or was released): the new epoch, or `None`.
    async fn try_take(
        pool: &MySqlPool,
        name: &str,
        holder: &str,
    ) -> Result<Option<u64>, LeaseError> {
        bounded(db::lease::take_if_expired(pool, name, holder, micros(TTL))).await
    }

    /// The fencing token of this holding.
    pub(crate) fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// When this holder must have stopped if no renewal succeeds before.
    pub(crate) fn fence_deadline(&self) -> Instant {
        self.renewed + FENCE_AFTER
    }

    /// When the next renewal is due: [`RENEW_EVERY`] after the last successful one was *sent*
    /// (not after its answer came: on a slow link the answers come late, and the fence
    /// deadline counts from the sending too), and at least [`RETRY_GAP`] after the last attempt.
    /// Right after the acquisition this may be now.
    pub(crate) fn next_renewal(&self) -> Instant {
        (self.renewed + RENEW_EVERY).max(self.attempted + RETRY_GAP)
    }

    /// Pushes the expiry ahead. Call at [`Self::next_renewal`].
    pub(crate) async fn renew(&mut self) -> Renewal {
        let sent = Instant::now();
        self.attempted = sent;
        let renewed = bounded(db::lease::renew(
            &self.pool,
            self.fence.name(),
            &self.holder,
            self.fence.epoch(),
            micros(TTL),
        ))
        .await;
        match renewed {
            Ok(true) => {
                self.renewed = sent;
                Renewal::Held
            }
            Ok(false) => {
                tracing::error!(
                    epoch = self.fence.epoch(),
                    "the execution lease was taken over by another instance"
                );
                Renewal::Lost
            }
            Err(e) if Instant::now() >= self.fence_deadline() => {
                tracing::error!(error = %e, after = ?FENCE_AFTER, "no lease renewal succeeded in time; fencing");
                Renewal::Lost
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the execution lease failed; retrying");
                Renewal::Unconfirmed
            }
        }
    }

    /// Gives the lease up (a clean shutdown), so a standby takes over without waiting.
    pub(crate) async fn release(self) {
        let released = bounded(db::lease::release(
            &self.pool,
            self.fence.name(),
            &self.holder,
            self.fence.epoch(),
        ))
        .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the execution lease; it expires by itself");
        }
    }
}

/// How the holder names itself in the lease row: host, process and a random part, so two
/// processes never share a name.
pub(crate) fn holder_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &tag[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fence::{Fenced, StoreError};
    use crate::db::testdb::TestDb;

    #[test]
    fn the_fence_comes_well_before_the_expiry() {
        assert!(FENCE_AFTER + Duration::from_secs(2) <= TTL);
        assert!(
            FENCE_AFTER > Duration::from_secs(2),
            "a 2 s stall is not a loss"
        );
    }

    #[tokio::test]
    async fn a_second_instance_waits_for_the_expiry_and_gets_a_higher_epoch() {
        let db = TestDb::new().await;
        let stop = CancellationToken::new();
        let first = Lease::acquire(&db.pool, "p", "a", &stop)
            .await
            .expect("first");
        assert_eq!(first.fence().epoch(), 1);
        // While the first holds it, the second cannot take it.
        assert_eq!(
            Lease::try_take(&db.pool, &lease_name("p"), "b")
                .await
                .expect("try"),
            None
        );
        // Another prefix is another lease.
        let other = Lease::try_take(&db.pool, &lease_name("q"), "b")
            .await
            .expect("try");
        assert_eq!(other, Some(1));

        // Expire it by hand (as time would): the second takes it with the next epoch.
        db::lease::expire(&db.pool, &lease_name("p"))
            .await
            .expect("expire");
        let mut first = first;
        let second = Lease::acquire(&db.pool, "p", "b", &stop)
            .await
            .expect("second");
        assert_eq!(second.fence().epoch(), 2);
        assert_eq!(
            first.renew().await,
            Renewal::Lost,
            "the old holder learns it at once"
        );
    }

    #[tokio::test]
    async fn a_write_of_an_old_epoch_is_refused_inside_its_transaction() {
        let db = TestDb::new().await;
        let stop = CancellationToken::new();
        let lease = Lease::acquire(&db.pool, "p", "a", &stop)
            .await
            .expect("lease");
        let fence = lease.fence();
        let mut tx = db.pool.begin().await.expect("tx");
        fence.check(&mut tx).await.expect("our epoch");
        tx.rollback().await.expect("rollback");

        lease.release().await;
        let next = Lease::acquire(&db.pool, "p", "b", &stop)
            .await
            .expect("taken over");
        assert_eq!(next.fence().epoch(), 2, "a released lease is taken at once");
        let mut tx = db.pool.begin().await.expect("tx");
        let refused = fence.check(&mut tx).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::Fenced(Fenced {
                    ours: 1,
                    current: Some(2)
                }))
            ),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn renewing_keeps_the_lease_and_moves_the_fence_deadline() {
        let db = TestDb::new().await;
        let stop = CancellationToken::new();
        let mut lease = Lease::acquire(&db.pool, "p", "a", &stop)
            .await
            .expect("lease");
        let before = lease.fence_deadline();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lease.renew().await, Renewal::Held);
        assert!(lease.fence_deadline() > before);
        assert_eq!(
            Lease::try_take(&db.pool, &lease_name("p"), "b")
                .await
                .expect("try"),
            None
        );
    }
}
