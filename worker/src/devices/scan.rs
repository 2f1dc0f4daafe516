//! One scan of `$SYSFS_ROOT/block`: the `vd*` (virtio-blk) and `sd*` (virtio-scsi) devices
//! (or the names a [`NameFilter`] admits) with their size, serial and controller. A device of
//! size 0 has no medium (a detached loop device, an empty drive): it counts as absent.
//!
//! A virtio-blk disk shows its serial in `serial`; a SCSI disk has no such file, its serial is
//! the unit serial number VPD page (0x80) in `device/vpd_pg80`: a 4-byte header (peripheral
//! type, page code 0x80, 16-bit length) then the serial, space-padded.
//!
//! Entries may be directories (the simulator's layout) or symlinks into `devices/` (a real
//! guest: `/sys/block/vdb -> ../devices/pci0000:00/0000:00:06.0/virtio4/block/vdb`). Files that
//! cannot be read, or are half-written, leave that field unknown and produce a warning; a scan
//! never fails because of one device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Which entries of `block` a scan reads.
#[derive(Clone, Default)]
pub enum NameFilter {
    /// `vd*` and `sd*`: the disks a CloudStack VM gets (the daemon's filter).
    #[default]
    Disks,
    /// Names the predicate admits (the benchmark's and tests' loop devices).
    Only(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl NameFilter {
    pub fn admits(&self, name: &str) -> bool {
        match self {
            Self::Disks => name.starts_with("vd") || name.starts_with("sd"),
            Self::Only(admit) => admit(name),
        }
    }
}

impl std::fmt::Debug for NameFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disks => "Disks",
            Self::Only(_) => "Only(..)",
        })
    }
}

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
    /// `block` itself could not be read: the scan saw nothing, which says nothing.
    pub unreadable: bool,
}

/// Reads `root/block`. A `block` directory that cannot be read is an empty scan marked
/// `unreadable`, with a warning.
pub fn scan(root: &Path) -> Scan {
    scan_filtered(root, &NameFilter::Disks)
}

/// [`scan`] of the names `filter` admits.
pub fn scan_filtered(root: &Path, filter: &NameFilter) -> Scan {
    let mut out = Scan::default();
    let block = root.join("block");
    let entries = match std::fs::read_dir(&block) {
        Ok(e) => e,
        Err(e) => {
            out.warnings
                .push(format!("cannot read {}: {e}", block.display()));
            out.unreadable = true;
            return out;
        }
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !filter.admits(&name) {
            continue;
        }
        // `join` then reading through the path follows a symlinked entry.
        let dir = block.join(&name);
        let size = read_size(&dir, &name, &mut out.warnings);
        if size == Some(0) {
            continue;
        }
        let serial = match read_serial(&dir) {
            Ok(serial) => serial,
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

/// The size in bytes (`size` counts 512-byte sectors); `None`, with a warning, when it cannot
/// be read or is half-written.
fn read_size(dir: &Path, name: &str, warnings: &mut Vec<String>) -> Option<u64> {
    match std::fs::read_to_string(dir.join("size")) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(sectors) => Some(sectors.saturating_mul(512)),
            Err(_) => {
                warnings.push(format!(
                    "{name}: size {:?} is not a number (half-written?)",
                    s.trim()
                ));
                None
            }
        },
        Err(e) => {
            warnings.push(format!("{name}: cannot read size: {e}"));
            None
        }
    }
}

/// The disk serial: `serial` (virtio-blk), else the VPD page 0x80 (SCSI). `Ok(None)` when the
/// device has neither (many disks have no serial: not worth a warning).
fn read_serial(dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(dir.join("serial")) {
        Ok(s) => return Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    match std::fs::read(dir.join("device").join("vpd_pg80")) {
        Ok(page) => Ok(unit_serial(&page)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The serial of a unit serial number VPD page (SPC: byte 1 = 0x80, bytes 2-3 = length).
fn unit_serial(page: &[u8]) -> Option<String> {
    let (header, rest) = page.split_at_checked(4)?;
    if header[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let serial = rest.get(..len).unwrap_or(rest);
    let text = String::from_utf8_lossy(serial);
    Some(
        text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_owned(),
    )
    .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_tree::Tree;

    /// A virtio-scsi disk: `block/sdb` with no `serial` file, its serial in `device/vpd_pg80`.
    #[test]
    fn a_scsi_disk_is_read_with_its_serial_from_the_vpd_page() {
        let t = Tree::new();
        t.add_scsi("sdb", "2097152\n", "3106013ae175423ea090");
        // Not a disk of ours: ignored.
        std::fs::create_dir_all(t.0.join("block/loop0")).expect("loop");

        let s = scan(&t.0);

        assert_eq!(s.devices.keys().collect::<Vec<_>>(), ["sdb"]);
        let d = &s.devices["sdb"];
        assert_eq!(d.serial.as_deref(), Some("3106013ae175423ea090"));
        assert_eq!(d.size, Some(1 << 30));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn a_vpd_page_that_is_not_page_0x80_or_is_short_gives_no_serial() {
        assert_eq!(unit_serial(&[0, 0x83, 0, 4, b'a', b'b', b'c', b'd']), None);
        assert_eq!(unit_serial(&[0, 0x80]), None);
        assert_eq!(unit_serial(&[0, 0x80, 0, 0]), None);
        assert_eq!(
            unit_serial(&[0, 0x80, 0, 9, b'a', b'b']).as_deref(),
            Some("ab")
        );
    }

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
        std::fs::create_dir_all(t.0.join("block/sr0")).expect("cd-rom");
        std::fs::create_dir_all(t.0.join("block/loop0")).expect("loop");
        let s = scan(&t.0);
        assert_eq!(s.devices.len(), 1, "only vd* and sd* devices");
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
