//! Runs accepted operations: at most `MAX_CONCURRENT_OPERATIONS` at a time, and those on the
//! same volume one after another in arrival order (CONTRACT §3 rule 4). Attach and detach on
//! the same VM also take that VM's lock inside the operation ([`crate::context::Context::lock_vm`]).
//!
//! The intake (and recovery) send operations through a bounded channel. The executor holds at
//! most twice the concurrency in hand (running or waiting behind their volume); beyond that it
//! stops receiving, the channel fills, the intake stops acknowledging, and the broker's
//! prefetch limit stops deliveries: back-pressure all the way to the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use schema::{CommandId, VolumeId};

use crate::context::Context;
use crate::operation::{self, Operation};

/// When to stop.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Stop taking operations, then give running ones `grace` to reach a safe point.
    pub drain: CancellationToken,
    /// Abort everything now (the lease was lost: another instance may be executing).
    pub abort: CancellationToken,
    pub grace: Duration,
}

struct Lanes {
    /// Operations per volume, the running one at the front.
    waiting: HashMap<VolumeId, VecDeque<Operation>>,
    /// Which operation and volume each running task belongs to.
    running: HashMap<Id, (CommandId, Option<VolumeId>)>,
    /// Every operation in hand (running or waiting): a second copy of one is ignored.
    held: HashSet<CommandId>,
    tasks: JoinSet<()>,
    permits: Arc<Semaphore>,
    ctx: Arc<Context>,
}

impl Lanes {
    fn spawn(&mut self, op: Operation) {
        let volume = op.command.action.volume_id();
        let id = op.id().clone();
        let (ctx, permits) = (self.ctx.clone(), self.permits.clone());
        let handle = self.tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            operation::execute(ctx, op).await;
        });
        self.running.insert(handle.id(), (id, volume));
    }

    /// Queues `op` behind earlier operations on its volume, or starts it. An operation already
    /// in hand (the intake hands over in-flight duplicates, see [`crate::db::store::Accepted`]) is
    /// ignored.
    fn admit(&mut self, op: Operation) {
        if !self.held.insert(op.id().clone()) {
            tracing::debug!(operation_id = %op.id(), "already in hand");
            return;
        }
        match op.command.action.volume_id() {
            None => self.spawn(op),
            Some(v) => {
                let lane = self.waiting.entry(v).or_default();
                lane.push_back(op.clone());
                if lane.len() == 1 {
                    self.spawn(op);
                }
            }
        }
    }

    /// A task ended: start the next operation on its volume.
    fn finished(&mut self, id: Id, advance: bool) {
        let Some((op, volume)) = self.running.remove(&id) else {
            return;
        };
        self.held.remove(&op);
        let Some(volume) = volume else {
            return;
        };
        let Some(lane) = self.waiting.get_mut(&volume) else {
            return;
        };
        lane.pop_front();
        match lane.front().cloned() {
            Some(next) if advance => self.spawn(next),
            Some(_) => {}
            None => {
                self.waiting.remove(&volume);
            }
        }
    }

    /// Operations received and not yet ended (running or waiting behind their volume).
    fn in_hand(&self) -> usize {
        let waiting: usize = self
            .waiting
            .values()
            .map(|l| l.len().saturating_sub(1))
            .sum();
        self.running.len() + waiting
    }
}

pub async fn run(
    ctx: Arc<Context>,
    mut ops: mpsc::Receiver<Operation>,
    max_concurrent: usize,
    stop: Stop,
) {
    let mut lanes = Lanes {
        waiting: HashMap::new(),
        running: HashMap::new(),
        held: HashSet::new(),
        tasks: JoinSet::new(),
        permits: Arc::new(Semaphore::new(max_concurrent)),
        ctx,
    };
    let limit = max_concurrent * 2;
    // Past `limit`, operations are still taken while the cloud has idle capacity (fewer tasks
    // than permits), up to `hard_cap`: one volume with a long queue must not stall the intake
    // for every other volume (head-of-line blocking), and memory stays bounded.
    let hard_cap = max_concurrent * 16;
    loop {
        let room = lanes.in_hand() < limit
            || (lanes.running.len() < max_concurrent && lanes.in_hand() < hard_cap);
        tokio::select! {
            biased;
            () = stop.drain.cancelled() => break,
            () = stop.abort.cancelled() => break,
            Some(done) = lanes.tasks.join_next_with_id(), if !lanes.tasks.is_empty() => {
                let id = report(done);
                lanes.finished(id, true);
            }
            op = ops.recv(), if room => match op {
                Some(op) => lanes.admit(op),
                None => break,
            },
        }
    }
    if !stop.abort.is_cancelled() && !lanes.tasks.is_empty() {
        tracing::info!(
            in_flight = lanes.tasks.len(),
            grace_s = stop.grace.as_secs(),
            "waiting for in-flight operations"
        );
        let drained = tokio::time::timeout(stop.grace, async {
            tokio::select! {
                () = stop.abort.cancelled() => {}
                () = async {
                    while let Some(done) = lanes.tasks.join_next_with_id().await {
                        let id = report(done);
                        lanes.finished(id, false);
                    }
                } => {}
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                aborted = lanes.tasks.len(),
                "grace period over; aborting operations (they resume at the next start)"
            );
        }
    } else if !lanes.tasks.is_empty() {
        tracing::warn!(
            aborted = lanes.tasks.len(),
            "aborting operations now; they resume when this instance is active again"
        );
    }
    lanes.tasks.abort_all();
    while lanes.tasks.join_next().await.is_some() {}
}

fn report(done: Result<(Id, ()), tokio::task::JoinError>) -> Id {
    match done {
        Ok((id, ())) => id,
        Err(e) => {
            if e.is_panic() {
                tracing::error!(error = %e, "an operation task panicked");
            }
            e.id()
        }
    }
}
