//! Group commit: writes of one kind that arrive while an earlier group of that kind is being
//! written wait for it, then go to the database together, in one statement or transaction.
//!
//! No timer and no task: the first caller to get the turn writes everything that is waiting
//! (up to a maximum) and hands each caller its own result. Alone, a write goes at once, as it
//! did before; under load, the time one group spends in the database is what the next group
//! gathers in. A group the database refuses as a whole is written again one item at a time
//! by its writer (`write` below), so an item's error is its own.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::db::fence::StoreError;

/// The most items one group names (one grouped statement's rows).
pub(crate) const MAX_GROUP: usize = 32;

/// Items of one kind waiting to be written, and whose turn it is to write.
#[derive(Debug)]
pub(in crate::db) struct Group<T, R> {
    waiting: Mutex<Vec<Waiting<T, R>>>,
    turn: tokio::sync::Mutex<()>,
    max: usize,
}

type Waiting<T, R> = (T, oneshot::Sender<Result<R, StoreError>>);

impl<T, R> Group<T, R> {
    /// Groups of at most `max` items.
    pub(in crate::db) fn new(max: usize) -> Self {
        Self {
            waiting: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
            max: max.max(1),
        }
    }

    /// Writes `item` together with whatever else is waiting, by `write`, which returns one
    /// result per item, in order. A caller whose item was in a group whose writer was
    /// cancelled before it answered (an aborted task) gets [`StoreError::Abandoned`]: the
    /// write may or may not have committed, and the caller's retry writes it again (every
    /// grouped write is idempotent).
    pub(in crate::db) async fn submit<F, Fut>(&self, item: T, write: F) -> Result<R, StoreError>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<Result<R, StoreError>>>,
    {
        let (tx, mut rx) = oneshot::channel();
        self.lock().push((item, tx));
        let _turn = self.turn.lock().await;
        loop {
            match rx.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(StoreError::Abandoned),
                // Not written yet: our turn to write what is waiting (ours among it, or, when
                // more than `max` wait, the oldest first).
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<Waiting<T, R>> = {
                let mut waiting = self.lock();
                let n = waiting.len().min(self.max);
                waiting.drain(..n).collect()
            };
            let (items, answers): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
            let results = write(items).await;
            debug_assert_eq!(results.len(), answers.len(), "one result per item");
            for (answer, result) in answers.into_iter().zip(results) {
                // A caller that went away no longer needs its answer.
                let _ = answer.send(result);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting<T, R>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    type Written = Result<u32, StoreError>;

    /// A writer that records each group's size, takes 10 ms, and answers `answer(item)`.
    fn recording(
        sizes: &Arc<Mutex<Vec<usize>>>,
        answer: fn(u32) -> u32,
    ) -> impl Fn(Vec<u32>) -> std::pin::Pin<Box<dyn Future<Output = Vec<Written>> + Send>>
    + Clone
    + Send
    + 'static {
        let sizes = sizes.clone();
        move |items: Vec<u32>| {
            let sizes = sizes.clone();
            Box::pin(async move {
                sizes.lock().expect("sizes").push(items.len());
                tokio::time::sleep(Duration::from_millis(10)).await;
                items.into_iter().map(|i| Ok(answer(i))).collect()
            })
        }
    }

    /// Eight writes that arrive while one is being written go together in the next group,
    /// and each caller gets its own item's result.
    #[tokio::test(start_paused = true)]
    async fn writes_arriving_during_a_write_go_together_and_each_gets_its_own_result() {
        let group = Arc::new(Group::<u32, u32>::new(16));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let write = recording(&sizes, |i| i * 2);
        let first = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(100, write).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let rest: Vec<_> = (0..8)
            .map(|i| {
                let (group, write) = (group.clone(), write.clone());
                tokio::spawn(async move { group.submit(i, write).await })
            })
            .collect();
        assert_eq!(first.await.expect("task").expect("written"), 200);
        for (i, task) in rest.into_iter().enumerate() {
            assert_eq!(task.await.expect("task").expect("written"), i as u32 * 2);
        }
        assert_eq!(*sizes.lock().expect("sizes"), vec![1, 8]);
    }

    /// No group is larger than its maximum; the oldest items go first.
    #[tokio::test(start_paused = true)]
    async fn a_group_never_exceeds_its_maximum() {
        let group = Arc::new(Group::<u32, u32>::new(3));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let write = recording(&sizes, |i| i);
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let (group, write) = (group.clone(), write.clone());
                tokio::spawn(async move { group.submit(i, write).await })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.expect("task").expect("written"), i as u32);
        }
        let sizes = sizes.lock().expect("sizes").clone();
        assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 10);
    }

    /// A writer cancelled in the middle of its group leaves the others an `Abandoned` error
    /// (to try again), not a hang.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_writer_leaves_its_group_abandoned_not_waiting() {
        let group = Arc::new(Group::<u32, u32>::new(16));
        let calls = Arc::new(AtomicUsize::new(0));
        let write = {
            let calls = calls.clone();
            move |items: Vec<u32>| {
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                        // The second group's writer: cancelled while writing.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    items.into_iter().map(Ok).collect()
                }
            }
        };
        let first = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(0, write).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let writer = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(1, write).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let other = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(2, write).await })
        };
        assert_eq!(first.await.expect("task").expect("written"), 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.abort();
        let abandoned = tokio::time::timeout(Duration::from_secs(1), other)
            .await
            .expect("not left waiting")
            .expect("task");
        assert!(
            matches!(abandoned, Err(StoreError::Abandoned)),
            "{abandoned:?}"
        );
    }
}
