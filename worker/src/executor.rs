//! Runs accepted operations: at most `MAX_CONCURRENT_OPERATIONS` at a time, and those on the
//! same volume one after another in arrival order (docs/wire.md (processing rule 4)). Attach and detach on
//! the same VM also take that VM's lock inside the operation ([`crate::context::Context::lock_vm`]).
//!
//! The next in line are prepared while they wait for a slot ([`Runner::prepare`]: the daemon
//! reads an attach's volume then, so that its turn starts with the attach itself); at most
//! `MAX_CONCURRENT_OPERATIONS` of them at a time, in arrival order, and nothing they do changes
//! anything.
//!
//! The intake (and recovery) send operations through a bounded channel. The executor holds at
//! most twice the concurrency in hand (running or waiting behind their volume); beyond that it
//! stops receiving, the channel fills, the intake stops acknowledging, and the broker's
//! prefetch limit stops deliveries: back-pressure all the way to the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::stop::Stop;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{Id, JoinSet};

use schema::{CommandId, VolumeId};

use crate::model::Operation;

/// What runs one operation to its end (in the daemon, `app::Operations`). A closure is a
/// runner that prepares nothing.
pub(crate) trait Runner: Clone + Send + 'static {
    /// What an operation carries from its preparation into its run.
    type Prepared: Send + 'static;

    /// Done while the operation waits for a slot: only what changes nothing (it may wait long
    /// after, or never run in this period).
    fn prepare(&self, op: Operation) -> impl Future<Output = Self::Prepared> + Send + 'static;

    /// The operation, once it holds `slot`; it may give the slot up before it ends (once it
    /// is done with CloudStack), and does at the latest when it ends.
    fn run(
        &self,
        prepared: Self::Prepared,
        slot: Slot,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// One of the `MAX_CONCURRENT_OPERATIONS` slots, held by an operation acting at CloudStack;
/// dropping it lets the next in line start.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl<F, Fut> Runner for F
where
    F: Fn(Operation) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Prepared = Operation;

    fn prepare(&self, op: Operation) -> impl Future<Output = Operation> + Send + 'static {
        std::future::ready(op)
    }

    fn run(&self, op: Operation, slot: Slot) -> impl Future<Output = ()> + Send + 'static {
        let work = self(op);
        async move {
            work.await;
            drop(slot);
        }
    }
}

/// What an operation waits behind: earlier operations on its volume, or, for a create, earlier
/// creates of the same name. A create that lost its answer looks for its volume by name
/// (`mutate::find_created`); with one create of a name at CloudStack at a time, the volume it
/// finds cannot be another create's that has not been recorded yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Volume(VolumeId),
    CreateNamed(String),
}

fn lane(op: &Operation) -> Option<Lane> {
    match &op.command.action {
        schema::command::Action::Create(c) => Some(Lane::CreateNamed(c.name.clone())),
        action => action.volume_id().map(Lane::Volume),
    }
}

struct Lanes<R> {
    /// Operations per lane, the running one at the front.
    waiting: HashMap<Lane, VecDeque<Operation>>,
    /// Which operation and lane each running task belongs to.
    running: HashMap<Id, (CommandId, Option<Lane>)>,
    /// Every operation in hand (running or waiting): a second copy of one is ignored.
    held: HashSet<CommandId>,
    tasks: JoinSet<()>,
    /// The slots: operations running at once.
    permits: Arc<Semaphore>,
    /// Operations being prepared or prepared and waiting for a slot.
    next_in_line: Arc<Semaphore>,
    runner: R,
}

impl<R: Runner> Lanes<R> {
    fn spawn(&mut self, op: Operation) {
        let lane = lane(&op);
        let id = op.id().clone();
        let (runner, permits) = (self.runner.clone(), self.permits.clone());
        let next_in_line = self.next_in_line.clone();
        let handle = self.tasks.spawn(async move {
            let Ok(in_line) = next_in_line.acquire_owned().await else {
                return;
            };
            // In line for a slot while it prepares, so slots go in arrival order however long
            // each preparation takes (a slot that comes first waits for the preparation).
            let (prepared, permit) = tokio::join!(runner.prepare(op), permits.acquire_owned());
            let Ok(permit) = permit else {
                return;
            };
            drop(in_line);
            runner.run(prepared, Slot { _permit: permit }).await;
        });
        self.running.insert(handle.id(), (id, lane));
    }

    /// Queues `op` behind earlier operations on its volume, or starts it. An operation already
    /// in hand (the intake hands over in-flight duplicates, see [`crate::db::store::Accepted`]) is
    /// ignored.
    fn admit(&mut self, op: Operation) {
        if !self.held.insert(op.id().clone()) {
            tracing::debug!(operation_id = %op.id(), "already in hand");
            return;
        }
        match lane(&op) {
            None => self.spawn(op),
            Some(l) => {
                let lane = self.waiting.entry(l).or_default();
                lane.push_back(op.clone());
                if lane.len() == 1 {
                    self.spawn(op);
                }
            }
        }
    }

