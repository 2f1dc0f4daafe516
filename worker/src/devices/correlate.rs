//! Finding the guest device of a volume attached to the host VM.
//!
//! The expected serial (docs/cloudstack.md: the volume id without dashes, first 20 characters)
//! is known before the attach is sent, so the expectation is registered first and the device
//! table is checked, on every scan, until the device is there: a device that appeared before
//! the job result was read is found like any other. Without a serial, the fallbacks are, in
//! order: a `/dev/disk/by-id/{virtio-,scsi-0QEMU_QEMU_HARDDISK_}<serial>` link, then size — but
//! only when exactly one new, unclaimed, serial-less device fits. Never a guess between two.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use schema::VolumeId;

use super::monitor::{DeviceEvent, DeviceTable};

/// How often a wait for a by-id link looks again.
const BY_ID_POLL: Duration = Duration::from_millis(20);

/// The prefixes of `/dev/disk/by-id` links to a disk with a given serial.
const BY_ID_PREFIXES: [&str; 3] = ["virtio-", "scsi-0QEMU_QEMU_HARDDISK_", "scsi-"];

/// A registered wait for one volume's device.
#[derive(Debug, Clone)]
pub struct Expectation {
    pub volume: VolumeId,
    pub serial: String,
    /// Bytes, as CloudStack reports the volume: only a cross-check or the last fallback.
    pub size: Option<u64>,
    pub registered: Instant,
}

/// How the device was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    Serial,
    ByIdLink,
    Size,
}

/// The device of a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub name: String,
    /// `/dev/vdX`.
    pub device_path: String,
    /// `/dev/disk/by-id/...` when the serial is known.
    pub by_id_path: Option<String>,
    pub serial: Option<String>,
    pub size: Option<u64>,
    pub matched_by: MatchedBy,
}

/// The device monitor as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorState {
    Running,
    /// No scan for five periods.
    Stalled,
    /// `$SYSFS_ROOT/block` cannot be read.
    Unreadable,
}

impl MonitorState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stalled => "stalled",
            Self::Unreadable => "unreadable",
        }
    }
}

/// A handle on the monitor's output, shared by every operation.
#[derive(Debug, Clone)]
pub struct Devices {
    table: watch::Receiver<Arc<DeviceTable>>,
    events: broadcast::Sender<DeviceEvent>,
    by_id_dir: PathBuf,
    period: Duration,
    /// Where the device nodes are (`/dev`): a persistent name's target when no by-id link came.
    node_dir: PathBuf,
    /// How long a host attach waits for udev's by-id link of its device.
    by_id_wait: Duration,
    /// Device name → the volume that owns it. Two volumes never get one device.
    claims: Arc<Mutex<HashMap<String, VolumeId>>>,
    /// Where the monitor's scans come from.
    mode: watch::Receiver<super::MonitorMode>,
}

