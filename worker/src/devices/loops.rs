//! Real block devices for the monitor's tests and benchmark: loop devices (`losetup`) over
//! sparse files in a temporary directory. Not used by the daemon itself.
//!
//! Needs util-linux's `losetup` and the right to set up loop devices (root here). A missing
//! tool or right fails loudly: the uevent tests need real kernel events.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::process::Command;

use super::NameFilter;

/// Bytes of each backing file (sparse: nothing is written).
const SIZE: u64 = 16 << 20;

/// Loop devices this process attached over files of its own directory; detached on
/// [`Loops::detach`] or drop.
#[derive(Debug)]
pub struct Loops {
    dir: PathBuf,
    devices: Vec<String>,
    made: usize,
}

impl Loops {
    /// A directory for the backing files; no device yet.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vd-loops-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the backing files");
        Self {
            dir,
            devices: Vec::new(),
            made: 0,
        }
    }

    /// Admits exactly the loop devices backed by a file of this directory (read from
    /// `/sys/block/loopN/loop/backing_file`, which a detached device no longer has), so a scan
    /// of the real `/sys` sees these and nothing else.
    pub fn filter(&self) -> NameFilter {
        let dir = self.dir.clone();
        NameFilter::Only(Arc::new(move |name: &str| {
            name.starts_with("loop") && backed_by(name, &dir)
        }))
    }

    /// Attaches `n` more loop devices at once (concurrent `losetup` calls, as a burst of
    /// hot-plugs); returns their names.
    pub async fn attach(&mut self, n: usize) -> Vec<String> {
        let mut files = Vec::new();
        for _ in 0..n {
            let file = self.dir.join(format!("disk{}.img", self.made));
            self.made += 1;
            std::fs::File::create(&file)
                .and_then(|f| f.set_len(SIZE))
                .expect("a sparse backing file");
            files.push(file);
        }
        let attached =
            futures_util::future::join_all(files.iter().map(|f| attach_one(f.clone()))).await;
        self.devices.extend(attached.iter().cloned());
        attached
    }

    /// `loop8`, ... of every attached device.
    pub fn names(&self) -> Vec<String> {
        self.devices.clone()
    }

    /// Detaches every device at once. A detached loop device stays in `/sys/block` with size 0.
    pub async fn detach(&mut self) {
        let devices = std::mem::take(&mut self.devices);
        futures_util::future::join_all(devices.iter().map(|name| async move {
            let status = Command::new("losetup")
                .args(["-d", &format!("/dev/{name}")])
                .status()
                .await;
            if !status.is_ok_and(|s| s.success()) {
                tracing::warn!(device = name, "losetup -d failed");
            }
        }))
        .await;
    }
}

impl Default for Loops {
    fn default() -> Self {
        Self::new()
    }
}

fn backed_by(name: &str, dir: &Path) -> bool {
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|f| Path::new(f.trim()).starts_with(dir))
}

/// `losetup -f --show FILE`, retried when a concurrent call took the same free device.
async fn attach_one(file: PathBuf) -> String {
    let mut last = String::new();
    for _ in 0..20 {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .await
            .expect("losetup (util-linux) runs");
        if out.status.success() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            return path.trim_start_matches("/dev/").to_owned();
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "cannot attach a loop device to {} (root is needed): {last}",
        file.display()
    );
}

impl Drop for Loops {
    fn drop(&mut self) {
        for name in &self.devices {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &format!("/dev/{name}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
