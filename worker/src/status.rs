//! What the HTTP readiness check reports about the long-running tasks. Each task owns its flag
//! and is the only writer; the HTTP handler only reads.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Status {
    /// The intake has a live consumer on the commands queue.
    intake_connected: AtomicBool,
    /// The relay has a live publishing channel.
    relay_connected: AtomicBool,
}

impl Status {
    pub fn set_intake_connected(&self, up: bool) {
        self.intake_connected.store(up, Ordering::Relaxed);
    }

    pub fn set_relay_connected(&self, up: bool) {
        self.relay_connected.store(up, Ordering::Relaxed);
    }

    pub fn intake_connected(&self) -> bool {
        self.intake_connected.load(Ordering::Relaxed)
    }

    pub fn relay_connected(&self) -> bool {
        self.relay_connected.load(Ordering::Relaxed)
    }
}