impl Devices {
    pub fn new(
        table: watch::Receiver<Arc<DeviceTable>>,
        events: broadcast::Sender<DeviceEvent>,
        by_id_dir: PathBuf,
        period: Duration,
    ) -> Self {
        Self {
            table,
            events,
            by_id_dir,
            node_dir: PathBuf::from("/dev"),
            by_id_wait: Duration::from_secs(3),
            period,
            claims: Arc::default(),
            mode: watch::channel(super::MonitorMode::Polling).1,
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Where device nodes are (`DEVICE_NODE_DIR`) and how long a host attach waits for a
    /// by-id link (`BY_ID_LINK_WAIT_MS`).
    pub fn with_nodes(mut self, node_dir: PathBuf, by_id_wait: Duration) -> Self {
        self.node_dir = node_dir;
        self.by_id_wait = by_id_wait;
        self
    }

    /// The device node of `name`: `$DEVICE_NODE_DIR/<name>`.
    pub fn node(&self, name: &str) -> PathBuf {
        self.node_dir.join(name)
    }

    /// Whether `path` is a device node (`$DEVICE_NODE_DIR/<name>`), not a by-id link.
    pub fn is_node(&self, path: &Path) -> bool {
        path.parent() == Some(self.node_dir.as_path())
    }

    /// The by-id link of the disk with `serial` that exists now: udev's `virtio-<serial>`, or a
    /// SCSI form. Named by the serial, it can only lead to that disk, and goes with it.
    pub async fn by_id_link(&self, serial: &str) -> Option<PathBuf> {
        for prefix in BY_ID_PREFIXES {
            let link = self.by_id_dir.join(format!("{prefix}{serial}"));
            if tokio::fs::symlink_metadata(&link).await.is_ok() {
                return Some(link);
            }
        }
        None
    }

    /// [`Self::by_id_link`], waiting up to `BY_ID_LINK_WAIT_MS` for udev to make it (udev
    /// makes it after the kernel's uevent, so the daemon may see the device first).
    pub async fn wait_by_id_link(
        &self,
        serial: &str,
        shutdown: &CancellationToken,
    ) -> Option<PathBuf> {
        let deadline = Instant::now() + self.by_id_wait;
        loop {
            if let Some(link) = self.by_id_link(serial).await {
                return Some(link);
            }
            if Instant::now() >= deadline || shutdown.is_cancelled() {
                tracing::warn!(
                    serial,
                    waited_ms = self.by_id_wait.as_millis(),
                    "no by-id link for this serial: the persistent name points at the device node, checked against the serial at every scan"
                );
                return None;
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(BY_ID_POLL.min(self.by_id_wait)) => {}
            }
        }
    }

    /// The name of the device that carries `serial` now, if any.
    pub fn named(&self, serial: &str) -> Option<String> {
        let table = self.table.borrow();
        table
            .devices
            .values()
            .find(|p| p.device.serial.as_deref() == Some(serial))
            .map(|p| p.device.name.clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }

    pub fn table(&self) -> Arc<DeviceTable> {
        self.table.borrow().clone()
    }

    /// The monitor's table, changed at every scan.
    pub fn scans(&self) -> watch::Receiver<Arc<DeviceTable>> {
        self.table.clone()
    }

    /// Where udev's by-id links are.
    pub fn by_id_dir(&self) -> &Path {
        &self.by_id_dir
    }

    /// Follows the monitor's mode (`Monitor::mode`).
    pub fn with_mode(mut self, mode: watch::Receiver<super::MonitorMode>) -> Self {
        self.mode = mode;
        self
    }

    /// `uevents` or `polling` (for `/ready`).
    pub fn mode(&self) -> super::MonitorMode {
        *self.mode.borrow()
    }

    /// What `/ready` says of the monitor.
    pub fn state(&self) -> MonitorState {
        let limit = (self.period * 5).max(Duration::from_secs(2));
        let table = self.table.borrow();
        if table.scanned_at.is_none_or(|t| t.elapsed() >= limit) {
            MonitorState::Stalled
        } else if table.unreadable {
            MonitorState::Unreadable
        } else {
            MonitorState::Running
        }
    }

    /// What to wait for of `volume`'s device (its serial and size) and since when: made before
    /// the attach is sent, so a device that appears early is not missed. Nothing is registered:
    /// the table is read whenever the expectation is matched.
    pub fn expect(&self, volume: VolumeId, size: Option<u64>) -> Expectation {
        Expectation {
            volume,
            serial: volume.disk_serial(),
            size,
            registered: Instant::now(),
        }
    }

    /// Waits up to `timeout` for the device. `Err` names the candidates that were seen.
    #[tracing::instrument(name = "device.correlate", skip_all, fields(volume_id = %exp.volume))]
    pub async fn correlate(
        &self,
        exp: &Expectation,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Found, Vec<String>> {
        let deadline = exp.registered + timeout;
        let mut table = self.table.clone();
        loop {
            let snapshot = table.borrow_and_update().clone();
            if let Some(found) = self.try_match(&snapshot, exp) {
                return Ok(found);
            }
            tokio::select! {
                () = shutdown.cancelled() => return Err(candidates(&snapshot, exp)),
                () = tokio::time::sleep_until(deadline) => {
                    let last = table.borrow().clone();
                    return self.try_match(&last, exp).ok_or_else(|| candidates(&last, exp));
                }
                changed = table.changed() => {
                    if changed.is_err() {
                        // The monitor stopped: nothing new will come.
                        return Err(candidates(&snapshot, exp));
                    }
                }
            }
        }
    }

    /// Gives up `volume`'s device (after a detach).
    pub fn release(&self, volume: VolumeId) {
        self.lock_claims().retain(|_, v| *v != volume);
    }

    /// Gives up a device that disappeared.
    pub fn release_device(&self, name: &str) {
        self.lock_claims().remove(name);
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, HashMap<String, VolumeId>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The by-id links of `serial` that exist, each with the device name it leads to.
    fn by_id_targets(&self, serial: &str) -> Vec<(PathBuf, String)> {
        BY_ID_PREFIXES
            .iter()
            .filter_map(|prefix| {
                let link = self.by_id_dir.join(format!("{prefix}{serial}"));
                let name = link_target_name(&link)?;
                Some((link, name))
            })
            .collect()
    }

    /// One look at the table; claims the device when found. A device that carries the
    /// volume's own serial is the volume's disk, whoever claimed its name before: a claim is
    /// this process's memory of an earlier disk under that name (detached meanwhile, perhaps by
    /// another instance while this one stood by), and the kernel reuses names. Claims guard
    /// only the fallbacks (by-id link, size), which cannot tell disks apart by serial.
    pub fn try_match(&self, table: &DeviceTable, exp: &Expectation) -> Option<Found> {
        // Read before the claims are locked: no file system call under the lock.
        let linked = self.by_id_targets(&exp.serial);
        let mut claims = self.lock_claims();
        let free = |name: &str| claims.get(name).is_none_or(|v| *v == exp.volume);

        let found = if let Some(p) = table
            .devices
            .values()
            .find(|p| p.device.serial.as_deref() == Some(&exp.serial))
        {
            // Which by-id link it has (if udev made one yet) is for the caller to find.
            Some((p, MatchedBy::Serial, None))
        } else if let Some((p, link)) = linked.into_iter().find_map(|(link, name)| {
            let p = table.devices.get(&name).filter(|p| free(&p.device.name))?;
            Some((p, link))
        }) {
            Some((p, MatchedBy::ByIdLink, Some(link)))
        } else {
            let fits: Vec<_> = table
                .devices
                .values()
                .filter(|p| {
                    p.device.serial.is_none()
                        && p.first_seen >= exp.registered
                        && free(&p.device.name)
                })
                .filter(|p| exp.size.is_some() && p.device.size == exp.size)
                .collect();
            match fits.as_slice() {
                [only] => Some((*only, MatchedBy::Size, None)),
                [] => None,
                several => {
                    tracing::warn!(volume = %exp.volume, candidates = several.len(), "several serial-less devices fit by size; not guessing");
                    None
                }
            }
        };
        let (p, matched_by, by_id_path) = found?;
        if matched_by == MatchedBy::Serial
            && let (Some(want), Some(got)) = (exp.size, p.device.size)
            && want != got
        {
            tracing::warn!(volume = %exp.volume, device = %p.device.name, want, got, "serial matches but size differs");
        }
        claims.insert(p.device.name.clone(), exp.volume);
        Some(Found {
            name: p.device.name.clone(),
            device_path: format!("/dev/{}", p.device.name),
            by_id_path: by_id_path.map(|b| b.display().to_string()),
            serial: p
                .device
                .serial
                .clone()
                .or_else(|| (matched_by == MatchedBy::ByIdLink).then(|| exp.serial.clone())),
            size: p.device.size,
            matched_by,
        })
    }
}

/// `vdb` for a link `.../virtio-<serial> -> ../../vdb`.
fn link_target_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

/// Devices that appeared after the expectation was registered, for the timeout message.
fn candidates(table: &DeviceTable, exp: &Expectation) -> Vec<String> {
    table
        .devices
        .values()
        .filter(|p| p.first_seen >= exp.registered)
        .map(|p| {
            format!(
                "{} (serial {}, {} bytes)",
                p.device.name,
                p.device.serial.as_deref().unwrap_or("none"),
                p.device
                    .size
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into())
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::monitor::Monitor;
    use crate::devices::test_tree::Tree;

    fn setup(t: &Tree) -> (Monitor, Devices, PathBuf) {
        let m = Monitor::new(t.0.clone(), Duration::from_millis(10));
        let by_id = t.0.join("by-id");
        std::fs::create_dir_all(&by_id).expect("by-id");
        let d = Devices::new(
            m.table(),
            m.events(),
            by_id.clone(),
            Duration::from_millis(10),
        );
        (m, d, by_id)
    }

    const GIB_SECTORS: &str = "2097152";

    #[test]
    fn matches_by_serial_even_among_devices_of_the_same_size() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let a = VolumeId::new_random();
        let b = VolumeId::new_random();
        let (ea, eb) = (d.expect(a, Some(1 << 30)), d.expect(b, Some(1 << 30)));
        t.add_dir("vdb", GIB_SECTORS, Some(&b.disk_serial()), "virtio4");
        t.add_dir("vdc", GIB_SECTORS, Some(&a.disk_serial()), "virtio5");
        m.step();
        let table = d.table();
        let fa = d.try_match(&table, &ea).expect("a found");
        let fb = d.try_match(&table, &eb).expect("b found");
        assert_eq!(
            (fa.device_path.as_str(), fa.matched_by),
            ("/dev/vdc", MatchedBy::Serial)
        );
        assert_eq!(fb.device_path, "/dev/vdb");
        assert_eq!(
            fa.by_id_path, None,
            "a serial match names no by-id link it has not seen"
        );
    }

    /// N5: a claim left from an earlier disk under the same name (detached while this instance
    /// stood by) never keeps a volume from its own disk, found by its serial.
    #[test]
    fn a_stale_claim_does_not_hide_a_device_with_the_volumes_own_serial() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let (a, b) = (VolumeId::new_random(), VolumeId::new_random());
        t.add_dir("vdb", GIB_SECTORS, Some(&a.disk_serial()), "virtio4");
        m.step();
        let ea = d.expect(a, Some(1 << 30));
        assert_eq!(d.try_match(&d.table(), &ea).expect("a").name, "vdb");
        // A leaves (another instance detached it: no release here); B gets the name.
        std::fs::remove_dir_all(t.0.join("block/vdb")).expect("gone");
        m.step();
        t.add_dir("vdb", GIB_SECTORS, Some(&b.disk_serial()), "virtio5");
        m.step();
        let eb = d.expect(b, Some(1 << 30));
        let found = d.try_match(&d.table(), &eb).expect("b finds its own disk");
        assert_eq!(
            (found.name.as_str(), found.matched_by),
            ("vdb", MatchedBy::Serial)
        );
    }

    /// The by-id link is found in whichever form udev made it (virtio or SCSI), waited for up to
    /// the configured time, and never made up when it is not there.
    #[tokio::test]
    async fn the_by_id_link_is_found_in_any_form_and_waited_for_a_bounded_time() {
        let t = Tree::new();
        let (_m, d, by_id) = setup(&t);
        let d = d.with_nodes(t.0.join("dev"), Duration::from_millis(300));
        let (a, b) = (VolumeId::new_random(), VolumeId::new_random());
        let none = CancellationToken::new();
        assert_eq!(d.by_id_link(&a.disk_serial()).await, None);
        let started = std::time::Instant::now();
        assert_eq!(d.wait_by_id_link(&a.disk_serial(), &none).await, None);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        let scsi = by_id.join(format!("scsi-0QEMU_QEMU_HARDDISK_{}", b.disk_serial()));
        std::os::unix::fs::symlink("../../sdb", &scsi).expect("link");
        assert_eq!(d.by_id_link(&b.disk_serial()).await, Some(scsi));
        // udev makes the link while the attach waits.
        let late = by_id.join(format!("virtio-{}", a.disk_serial()));
        let made = late.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::os::unix::fs::symlink("../../vdc", &made).expect("link");
        });
        assert_eq!(d.wait_by_id_link(&a.disk_serial(), &none).await, Some(late));
        assert_eq!(d.node("vdc"), t.0.join("dev").join("vdc"));
        assert!(d.is_node(&t.0.join("dev").join("vdc")));
        assert!(!d.is_node(&by_id.join("virtio-x")));
    }

    /// A virtio-scsi guest: the volume's disk is `sdb`, its serial only in the VPD page.
    #[test]
    fn a_scsi_disk_is_matched_by_the_serial_of_its_vpd_page() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let v = VolumeId::new_random();
        let e = d.expect(v, Some(1 << 30));
        t.add_scsi("sda", GIB_SECTORS, &VolumeId::new_random().disk_serial());
        t.add_scsi("sdb", GIB_SECTORS, &v.disk_serial());
        m.step();
        let f = d.try_match(&d.table(), &e).expect("sdb found");
        assert_eq!(
            (f.device_path.as_str(), f.matched_by),
            ("/dev/sdb", MatchedBy::Serial)
        );
    }

    #[test]
    fn falls_back_to_the_by_id_link_then_to_a_unique_size() {
        let t = Tree::new();
        let (mut m, d, by_id) = setup(&t);
        let v = VolumeId::new_random();
        let e = d.expect(v, Some(1 << 30));
        t.add_dir("vdd", "4194304", None, "virtio6");
        std::os::unix::fs::symlink(
            "../../vdd",
            by_id.join(format!("scsi-0QEMU_QEMU_HARDDISK_{}", v.disk_serial())),
        )
        .expect("link");
        m.step();
        let f = d.try_match(&d.table(), &e).expect("via by-id");
        assert_eq!(
            (f.name.as_str(), f.matched_by),
            ("vdd", MatchedBy::ByIdLink)
        );

        let w = VolumeId::new_random();
        let e = d.expect(w, Some(1 << 30));
        t.add_dir("vde", GIB_SECTORS, None, "virtio7");
        m.step();
        let f = d.try_match(&d.table(), &e).expect("via size");
        assert_eq!((f.name.as_str(), f.matched_by), ("vde", MatchedBy::Size));
    }

    #[test]
    fn never_guesses_between_two_devices_of_the_right_size() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let e = d.expect(VolumeId::new_random(), Some(1 << 30));
        t.add_dir("vdb", GIB_SECTORS, None, "virtio4");
        t.add_dir("vdc", GIB_SECTORS, None, "virtio5");
        m.step();
        assert_eq!(d.try_match(&d.table(), &e), None);
    }

    #[test]
    fn a_device_present_before_the_expectation_is_matched_by_serial_but_not_by_size() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let v = VolumeId::new_random();
        t.add_dir("vdb", GIB_SECTORS, Some(&v.disk_serial()), "virtio4");
        t.add_dir("vdc", GIB_SECTORS, None, "virtio5");
        m.step();
        let e = d.expect(v, Some(1 << 30));
        assert_eq!(
            d.try_match(&d.table(), &e).map(|f| f.name),
            Some("vdb".into())
        );
        let other = d.expect(VolumeId::new_random(), Some(1 << 30));
        assert_eq!(
            d.try_match(&d.table(), &other),
            None,
            "vdc was there before: not new"
        );
    }

