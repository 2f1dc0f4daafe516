//! The polling device monitor: scans `$SYSFS_ROOT/block` every period, diffs against the last
//! table, and publishes both the new table and the events.
//!
//! Two channels, two guarantees:
//! - the **table** (`watch`): always the latest complete state. Correlation reads it, so a
//!   device that appeared before anyone looked is still there to be found;
//! - the **events** (`broadcast`): added / removed / resized, with timestamps. A subscriber that
//!   falls behind gets `Lagged` and resynchronises from the table: it loses no state, only the
//!   intermediate steps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::scan::{BlockDevice, scan};

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    Added,
    Removed,
    /// The size changed; `from` is the old size in bytes.
    Resized {
        from: Option<u64>,
    },
}

/// A change seen by a scan.
#[derive(Debug, Clone)]
pub struct DeviceEvent {
    pub change: DeviceChange,
    /// The device after the change (before it, for `Removed`).
    pub device: BlockDevice,
    pub at: DateTime<Utc>,
    /// Monotonic time of the scan that saw it.
    pub seen: Instant,
}

/// A device in the table and when it was first seen.
#[derive(Debug, Clone)]
pub struct Present {
    pub device: BlockDevice,
    pub first_seen: Instant,
}

/// The devices present at the last scan.
#[derive(Debug, Clone, Default)]
pub struct DeviceTable {
    pub devices: BTreeMap<String, Present>,
    /// When the last scan finished (`None` before the first).
    pub scanned_at: Option<Instant>,
    pub scans: u64,
    /// The last scan could not read `block` (the table is then empty and says nothing).
    pub unreadable: bool,
}

/// Scans and diffs. [`Monitor::step`] is one scan, for tests and the benchmark;
/// [`Monitor::run`] loops until shutdown.
#[derive(Debug)]
pub struct Monitor {
    root: PathBuf,
    period: Duration,
    table: DeviceTable,
    table_tx: watch::Sender<Arc<DeviceTable>>,
    events_tx: broadcast::Sender<DeviceEvent>,
    warned: BTreeSet<String>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Events buffered per subscriber before it lags.
const EVENT_BUFFER: usize = 1024;

impl Monitor {
    pub fn new(root: PathBuf, period: Duration) -> Self {
        Self::with_event_buffer(root, period, EVENT_BUFFER)
    }

    /// As [`Monitor::new`], with `buffer` events held per subscriber before it lags.
    pub fn with_event_buffer(root: PathBuf, period: Duration, buffer: usize) -> Self {
        let (table_tx, _) = watch::channel(Arc::new(DeviceTable::default()));
        let (events_tx, _) = broadcast::channel(buffer);
        Self {
            root,
            period,
            table: DeviceTable::default(),
            table_tx,
            events_tx,
            warned: BTreeSet::new(),
            metrics: None,
        }
    }

    /// Counts every event in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn table(&self) -> watch::Receiver<Arc<DeviceTable>> {
        self.table_tx.subscribe()
    }

    pub fn events(&self) -> broadcast::Sender<DeviceEvent> {
        self.events_tx.clone()
    }

    /// One scan: updates the table, publishes it and the events, and returns the events.
    pub fn step(&mut self) -> Vec<DeviceEvent> {
        let result = scan(&self.root);
        if result.unreadable {
            self.unreadable(result.warnings);
            return Vec::new();
        }
        let now = Instant::now();
        let at = Utc::now();
        self.warn_once(result.warnings, false);

        let mut events = Vec::new();
        let event = |change, device: &BlockDevice| DeviceEvent {
            change,
            device: device.clone(),
            at,
            seen: now,
        };
        let mut next = BTreeMap::new();
        for (name, device) in result.devices {
            let first_seen = match self.table.devices.get(&name) {
                None => {
                    events.push(event(DeviceChange::Added, &device));
                    now
                }
                Some(old) if old.device.serial != device.serial && old.device.serial.is_some() => {
                    // Another disk under a reused name: the old one left, a new one came.
                    events.push(event(DeviceChange::Removed, &old.device));
                    events.push(event(DeviceChange::Added, &device));
                    now
                }
                Some(old) => {
                    if old.device.size != device.size {
                        events.push(event(
                            DeviceChange::Resized {
                                from: old.device.size,
                            },
                            &device,
                        ));
                    }
                    old.first_seen
                }
            };
            next.insert(name, Present { device, first_seen });
        }
        for (name, old) in &self.table.devices {
            if !next.contains_key(name) {
                events.push(event(DeviceChange::Removed, &old.device));
            }
        }
        self.table = DeviceTable {
            devices: next,
            scanned_at: Some(now),
            scans: self.table.scans + 1,
            unreadable: false,
        };
        self.table_tx.send_replace(Arc::new(self.table.clone()));
        self.announce(&events);
        events
    }

