//! What the HTTP readiness check reports about the long-running tasks. Each flag is written by
//! the task it describes and, when an active period ends, reset by the role loop (`app.rs`),
//! which stopped that task; the HTTP handler only reads.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Status {
    /// The intake has a live consumer on the commands queue.
    intake_connected: AtomicBool,
    /// The relay has a live publishing channel.
    relay_connected: AtomicBool,
    /// The broker probe holds a connection (what a standby reports).
    broker_reachable: AtomicBool,
    /// This instance holds the execution lease.
    active: AtomicBool,
}

impl Status {
    pub(crate) fn set_intake_connected(&self, up: bool) {
        self.intake_connected.store(up, Ordering::Relaxed);
    }

    pub(crate) fn set_relay_connected(&self, up: bool) {
        self.relay_connected.store(up, Ordering::Relaxed);
    }

    pub(crate) fn set_broker_reachable(&self, up: bool) {
        self.broker_reachable.store(up, Ordering::Relaxed);
    }

    pub(crate) fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }

    pub(crate) fn intake_connected(&self) -> bool {
        self.intake_connected.load(Ordering::Relaxed)
    }

    pub(crate) fn relay_connected(&self) -> bool {
        self.relay_connected.load(Ordering::Relaxed)
    }

    pub(crate) fn broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// `active` or `standby`.
    pub(crate) fn role(&self) -> &'static str {
        if self.active() { "active" } else { "standby" }
    }
}