    #[test]
    fn a_claimed_device_is_not_given_to_another_volume() {
        let t = Tree::new();
        let (mut m, d, _) = setup(&t);
        let e1 = d.expect(VolumeId::new_random(), Some(1 << 30));
        let e2 = d.expect(VolumeId::new_random(), Some(1 << 30));
        t.add_dir("vdb", GIB_SECTORS, None, "virtio4");
        m.step();
        assert!(d.try_match(&d.table(), &e1).is_some());
        assert_eq!(d.try_match(&d.table(), &e2), None);
        d.release(e1.volume);
        assert!(d.try_match(&d.table(), &e2).is_some());
    }

    #[tokio::test]
    async fn correlate_waits_for_the_device_and_times_out_naming_candidates() {
        let t = Tree::new();
        let (m, d, _) = setup(&t);
        let shutdown = CancellationToken::new();
        tokio::spawn(m.run(shutdown.clone()));
        let v = VolumeId::new_random();
        let e = d.expect(v, Some(1 << 30));
        let root = t.0.clone();
        let serial = v.disk_serial();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Tree::add_dir_at(&root, "vdf", GIB_SECTORS, Some(&serial), "virtio9");
        });
        let f = d
            .correlate(&e, Duration::from_secs(5), &shutdown)
            .await
            .expect("found");
        assert_eq!(f.device_path, "/dev/vdf");

        let e = d.expect(VolumeId::new_random(), Some(1 << 30));
        t.add_dir("vdg", "8", Some("someone-else"), "virtio10");
        let started = Instant::now();
        let err = d
            .correlate(&e, Duration::from_millis(200), &shutdown)
            .await
            .expect_err("timeout");
        assert!(started.elapsed() < Duration::from_millis(600));
        assert!(
            err.iter()
                .any(|c| c.starts_with("vdg (serial someone-else")),
            "{err:?}"
        );
        shutdown.cancel();
    }
}
