//! The tasks of an active period (relay, mapping sync, executor, housekeeping, intake) are
//! supervised: each is meant to run until the period ends, so one that returns or panics
//! before that ends the period instead of leaving it running without, say, its relay while
//! `/ready` still reports the relay connected. The period then fences itself as on a lost
//! lease, releases the lease (the standby, or this instance again, takes it at once) and starts
//! every task afresh.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One active period's watch over its tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Watch {
    /// Cancelled by the period when it ends on purpose: tasks that end after it do so as asked.
    ending: CancellationToken,
    /// Cancelled by the first task that ended before `ending`.
    died: CancellationToken,
}

impl Watch {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` under this watch. A panic is caught and logged; an end before
    /// [`Self::end`] (panic or return) is logged as an error and resolves [`Self::died`].
    pub(crate) fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let watch = self.clone();
        tokio::spawn(async move {
            let ended = AssertUnwindSafe(task).catch_unwind().await;
            let early = !watch.ending.is_cancelled();
            match (ended, early) {
                (Err(panic), _) => tracing::error!(
                    task = name,
                    panic = panic_text(panic.as_ref()),
                    "task panicked"
                ),
                (Ok(()), true) => tracing::error!(
                    task = name,
                    "task ended while the active period was running"
                ),
                (Ok(()), false) => tracing::debug!(task = name, "task stopped"),
            }
            if early {
                tracing::error!(
                    task = name,
                    "ending the active period: it cannot run without this task"
                );
                watch.died.cancel();
            }
        })
    }

    /// The period ends on purpose from now on (shutdown, lease lost, a task died).
    pub(crate) fn end(&self) {
        self.ending.cancel();
    }

    /// Resolves once a task ended before [`Self::end`].
    pub(crate) async fn died(&self) {
        self.died.cancelled().await;
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SOON: Duration = Duration::from_secs(5);

    /// A task that panics while the period runs ends the period; its handle still joins.
    #[tokio::test]
    async fn a_panicking_task_ends_the_period() {
        let watch = Watch::new();
        let steady = watch.spawn("steady", std::future::pending());
        let broken = watch.spawn("broken", async { panic!("bug") });
        tokio::time::timeout(SOON, watch.died())
            .await
            .expect("the period is told");
        broken.await.expect("the panic was caught");
        steady.abort();
    }

    /// A task that returns early ends the period as well.
    #[tokio::test]
    async fn a_task_that_returns_early_ends_the_period() {
        let watch = Watch::new();
        watch.spawn("quitter", async {}).await.expect("joins");
        tokio::time::timeout(SOON, watch.died())
            .await
            .expect("the period is told");
    }

    /// Tasks that end once the period is ending are not a failure.
    #[tokio::test]
    async fn tasks_ending_after_the_period_ends_are_no_failure() {
        let watch = Watch::new();
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            watch.spawn("polite", async move { stop.cancelled().await })
        };
        watch.end();
        stop.cancel();
        task.await.expect("joins");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watch.died())
                .await
                .is_err(),
            "an asked-for end is not a death"
        );
    }
}