    /// Logs each distinct problem once, not every period (an unreadable `block` as an error).
    fn warn_once(&mut self, warnings: Vec<String>, unreadable: bool) {
        let warnings: BTreeSet<String> = warnings.into_iter().collect();
        for w in warnings.difference(&self.warned) {
            if unreadable {
                tracing::error!(warning = %w, "device scan: the block directory is unreadable");
            } else {
                tracing::warn!(warning = %w, "device scan");
            }
        }
        self.warned = warnings;
    }

    /// A scan that could not read `block`: the last table is kept (an unreadable directory is
    /// not every device removed) and marked, and the problem logged once.
    fn unreadable(&mut self, warnings: Vec<String>) {
        self.table.scanned_at = Some(Instant::now());
        self.table.scans += 1;
        self.table.unreadable = true;
        self.warn_once(warnings, true);
        self.table_tx.send_replace(Arc::new(self.table.clone()));
    }

    /// Counts, logs and broadcasts one scan's events.
    fn announce(&self, events: &[DeviceEvent]) {
        for e in events {
            if let Some(m) = &self.metrics {
                m.device_event(match e.change {
                    DeviceChange::Added => "added",
                    DeviceChange::Removed => "removed",
                    DeviceChange::Resized { .. } => "resized",
                });
            }
            tracing::info!(device = %e.device.name, change = ?e.change, serial = e.device.serial.as_deref(), size = e.device.size, "device event");
            // No subscriber is fine: the table holds the state.
            let _ = self.events_tx.send(e.clone());
        }
    }

    /// Scans every period until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(root = %self.root.display(), period_ms = self.period.as_millis() as u64, "device monitor running");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.step();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_tree::Tree;

    fn monitor(t: &Tree) -> Monitor {
        Monitor::new(t.0.clone(), Duration::from_millis(10))
    }

    #[test]
    fn detects_added_removed_and_resized_devices() {
        let t = Tree::new();
        let mut m = monitor(&t);
        assert!(m.step().is_empty());

        t.add_dir("vdb", "2048", Some("serial-b"), "virtio4");
        let ev = m.step();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].change, DeviceChange::Added);
        assert_eq!(ev[0].device.serial.as_deref(), Some("serial-b"));
        assert!(m.step().is_empty(), "no change, no event");

        std::fs::write(t.0.join("block/vdb/size"), "4096").expect("resize");
        let ev = m.step();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].change,
            DeviceChange::Resized {
                from: Some(2048 * 512)
            }
        );
        assert_eq!(ev[0].device.size, Some(4096 * 512));

        std::fs::remove_dir_all(t.0.join("block/vdb")).expect("remove");
        let ev = m.step();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].change, DeviceChange::Removed);
        assert_eq!(ev[0].device.name, "vdb");
        assert!(m.table().borrow().devices.is_empty());
    }

    #[test]
    fn a_reused_name_with_another_serial_is_a_removal_and_an_addition() {
        let t = Tree::new();
        let mut m = monitor(&t);
        t.add_dir("vdb", "2048", Some("first"), "virtio4");
        m.step();
        std::fs::write(t.0.join("block/vdb/serial"), "second").expect("swap");
        let ev = m.step();
        let kinds: Vec<_> = ev
            .iter()
            .map(|e| (e.change.clone(), e.device.serial.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (DeviceChange::Removed, Some("first".into())),
                (DeviceChange::Added, Some("second".into()))
            ]
        );
    }

    #[tokio::test]
    async fn a_lagging_subscriber_resynchronises_from_the_table() {
        let t = Tree::new();
        let mut m = Monitor::with_event_buffer(t.0.clone(), Duration::from_millis(10), 8);
        let mut rx = m.events().subscribe();
        let table = m.table();
        // More changes than the buffer holds, nobody reading.
        for i in 0..18 {
            let name = format!("vd{i}");
            t.add_dir(&name, "8", Some(&format!("s{i}")), "virtio4");
            m.step();
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert!(n >= 10, "lagged by {n}"),
            other => panic!("expected a lag, got {other:?}"),
        }
        // The state is whole in the table.
        assert_eq!(table.borrow().devices.len(), 18);
    }
}
