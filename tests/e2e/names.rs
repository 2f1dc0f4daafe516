//! Persistent names and exports follow the device's serial, never a bare device name the
//! kernel may give to another volume (docs/host.md): udev's by-id link made after the device
//! (the daemon waits for it), SCSI disks (`sdX`, `scsi-0QEMU_QEMU_HARDDISK_<serial>`), and no
//! by-id link at all (the name points at the device node, is checked against the serial at
//! every scan, and goes once the device is gone). In each case a volume detached behind the
//! daemon's back whose device name another volume then gets: reading through the first
//! volume's export, sampled every 10 ms, never returns the second volume's data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use cloudstack_sim::{ByIdLinks, DeviceBehaviour, SimConfig};
use schema::VolumeId;
use schema::event::NbdExport;

use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);
const SIZE: u64 = 16 << 20;
/// The daemon's scan period in these tests.
const SCAN: Duration = Duration::from_millis(250);

/// How the guest's udev behaves in one case.
#[derive(Clone, Copy, Debug)]
struct Case {
    by_id: ByIdLinks,
    scsi: bool,
}

/// A host-VM world with exports on (the directory only: the test reads through the entries as
/// `nbdkit file dir=` opens them) and the given device behaviour.
async fn world(case: Case) -> (TestEnv, PathBuf) {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    env.sim.sim.set_device_behaviour(DeviceBehaviour {
        by_id: case.by_id,
        scsi: case.scsi,
        ..DeviceBehaviour::default()
    });
    let dir = env.sysfs.join("exports");
    std::fs::create_dir_all(&dir).expect("export dir");
    env.extra_env
        .push(("NBD_EXPORT_DIR".into(), dir.display().to_string()));
    env.extra_env.push((
        "DEVICE_POLL_INTERVAL_MS".into(),
        SCAN.as_millis().to_string(),
    ));
    if matches!(case.by_id, ByIdLinks::Never) {
        env.extra_env
            .push(("BY_ID_LINK_WAIT_MS".into(), "300".into()));
    }
    env.start_daemon().await;
    (env, dir)
}

/// A volume whose backing file (its content, as the simulator keeps it) is filled with `byte`.
fn volume_with_pattern(env: &TestEnv, name: &str, byte: u8) -> VolumeId {
    let v = env.sim.sim.seed_volume(name, SIZE);
    let file = cloudstack_sim::sysfs::backing_file(&env.sysfs, &v.to_string());
    std::fs::create_dir_all(file.parent().expect("dir")).expect("backing dir");
    std::fs::write(&file, vec![byte; SIZE as usize]).expect("pattern");
    v
}

/// The first 4 KiB reached through `path` (following every link), if it opens.
fn head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0; 4096];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn by_id(v: VolumeId) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([("id".to_owned(), v.to_string())])
}

