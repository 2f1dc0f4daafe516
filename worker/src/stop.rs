//! One stop handle for every component of an active period (executor, relay), with the two
//! levels a daemon needs:
//!
//! - **drain** (SIGTERM): take nothing new, finish what is in hand, then return. The executor
//!   lets running operations reach their end; the relay publishes the outbox until it is
//!   empty.
//! - **abort** (the execution lease is lost): stop now. Another instance may be active, so
//!   nothing of this period may act on CloudStack or publish any more. An abort is also a
//!   drain, so a component that only watches for the drain stops as well.
//!
//! The application owns the handle and decides the level; components only watch it.

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    drain: CancellationToken,
    abort: CancellationToken,
}

impl Stop {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Finish what is in hand, take nothing new.
    pub(crate) fn drain(&self) {
        self.drain.cancel();
    }

    /// Stop at once (and drain: whoever watches only the drain stops too).
    pub(crate) fn abort(&self) {
        self.abort.cancel();
        self.drain.cancel();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.abort.is_cancelled()
    }

    /// Resolves once a drain (or an abort) was asked for.
    pub(crate) async fn draining(&self) {
        self.drain.cancelled().await;
    }

    /// Resolves once an abort was asked for.
    pub(crate) async fn aborted(&self) {
        self.abort.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_is_also_a_drain_but_not_the_other_way_round() {
        let s = Stop::new();
        assert!(!s.is_draining() && !s.is_aborted());
        s.drain();
        assert!(s.is_draining() && !s.is_aborted());
        let s = Stop::new();
        s.clone().abort();
        assert!(s.is_draining() && s.is_aborted(), "clones share the state");
    }
}
