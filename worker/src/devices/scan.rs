//! One scan of `$SYSFS_ROOT/block`: the `vd*` devices with their size, serial and controller.
//!
//! Entries may be directories (the simulator's layout) or symlinks into `devices/` (a real
//! guest: `/sys/block/vdb -> ../devices/pci0000:00/0000:00:06.0/virtio4/block/vdb`). Files that
//! cannot be read, or are half-written, leave that field unknown and produce a warning; a scan
//! never fails because of one device.

use std::collections::BTreeMap;
use std::path::Path;

/// A block device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// `vdb`.
    pub name: String,
    /// Bytes (`size` counts 512-byte sectors); `None` when unreadable.
    pub size: Option<u64>,
    /// The disk serial CloudStack set; `None` when absent or empty.
    pub serial: Option<String>,
    /// The `virtioN` controller, from the `device` link.
    pub controller: Option<String>,
}

/// Devices by name, plus what could not be read.
#[derive(Debug, Default)]
pub struct Scan {
    pub devices: BTreeMap<String, BlockDevice>,
    pub warnings: Vec<String>,
}

/// Reads `root/block`. A missing `block` directory is an empty scan with a warning.
pub fn scan(root: &Path) -> Scan {
    let mut out = Scan::default();
    let block = root.join("block");
    let entries = match std::fs::read_dir(&block) {
        Ok(e) => e,
        Err(e) => {
            out.warnings
                .push(format!("cannot read {}: {e}", block.display()));
            return out;
        }
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !name.starts_with("vd") {
            continue;
        }
        // `join` then reading through the path follows a symlinked entry.
        let dir = block.join(&name);
        let size = match std::fs::read_to_string(dir.join("size")) {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(sectors) => Some(sectors.saturating_mul(512)),
                Err(_) => {
                    out.warnings.push(format!(
                        "{name}: size {:?} is not a number (half-written?)",
                        s.trim()
                    ));
                    None
                }
            },
            Err(e) => {
                out.warnings.push(format!("{name}: cannot read size: {e}"));
                None
            }
        };
        let serial = match std::fs::read_to_string(dir.join("serial")) {
            Ok(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            // Many disks (and some kernels) have no serial file: not worth a warning.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                out.warnings
                    .push(format!("{name}: cannot read serial: {e}"));
                None
            }
        };
        let controller = std::fs::read_link(dir.join("device"))
            .ok()
            .and_then(|target| {
                target
                    .components()
                    .filter_map(|c| c.as_os_str().to_str())
                    .rfind(|c| c.starts_with("virtio"))
                    .map(str::to_owned)
            });
        out.devices.insert(
            name.clone(),
            BlockDevice {
                name,
                size,
                serial,
                controller,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_tree::Tree;

    #[test]
    fn reads_the_directory_layout() {
        let t = Tree::new();
        t.add_dir(
            "vdb",
            "2097152\n",
            Some("3106013ae175423ea090\n"),
            "virtio4",
        );
        let s = scan(&t.0);
        let d = &s.devices["vdb"];
        assert_eq!(d.size, Some(1 << 30));
        assert_eq!(d.serial.as_deref(), Some("3106013ae175423ea090"));
        assert_eq!(d.controller.as_deref(), Some("virtio4"));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn follows_the_symlinked_layout_of_a_real_guest() {
        let t = Tree::new();
        t.add_real("vdc", "4194304", "aaaabbbbccccddddeeee", "virtio7");
        let s = scan(&t.0);
        let d = &s.devices["vdc"];
        assert_eq!(d.size, Some(2 << 30));
        assert_eq!(d.serial.as_deref(), Some("aaaabbbbccccddddeeee"));
        assert_eq!(d.controller.as_deref(), Some("virtio7"));
    }

    #[test]
    fn a_device_without_serial_and_other_entries() {
        let t = Tree::new();
        t.add_dir("vdd", "1024", None, "virtio5");
        std::fs::create_dir_all(t.0.join("block/sda")).expect("sda");
        std::fs::create_dir_all(t.0.join("block/loop0")).expect("loop");
        let s = scan(&t.0);
        assert_eq!(s.devices.len(), 1, "only vd* devices");
        assert_eq!(s.devices["vdd"].serial, None);
        assert!(
            s.warnings.is_empty(),
            "a missing serial is normal: {:?}",
            s.warnings
        );
    }

    #[test]
    fn half_written_and_unreadable_files_warn_without_panicking() {
        let t = Tree::new();
        t.add_dir("vdb", "", Some("s1"), "virtio4");
        t.add_dir("vdc", "12ab", Some("s2"), "virtio5");
        std::fs::create_dir_all(t.0.join("block/vde")).expect("empty device dir");
        // `serial` as a directory cannot be read as a file.
        std::fs::create_dir_all(t.0.join("block/vde/serial")).expect("odd serial");
        let s = scan(&t.0);
        assert_eq!(s.devices.len(), 3);
        assert_eq!(s.devices["vdb"].size, None);
        assert_eq!(s.devices["vdc"].size, None);
        assert_eq!(s.devices["vde"].serial, None);
        assert!(
            s.warnings.iter().any(|w| w.contains("vdb")),
            "{:?}",
            s.warnings
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("vdc") && w.contains("12ab")),
            "{:?}",
            s.warnings
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("vde") && w.contains("size")),
            "{:?}",
            s.warnings
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("vde") && w.contains("serial")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn a_missing_block_directory_is_an_empty_scan_with_a_warning() {
        let s = scan(Path::new("/definitely/not/here"));
        assert!(s.devices.is_empty());
        assert_eq!(s.warnings.len(), 1);
    }
}