async fn names_follow_the_serial(case: Case) {
    let (env, exports) = world(case).await;
    let host = env.host_vm.expect("host vm");
    let (a, b) = (
        volume_with_pattern(&env, "names-a", 0xAA),
        volume_with_pattern(&env, "names-b", 0xBB),
    );

    let event = env.execute(&cmd::attach(a, host)).await;
    assert_eq!(event.data.status.as_str(), "completed", "{event:?}");
    let device = event.data.device_path.clone().expect("device path");
    let prefix = if case.scsi { "/dev/sd" } else { "/dev/vd" };
    assert!(device.starts_with(prefix), "{device}");
    let persistent = PathBuf::from(event.data.persistent_path.clone().expect("persistent"));
    let points_at = std::fs::read_link(&persistent).expect("persistent name");
    match case.by_id {
        ByIdLinks::Never => {
            assert_eq!(event.data.by_id_path, None, "no by-id link came");
            assert_eq!(
                points_at,
                env.sysfs
                    .join("dev")
                    .join(device.trim_start_matches("/dev/")),
                "the name points at the device node"
            );
        }
        _ => {
            let link = event.data.by_id_path.clone().expect("by-id path");
            let form = if case.scsi {
                "scsi-0QEMU_QEMU_HARDDISK_"
            } else {
                "virtio-"
            };
            assert_eq!(
                Path::new(&link).file_name().and_then(|n| n.to_str()),
                Some(format!("{form}{}", a.disk_serial()).as_str())
            );
            assert!(Path::new(&link).exists(), "the event's by-id path exists");
            assert_eq!(points_at, PathBuf::from(&link), "the name points at by-id");
        }
    }
    let export_a = exports.join(NbdExport::name_of(a));
    assert_eq!(head(&export_a), Some(vec![0xAA; 4096]), "A's export is A's");

    // Read A's export every 10 ms from now on.
    let wrong = Arc::new(AtomicU32::new(0));
    let samples = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the sampler however the test ends (a failed assertion too: the runtime waits for
    // blocking tasks before it drops).
    let _stop_sampling = StopOnDrop(stop.clone());
    let sampler = {
        let (wrong, samples, stop, path) = (
            wrong.clone(),
            samples.clone(),
            stop.clone(),
            export_a.clone(),
        );
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                if head(&path).is_some_and(|d| d[0] == 0xBB) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // A leaves the host VM behind the daemon's back.
    let old_name = env.sim.sim.device_name(a).expect("A's device");
    env.sim
        .sim
        .detach_volume(&by_id(a))
        .expect("detach behind the daemon's back");
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.sim.sim.attachment(a).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "detach job");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone = tokio::time::Instant::now();
    if matches!(case.by_id, ByIdLinks::Never) {
        // The name leads to the node the kernel will reuse: gone within one scan.
        while std::fs::symlink_metadata(&persistent).is_ok() {
            assert!(
                gone.elapsed() < 2 * SCAN,
                "A's persistent name still there {:?} after its device went\n{}",
                gone.elapsed(),
                env.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "A's persistent name removed {:?} after its device went (scan period {SCAN:?})",
            gone.elapsed()
        );
    }

    // B, attached through the daemon, gets A's old device name.
    let event = env.execute(&cmd::attach(b, host)).await;
    assert_eq!(event.data.status.as_str(), "completed", "{event:?}");
    assert_eq!(
        env.sim.sim.device_name(b).as_deref(),
        Some(old_name.as_str()),
        "the kernel reused the name"
    );
    let export_b = exports.join(NbdExport::name_of(b));
    assert_eq!(head(&export_b), Some(vec![0xBB; 4096]), "B's export is B's");
    tokio::time::sleep(4 * SCAN).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    assert!(
        samples.load(Ordering::Relaxed) > 50,
        "the export was sampled"
    );
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "A's export returned B's data\n{}",
        env.daemon_log()
    );
    assert_ne!(head(&export_a).map(|d| d[0]), Some(0xBB));
    if matches!(case.by_id, ByIdLinks::Never) {
        assert!(
            env.daemon_log()
                .contains("gone or carries another serial: name removed"),
            "the removal is logged"
        );
    }
}

/// udev makes the by-id link 300 ms after the device: the attach waits for it.
#[tokio::test]
async fn a_by_id_link_made_after_the_device_is_waited_for() {
    names_follow_the_serial(Case {
        by_id: ByIdLinks::After(Duration::from_millis(300)),
        scsi: false,
    })
    .await;
}

/// A virtio-scsi disk: `sdX`, its serial in the VPD page, a `scsi-0QEMU_QEMU_HARDDISK_` link.
#[tokio::test]
async fn a_scsi_disk_gets_its_scsi_by_id_link() {
    names_follow_the_serial(Case {
        by_id: ByIdLinks::After(Duration::from_millis(100)),
        scsi: true,
    })
    .await;
}

/// No by-id link ever: the name points at the node and goes within a scan of the device.
#[tokio::test]
async fn without_a_by_id_link_the_name_goes_with_its_device() {
    names_follow_the_serial(Case {
        by_id: ByIdLinks::Never,
        scsi: false,
    })
    .await;
}
