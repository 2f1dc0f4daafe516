//! The guest side of a hot-plugged virtio disk (docs/host.md): attaching a volume to the host VM
//! creates `block/vdX/{size,serial,device}` under the simulator's sysfs root; detaching removes
//! it.

use std::io;
use std::path::{Path, PathBuf};

/// A guest disk as the simulator lays it out.
#[derive(Debug, Clone, Copy)]
pub struct Disk<'a> {
    /// `vdb` or `sdb`.
    pub name: &'a str,
    pub serial: &'a str,
    pub size_bytes: u64,
    /// The `virtioN` controller (its own directory under `devices/`).
    pub controller: u32,
    /// A virtio-scsi disk: no `serial` file, the serial in `device/vpd_pg80`.
    pub scsi: bool,
}

impl<'a> Disk<'a> {
    /// A virtio-blk disk.
    pub fn virtio(name: &'a str, serial: &'a str, size_bytes: u64, controller: u32) -> Self {
        Self {
            name,
            serial,
            size_bytes,
            controller,
            scsi: false,
        }
    }
}

/// Creates `root/block/<name>` atomically: the directory is filled under a temporary name and
/// renamed into place, so a scanner never sees it half-written.
pub fn create_device(root: &Path, disk: &Disk<'_>) -> io::Result<PathBuf> {
    let block = root.join("block");
    let controller_dir = root
        .join("devices")
        .join(format!("virtio{}", disk.controller));
    std::fs::create_dir_all(&block)?;
    std::fs::create_dir_all(&controller_dir)?;
    if disk.scsi {
        std::fs::write(controller_dir.join("vpd_pg80"), vpd_pg80(disk.serial))?;
    }
    let tmp = block.join(format!(".{}.tmp", disk.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)?;
    std::fs::write(tmp.join("size"), format!("{}\n", disk.size_bytes / 512))?;
    if !disk.scsi {
        std::fs::write(tmp.join("serial"), format!("{}\n", disk.serial))?;
    }
    std::os::unix::fs::symlink(
        format!("../../devices/virtio{}", disk.controller),
        tmp.join("device"),
    )?;
    let dest = block.join(disk.name);
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

/// The unit serial number VPD page (0x80) of a SCSI disk: a 4-byte header, then the serial.
fn vpd_pg80(serial: &str) -> Vec<u8> {
    let len = u16::try_from(serial.len()).unwrap_or(u16::MAX);
    let mut page = vec![0, 0x80];
    page.extend_from_slice(&len.to_be_bytes());
    page.extend_from_slice(serial.as_bytes());
    page
}

/// The backing file of `volume` under `root` (what its device node and by-id link lead to).
pub fn backing_file(root: &Path, volume: &str) -> PathBuf {
    root.join("backing").join(format!("{volume}.img"))
}

/// Creates the sparse backing file of `volume` when missing (it keeps the volume's content
/// across attaches, and goes with the volume).
pub fn create_backing(root: &Path, volume: &str, size_bytes: u64) -> io::Result<PathBuf> {
    let file = backing_file(root, volume);
    std::fs::create_dir_all(root.join("backing"))?;
    if !file.exists() {
        std::fs::File::create(&file)?.set_len(size_bytes)?;
    }
    Ok(file)
}

/// Where the device node of `name` is: `root/dev/<name>`, standing for `/dev/<name>` (the
/// daemon's `DEVICE_NODE_DIR` in the tests).
pub fn node_path(root: &Path, name: &str) -> PathBuf {
    root.join("dev").join(name)
}

/// Makes the device node `root/dev/<name>` lead to `file`, atomically (the kernel makes the
/// node with the device; a name reused by another disk leads to that disk).
pub fn create_node(root: &Path, name: &str, file: &Path) -> io::Result<()> {
    let node = node_path(root, name);
    std::fs::create_dir_all(root.join("dev"))?;
    replace_link(file, &node)
}

/// The by-id link name of a disk with `serial`, as udev names it.
pub fn by_id_name(serial: &str, scsi: bool) -> String {
    if scsi {
        format!("scsi-0QEMU_QEMU_HARDDISK_{serial}")
    } else {
        format!("virtio-{serial}")
    }
}

/// Points `by_id_dir/<name>` at `file`, atomically.
pub fn create_by_id(by_id_dir: &Path, name: &str, file: &Path) -> io::Result<()> {
    std::fs::create_dir_all(by_id_dir)?;
    replace_link(file, &by_id_dir.join(name))
}

/// `link` → `target`, made under a temporary name and renamed into place.
fn replace_link(target: &Path, link: &Path) -> io::Result<()> {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Removes the by-id links of `serial`, in both forms (the device left the host VM).
pub fn remove_by_id(by_id_dir: &Path, serial: &str) -> io::Result<()> {
    for scsi in [false, true] {
        match std::fs::remove_file(by_id_dir.join(by_id_name(serial, scsi))) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// Removes the backing file of a deleted volume.
pub fn remove_backing(root: &Path, volume: &str) -> io::Result<()> {
    match std::fs::remove_file(backing_file(root, volume)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the device `name` and its node.
pub fn remove_device(root: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(node_path(root, name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => other?,
    }
    match std::fs::remove_dir_all(root.join("block").join(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The first name with `prefix` (`vd`: from `vdb`, `vda` being the root disk; `sd`: from
/// `sda`) that is neither in use under `root/block` nor in `taken`.
pub fn next_free_name(root: &Path, prefix: &str, taken: &[String]) -> String {
    let exists = |n: &str| root.join("block").join(n).exists() || taken.iter().any(|t| t == n);
    let letters = |i: usize| -> String {
        // b … z, then aa, ab, … as the kernel names them.
        if i < 26 {
            ((b'a' + i as u8) as char).to_string()
        } else {
            let (hi, lo) = ((i / 26) - 1, i % 26);
            format!("{}{}", (b'a' + hi as u8) as char, (b'a' + lo as u8) as char)
        }
    };
    let first = if prefix == "vd" { 1 } else { 0 };
    (first..702)
        .map(|i| format!("{prefix}{}", letters(i)))
        .find(|n| !exists(n))
        .unwrap_or_else(|| format!("{prefix}zz"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_removes_a_device_with_the_contract_layout() {
        let dir = std::env::temp_dir().join(format!("sim-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(next_free_name(&dir, "vd", &[]), "vdb");
        assert_eq!(next_free_name(&dir, "sd", &[]), "sda");
        let disk = Disk {
            name: "vdb",
            serial: "3106013ae175423ea090",
            size_bytes: 1 << 30,
            controller: 4,
            scsi: false,
        };
        let path = create_device(&dir, &disk).expect("create");
        assert_eq!(
            std::fs::read_to_string(path.join("size"))
                .expect("size")
                .trim(),
            "2097152"
        );
        assert_eq!(
            std::fs::read_to_string(path.join("serial"))
                .expect("serial")
                .trim(),
            "3106013ae175423ea090"
        );
        let link = std::fs::read_link(path.join("device")).expect("device link");
        assert!(link.ends_with("virtio4"), "{link:?}");
        assert_eq!(next_free_name(&dir, "vd", &[]), "vdc");
        assert_eq!(next_free_name(&dir, "vd", &["vdc".into()]), "vdd");
        remove_device(&dir, "vdb").expect("remove");
        assert!(!path.exists());
        remove_device(&dir, "vdb").expect("removing twice is fine");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_scsi_disk_has_its_serial_in_the_vpd_page_and_no_serial_file() {
        let dir = std::env::temp_dir().join(format!("sim-sysfs-scsi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = Disk {
            name: "sda",
            serial: "3106013ae175423ea090",
            size_bytes: 1 << 20,
            controller: 7,
            scsi: true,
        };
        let path = create_device(&dir, &disk).expect("create");
        assert!(!path.join("serial").exists());
        let page = std::fs::read(path.join("device").join("vpd_pg80")).expect("vpd page");
        assert_eq!(&page[..4], &[0, 0x80, 0, 20]);
        assert_eq!(&page[4..], b"3106013ae175423ea090");
        assert_eq!(
            by_id_name("3106013ae175423ea090", true),
            "scsi-0QEMU_QEMU_HARDDISK_3106013ae175423ea090"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
