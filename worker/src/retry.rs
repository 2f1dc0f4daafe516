//! The daemon's database retry policies, the only place that retries a database call:
//!
//! - [`persistent`]: a write (or read) that must happen before its caller can go on (accept a
//!   command, record a job, end an operation, list what to resume). Tried until it succeeds,
//!   [`DB_RETRY`] apart, while the database is unreachable; given up when the fence refuses it
//!   (another instance holds the lease), when shutdown comes, or after
//!   [`PERMANENT_ATTEMPTS`] permanent errors in a row (a schema mismatch, a value a column
//!   refuses: retrying cannot help). The caller's row stays as it was and resumes later.
//! - [`bounded`]: a repair or an event that can be given up (a device change, a rejection
//!   event, the host files' repair): a few tries with a short exponential backoff, and only
//!   while the error is transient.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

use crate::db::fence::{Fenced, StoreError};
use crate::db::is_permanent;

/// How long [`persistent`] waits between attempts.
pub(crate) const DB_RETRY: Duration = Duration::from_millis(500);

/// A permanent database error is tried this many times in a row by [`persistent`].
pub(crate) const PERMANENT_ATTEMPTS: u32 = 3;

/// Why [`persistent`] gave up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GaveUp {
    #[error("stopped first")]
    Stopped,
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("permanent database error: {0}")]
    Permanent(sqlx::Error),
}

/// Runs `call` until it succeeds (see the module doc). Each attempt is bounded by `limit`
/// when given (a half-open connection counts as unreachable) and raced with `halt`.
pub(crate) async fn persistent<T, F, Fut>(
    what: &str,
    halt: &CancellationToken,
    limit: Option<Duration>,
    call: F,
) -> Result<T, GaveUp>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut permanent = 0;
    loop {
        let attempt = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, call()).await.ok(),
                None => Some(call().await),
            }
        };
        let result = tokio::select! {
            () = halt.cancelled() => return Err(GaveUp::Stopped),
            r = attempt => r,
        };
        match result {
            Some(Ok(done)) => return Ok(done),
            Some(Err(StoreError::Fenced(f))) => {
                tracing::error!(error = %f, "write refused: cannot {what}");
                return Err(f.into());
            }
            Some(Err(StoreError::Db(e))) if is_permanent(&e) => {
                permanent += 1;
                if permanent >= PERMANENT_ATTEMPTS {
                    tracing::error!(error = %e, attempts = permanent, "cannot {what}: permanent database error; giving up until the next start");
                    return Err(GaveUp::Permanent(e));
                }
                tracing::warn!(error = %e, "cannot {what}; retrying");
            }
            Some(Err(e @ (StoreError::Db(_) | StoreError::Abandoned))) => {
                permanent = 0;
                tracing::warn!(error = %e, "cannot {what}; retrying");
            }
            None => tracing::warn!(?limit, "cannot {what}: timed out; retrying"),
        }
        tokio::select! {
            () = halt.cancelled() => return Err(GaveUp::Stopped),
            () = tokio::time::sleep(DB_RETRY) => {}
        }
    }
}

/// Runs `call` up to `attempts` times in all while `transient` says its error may pass,
/// 100 ms, 200 ms, 400 ms… apart. The last error is returned.
pub(crate) async fn bounded<T, E, F, Fut>(
    what: &str,
    attempts: usize,
    transient: impl Fn(&E) -> bool,
    call: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_times(attempts.saturating_sub(1));
    call.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(transient)
        .notify(|e: &E, after: Duration| {
            tracing::warn!(error = %e, ?after, "cannot {what} yet; retrying");
        })
        .await
}

/// Whether a store error may pass if the call is tried again: a database error that is not
/// permanent (a dropped connection, a killed session, a lock wait). Fenced: never.
pub(crate) fn transient(e: &StoreError) -> bool {
    match e {
        StoreError::Db(e) => transient_db(e),
        StoreError::Abandoned => true,
        StoreError::Fenced(_) => false,
    }
}

/// Whether a database error may pass if the call is tried again (see [`transient`]).
pub(crate) fn transient_db(e: &sqlx::Error) -> bool {
    !is_permanent(e)
}