    /// A task ended: start the next operation of its lane.
    fn finished(&mut self, id: Id, advance: bool) {
        let Some((op, key)) = self.running.remove(&id) else {
            return;
        };
        self.held.remove(&op);
        let Some(key) = key else {
            return;
        };
        let Some(lane) = self.waiting.get_mut(&key) else {
            return;
        };
        lane.pop_front();
        match lane.front().cloned() {
            Some(next) if advance => self.spawn(next),
            Some(_) => {}
            None => {
                self.waiting.remove(&key);
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

pub(crate) async fn run<R: Runner>(
    runner: R,
    mut ops: mpsc::Receiver<Operation>,
    max_concurrent: usize,
    stop: Stop,
    grace: Duration,
) {
    let mut lanes = Lanes {
        waiting: HashMap::new(),
        running: HashMap::new(),
        held: HashSet::new(),
        tasks: JoinSet::new(),
        permits: Arc::new(Semaphore::new(max_concurrent)),
        next_in_line: Arc::new(Semaphore::new(max_concurrent)),
        runner,
    };
    let limit = max_concurrent * 2;
    // Past `limit`, operations are still taken while the cloud has idle capacity (fewer tasks
    // than permits), up to `hard_cap`: one volume with a long queue must not stall the intake
    // for every other volume (head-of-line blocking), and memory stays bounded.
    let hard_cap = max_concurrent * 16;
    loop {
        let room = lanes.in_hand() < limit
            || (lanes.running.len() <= max_concurrent && lanes.in_hand() < hard_cap);
        tokio::select! {
            biased;
            () = stop.draining() => break,
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
    wind_down(&mut lanes, &stop, grace).await;
}

/// After the loop: on a drain, running operations get `grace` to reach their end (no
/// queued one starts); on an abort, or past the grace, whatever still runs is aborted (it
/// resumes from its row).
async fn wind_down<R: Runner>(lanes: &mut Lanes<R>, stop: &Stop, grace: Duration) {
    if !stop.is_aborted() && !lanes.tasks.is_empty() {
        tracing::info!(
            in_flight = lanes.tasks.len(),
            grace_s = grace.as_secs(),
            "waiting for in-flight operations"
        );
        let drained = tokio::time::timeout(grace, async {
            tokio::select! {
                () = stop.aborted() => {}
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use schema::{Command, VmId};

    use super::*;

    /// What the fake runner saw: (operation, "start" | "end") in order.
    type Log = Arc<Mutex<Vec<(String, &'static str)>>>;

    /// A runner that takes `work` per operation and logs its start and end.
    fn runner(log: &Log, work: Duration) -> impl Runner {
        let log = log.clone();
        move |op: Operation| {
            let log = log.clone();
            async move {
                let id = op.id().to_string();
                log.lock().expect("log").push((id.clone(), "start"));
                tokio::time::sleep(work).await;
                log.lock().expect("log").push((id, "end"));
            }
        }
    }

    fn op(command: Command) -> Operation {
        Operation::new(command, chrono::Utc::now())
    }

    /// Runs the executor over `ops` until each distinct one ended (the intake stays connected
    /// meanwhile: a closed channel means shutdown), then drains it; returns the log.
    async fn run_all(
        ops: Vec<Operation>,
        max: usize,
        work: Duration,
    ) -> Vec<(String, &'static str)> {
        let log: Log = Default::default();
        let distinct: HashSet<String> = ops.iter().map(|o| o.id().to_string()).collect();
        let (tx, rx) = mpsc::channel(ops.len().max(1));
        for o in ops {
            tx.send(o).await.expect("send");
        }
        let stop = Stop::new();
        let executor = tokio::spawn(run(
            runner(&log, work),
            rx,
            max,
            stop.clone(),
            Duration::from_secs(1),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while log
            .lock()
            .expect("log")
            .iter()
            .filter(|(_, e)| *e == "end")
            .count()
            < distinct.len()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "operations did not end"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A copy ignored by the executor would have run by now if it were not.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.drain();
        executor.await.expect("executor");
        drop(tx);
        log.lock().expect("log").clone()
    }

    fn started(log: &[(String, &'static str)]) -> Vec<String> {
        log.iter()
            .filter(|(_, e)| *e == "start")
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Most operations running at once, from the log.
    fn peak(log: &[(String, &'static str)]) -> usize {
        let (mut now, mut most) = (0usize, 0usize);
        for (_, e) in log {
            if *e == "start" {
                now += 1;
                most = most.max(now);
            } else {
                now -= 1;
            }
        }
        most
    }

    #[tokio::test(start_paused = true)]
    async fn operations_on_one_volume_run_one_at_a_time_in_arrival_order() {
        let volume = schema::VolumeId::new_random();
        let ops: Vec<Operation> = (0..5).map(|_| op(Command::detach(volume))).collect();
        let ids: Vec<String> = ops.iter().map(|o| o.id().to_string()).collect();

        let log = run_all(ops, 4, Duration::from_millis(10)).await;

        assert_eq!(started(&log), ids, "FIFO per volume");
        assert_eq!(peak(&log), 1, "never two at once on one volume");
        assert_eq!(log.len(), 10, "all ended");
    }

    /// A runner that logs "prepare" when it prepared an operation (those in `slow` take 50 ms
    /// to), then works 100 ms like [`runner`].
    #[derive(Clone)]
    struct Preparing(Log, Vec<String>);

    impl Runner for Preparing {
        type Prepared = Operation;

        fn prepare(&self, op: Operation) -> impl Future<Output = Operation> + Send + 'static {
            let log = self.0.clone();
            let slow = self.1.contains(&op.id().to_string());
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                log.lock()
                    .expect("log")
                    .push((op.id().to_string(), "prepare"));
                op
            }
        }

        fn run(&self, op: Operation, slot: Slot) -> impl Future<Output = ()> + Send + 'static {
            let log = self.0.clone();
            async move {
                let _slot = slot;
                let id = op.id().to_string();
                log.lock().expect("log").push((id.clone(), "start"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                log.lock().expect("log").push((id, "end"));
            }
        }
    }

    /// Runs `n` operations on volumes of their own through a [`Preparing`] runner (those whose
    /// index is in `slow` prepare for 50 ms), two at a time; their ids and the log.
    async fn run_prepared(n: usize, slow: &[usize]) -> (Vec<String>, Vec<(String, &'static str)>) {
        let ops: Vec<Operation> = (0..n)
            .map(|_| op(Command::detach(schema::VolumeId::new_random())))
            .collect();
        let ids: Vec<String> = ops.iter().map(|o| o.id().to_string()).collect();
        let log: Log = Default::default();
        let (tx, rx) = mpsc::channel(8);
        for o in ops {
            tx.send(o).await.expect("send");
        }
        let stop = Stop::new();
        let slow = slow.iter().map(|i| ids[*i].clone()).collect();
        let executor = tokio::spawn(run(
            Preparing(log.clone(), slow),
            rx,
            2,
            stop.clone(),
            Duration::from_secs(1),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.drain();
        executor.await.expect("executor");
        let log = log.lock().expect("log").clone();
        (ids, log)
    }

    /// Where `id` logged `what` first.
    fn at(log: &[(String, &'static str)], id: &str, what: &str) -> usize {
        log.iter()
            .position(|(i, e)| i == id && *e == what)
            .unwrap_or_else(|| panic!("{id} never logged {what}: {log:?}"))
    }

    #[tokio::test(start_paused = true)]
    async fn slots_go_in_arrival_order_however_long_each_preparation_takes() {
        // The third prepares for 50 ms, the fourth at once: when the first slot frees (at
        // 100 ms) both are ready, and the third, in line first, starts first.
        let (ids, log) = run_prepared(4, &[2]).await;
        assert!(at(&log, &ids[3], "prepare") < at(&log, &ids[2], "prepare"));
        assert!(
            at(&log, &ids[2], "start") < at(&log, &ids[3], "start"),
            "{log:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_in_line_are_prepared_while_the_running_ones_work() {
        let (ids, log) = run_prepared(6, &[]).await;
        let at = |id: &str, what: &str| at(&log, id, what);
        let first_end = log.iter().position(|(_, e)| *e == "end").expect("an end");
        for id in &ids {
            assert!(at(id, "prepare") < at(id, "start"), "prepared first");
        }
        // Two running and two prepared, waiting: the third and fourth before the first end.
        assert!(at(&ids[2], "prepare") < first_end, "{log:?}");
        assert!(at(&ids[3], "prepare") < first_end, "{log:?}");
        // No more than two waiting: the fifth only once a slot freed.
        assert!(at(&ids[4], "prepare") > first_end, "{log:?}");
        assert_eq!(
            peak(
                &log.iter()
                    .filter(|(_, e)| *e != "prepare")
                    .cloned()
                    .collect::<Vec<_>>()
            ),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_limit_run_at_once() {
        let ops = (0..10)
            .map(|i| {
                op(Command::create(
                    format!("c{i}"),
                    "1GiB".parse().expect("size"),
                ))
            })
            .collect();
        let log = run_all(ops, 3, Duration::from_millis(10)).await;
        assert_eq!(peak(&log), 3, "the concurrency cap");
        assert_eq!(log.len(), 20);
    }

    /// M3: creates of one name run one at a time, in arrival order; other names beside them.
    #[tokio::test(start_paused = true)]
    async fn creates_of_one_name_run_one_at_a_time() {
        let create = |name: &str| op(Command::create(name, "1GiB".parse().expect("size")));
        let same: Vec<Operation> = (0..3).map(|_| create("twin")).collect();
        let ids: Vec<String> = same.iter().map(|o| o.id().to_string()).collect();
        let mut ops = same;
        ops.push(create("other"));
        let log = run_all(ops, 4, Duration::from_millis(10)).await;
        let twins: Vec<&(String, &str)> = log.iter().filter(|(id, _)| ids.contains(id)).collect();
        assert_eq!(
            peak(&twins.iter().map(|&e| e.clone()).collect::<Vec<_>>()),
            1
        );
        let order: Vec<String> = started(&log)
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(order, ids, "arrival order");
        assert_eq!(peak(&log), 2, "another name runs beside them");
    }

    #[tokio::test(start_paused = true)]
    async fn volumes_run_in_parallel_with_each_other() {
        let ops = (0..4)
            .map(|_| op(Command::detach(schema::VolumeId::new_random())))
            .collect();
        let log = run_all(ops, 4, Duration::from_millis(10)).await;
        assert_eq!(peak(&log), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_copy_of_an_operation_in_hand_is_ignored() {
        let first = op(Command::attach(
            schema::VolumeId::new_random(),
            VmId::new_random(),
        ));
        let copy = first.clone();
        let log = run_all(vec![first, copy], 4, Duration::from_millis(10)).await;
        assert_eq!(started(&log).len(), 1, "ran once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_queue_on_one_volume_does_not_hold_back_another() {
        let busy = schema::VolumeId::new_random();
        // 12 queued on one volume: more than the in-hand limit (2 × 1), less than the hard cap
        // (16 × 1) that bounds how far ahead the executor looks.
        let mut ops: Vec<Operation> = (0..12).map(|_| op(Command::detach(busy))).collect();
        let other = op(Command::delete(schema::VolumeId::new_random()));
        let other_id = other.id().to_string();
        ops.push(other);
        let log = run_all(ops, 1, Duration::from_millis(10)).await;
        let position = started(&log)
            .iter()
            .position(|id| *id == other_id)
            .expect("ran");
        assert!(
            position <= 2,
            "the other volume started at position {position} of 13"
        );
    }

    /// Starts the executor on `ops` (each taking `work`), lets them start, then fires the token
    /// `pick` chooses (drain or abort). Returns how long the executor took to end after it,
    /// and the log.
    async fn stop_after_start(
        ops: Vec<Operation>,
        work: Duration,
        grace: Duration,
        pick: fn(&Stop),
    ) -> (Duration, Vec<(String, &'static str)>) {
        let log: Log = Default::default();
        let (tx, rx) = mpsc::channel(8);
        for o in ops {
            tx.send(o).await.expect("send");
        }
        let stop = Stop::new();
        let executor = tokio::spawn(run(runner(&log, work), rx, 4, stop.clone(), grace));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = tokio::time::Instant::now();
        pick(&stop);
        executor.await.expect("executor");
        let log = log.lock().expect("log").clone();
        (before.elapsed(), log)
    }

    fn drain(s: &Stop) {
        s.drain();
    }

    fn abort(s: &Stop) {
        s.abort();
    }

    fn one_op() -> Vec<Operation> {
        vec![op(Command::detach(schema::VolumeId::new_random()))]
    }

    #[tokio::test(start_paused = true)]
    async fn drain_lets_running_operations_finish_and_starts_no_more() {
        let volume = schema::VolumeId::new_random();
        let ops = (0..3).map(|_| op(Command::detach(volume))).collect();
        let (_, log) =
            stop_after_start(ops, Duration::from_secs(1), Duration::from_secs(5), drain).await;
        assert_eq!(started(&log).len(), 1, "nothing new after the drain");
        assert_eq!(log.len(), 2, "the running one finished within the grace");
    }

    #[tokio::test(start_paused = true)]
    async fn abort_stops_running_operations_at_once() {
        let (took, log) = stop_after_start(
            one_op(),
            Duration::from_secs(60),
            Duration::from_secs(5),
            abort,
        )
        .await;
        assert!(took < Duration::from_secs(1), "no grace on abort");
        assert_eq!(log.len(), 1, "started, never ended: aborted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_past_the_grace_aborts_what_is_left() {
        let (waited, log) = stop_after_start(
            one_op(),
            Duration::from_secs(60),
            Duration::from_secs(2),
            drain,
        )
        .await;
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert_eq!(log.len(), 1, "aborted at the end of the grace");
    }
}
