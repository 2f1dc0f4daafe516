//! The device monitor: scans `$SYSFS_ROOT/block`, diffs against the last table, and publishes
//! both the new table and the events. It scans when the kernel announces a block device
//! (uevents, [`super::uevents`]) and every period as the safety net; without uevents (the
//! socket cannot be opened, or `SYSFS_ROOT` is not the kernel's `/sys`), every period alone.
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

use super::scan::{BlockDevice, NameFilter, scan_filtered};
use super::uevents::{UeventFeed, UeventSocket};

/// Where scans come from (`/ready`'s `device_monitor_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// A scan at each kernel block uevent, and the periodic scan as the safety net.
    Uevents,
    /// The periodic scan only.
    Polling,
}

impl MonitorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uevents => "uevents",
            Self::Polling => "polling",
        }
    }
}

/// With uevents, the safety-net scan runs this many times less often than the polling period:
/// it only has to catch what the kernel did not announce (events lost to a full socket buffer
/// are answered at once, as an overflow). 4 × 250 ms keeps a missed event's worst case at 1 s
/// (the old daemon polled every 2 s) and cuts the idle scans by four.
pub const SAFETY_NET_FACTOR: u32 = 4;

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
    filter: NameFilter,
    uevents: Option<UeventSocket>,
    mode_tx: watch::Sender<MonitorMode>,
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
            filter: NameFilter::Disks,
            uevents: None,
            mode_tx: watch::channel(MonitorMode::Polling).0,
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

    /// Only the names `filter` admits (the benchmark's loop devices).
    pub fn with_filter(mut self, filter: NameFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Scans at each block uevent on `socket`, and every `SAFETY_NET_FACTOR` periods.
    pub fn with_uevents(mut self, socket: UeventSocket) -> Self {
        self.uevents = Some(socket);
        self.mode_tx.send_replace(MonitorMode::Uevents);
        self
    }

    /// The mode, as it changes (uevents fall back to polling if the socket fails).
    pub fn mode(&self) -> watch::Receiver<MonitorMode> {
        self.mode_tx.subscribe()
    }

    pub fn table(&self) -> watch::Receiver<Arc<DeviceTable>> {
        self.table_tx.subscribe()
    }

    pub fn events(&self) -> broadcast::Sender<DeviceEvent> {
        self.events_tx.clone()
    }

    /// One scan: updates the table, publishes it and the events, and returns the events.
    pub fn step(&mut self) -> Vec<DeviceEvent> {
        let result = scan_filtered(&self.root, &self.filter);
        self.apply(result)
    }

    /// [`Self::step`] with the sysfs reads on the blocking pool, off the runtime's workers (a
    /// slow or hung sysfs read must not stall the tasks that share them).
    async fn step_off_runtime(&mut self) -> Vec<DeviceEvent> {
        let (root, filter) = (self.root.clone(), self.filter.clone());
        match tokio::task::spawn_blocking(move || scan_filtered(&root, &filter)).await {
            Ok(result) => self.apply(result),
            Err(e) => {
                tracing::error!(error = %e, "a device scan failed");
                Vec::new()
            }
        }
    }

    /// One scan, unless shutdown comes first: a scan stuck in a hung sysfs read holds one
    /// blocking thread, never the monitor's stop. `false` on shutdown.
    async fn step_until(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            _ = self.step_off_runtime() => true,
        }
    }

    /// Updates the table from one scan, publishes it and the events, and returns the events.
    fn apply(&mut self, result: super::scan::Scan) -> Vec<DeviceEvent> {
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

    /// Scans until shutdown: at each block uevent (a burst costs one scan) and every period
    /// (with uevents, every `SAFETY_NET_FACTOR` periods).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut uevents = self.uevents.take().map(UeventSocket::listen);
        let mut tick = self.ticker(uevents.is_some());
        tracing::info!(root = %self.root.display(), period_ms = self.period.as_millis() as u64, mode = self.mode_tx.borrow().as_str(), "device monitor running");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if !self.step_until(&shutdown).await {
                        return;
                    }
                }
                got = next_uevent(&uevents) => match got {
                    Ok(()) => {
                        if !self.step_until(&shutdown).await {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the uevent socket failed; the device monitor polls from now on");
                        uevents = None;
                        self.mode_tx.send_replace(MonitorMode::Polling);
                        tick = self.ticker(false);
                    }
                },
            }
        }
    }

    fn ticker(&self, uevents: bool) -> tokio::time::Interval {
        let period = if uevents {
            self.period * SAFETY_NET_FACTOR
        } else {
            self.period
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }
}

/// Waits until a uevent makes a scan due. Never resolves without a feed.
async fn next_uevent(feed: &Option<UeventFeed>) -> Result<(), String> {
    match feed {
        Some(feed) => feed.due().await,
        None => std::future::pending().await,
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
