//! Runs accepted operations, at most `MAX_CONCURRENT_OPERATIONS` at a time.
//!
//! The intake (and start-up recovery) send operations through a bounded channel; when every
//! permit is taken the channel fills, the intake stops acknowledging, and the broker's prefetch
//! limit stops deliveries: back-pressure all the way to the queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::context::Context;
use crate::operation::{self, Operation};

/// Receives operations until the channel closes or shutdown fires, then gives in-flight
/// operations `grace` to reach a safe point before aborting them (they resume at the next
/// start: their rows are still pending or executing).
pub async fn run(
    ctx: Arc<Context>,
    mut ops: mpsc::Receiver<Operation>,
    max_concurrent: usize,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_concurrent));
    let mut tasks = JoinSet::new();
    loop {
        while let Some(done) = tasks.try_join_next() {
            report(done);
        }
        let op = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            op = ops.recv() => match op {
                Some(op) => op,
                None => break,
            },
        };
        let permit = tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            operation::execute(ctx, op).await;
            drop(permit);
        });
    }
    while let Some(done) = tasks.try_join_next() {
        report(done);
    }
    if !tasks.is_empty() {
        tracing::info!(
            in_flight = tasks.len(),
            grace_s = grace.as_secs(),
            "waiting for in-flight operations"
        );
    }
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            report(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            aborted = tasks.len(),
            "grace period over; aborting operations (they resume at the next start)"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "an operation task panicked");
    }
}
