//! What the active instance does besides operations: the retention sweep (docs/configuration.md:
//! published outbox rows older than `OUTBOX_RETENTION_H`, ended operations older than
//! `OPERATIONS_RETENTION_D`, at start and every `RETENTION_INTERVAL_S`) and, when
//! `RECONCILE_INTERVAL_S` is set, a periodic reconcile (logs and metrics only: only a
//! `reconcile` command publishes an event).
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short fenced transaction with a
//! pause between, so no lock is held long and commands keep flowing meanwhile.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// Rows per delete.
pub(crate) const BATCH: u32 = 500;
/// The pause between two batches.
const PAUSE: Duration = Duration::from_millis(20);

/// How long rows are kept, and how often the sweep runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    pub outbox: Duration,
    pub operations: Duration,
    pub period: Duration,
}

/// Sweeps at once, then every period, until `stop`.
pub(crate) async fn retention(ctx: Arc<Context>, policy: Retention, stop: CancellationToken) {
    loop {
        let swept = tokio::select! {
            () = stop.cancelled() => return,
            swept = sweep(&ctx, policy) => swept,
        };
        if swept != (0, 0) {
            tracing::info!(
                outbox = swept.0,
                operations = swept.1,
                "retention: old rows deleted"
            );
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(policy.period) => {}
        }
    }
}

/// One sweep of both tables: (outbox rows, operations) deleted.
async fn sweep(ctx: &Context, policy: Retention) -> (u64, u64) {
    let now = Utc::now();
    let age = |d: Duration| chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
    let outbox_cutoff = now - age(policy.outbox);
    let operations_cutoff = now - age(policy.operations);
    let outbox = batches(ctx, "outbox", || {
        ctx.store.delete_published_outbox(outbox_cutoff, BATCH)
    })
    .await;
    let operations = batches(ctx, "volume_operations", || {
        ctx.store.delete_ended_operations(operations_cutoff, BATCH)
    })
    .await;
    (outbox, operations)
}

/// Runs `delete` until a batch comes back short; an error ends this sweep (the next one
/// tries again).
async fn batches<F, Fut>(ctx: &Context, table: &str, delete: F) -> u64
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<u64, crate::db::store::StoreError>>,
{
    let mut total = 0;
    loop {
        match delete().await {
            Ok(n) => {
                tracing::debug!(table, rows = n, "retention: batch deleted");
                total += n;
                ctx.metrics.retention_deleted(table, n);
                if n < u64::from(BATCH) {
                    return total;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, table, "retention: cannot delete old rows; trying at the next sweep");
                return total;
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// A reconcile of every VM every `period`, until `stop`.
pub(crate) async fn periodic_reconcile(
    ctx: Arc<Context>,
    period: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let run = async {
            let cs = ctx.session().await?;
            crate::operation::reconcile_all(&ctx, &cs).await
        };
        match tokio::select! {
            () = stop.cancelled() => return,
            r = run => r,
        } {
            Ok(changes) if changes.is_empty() => {
                tracing::debug!("periodic reconcile: nothing drifted")
            }
            Ok(changes) => tracing::warn!(
                changes = ?changes,
                "periodic reconcile repaired drift"
            ),
            Err(e) => tracing::warn!(error = ?e, "periodic reconcile did not complete"),
        }
    }
}
