//! The guest side of a hot-plugged virtio disk (CONTRACT §7): attaching a volume to the host VM
//! creates `block/vdX/{size,serial,device}` under the simulator's sysfs root; detaching removes
//! it.

use std::io;
use std::path::{Path, PathBuf};

/// Creates `root/block/<name>` atomically: the directory is filled under a temporary name and
/// renamed into place, so a scanner never sees it half-written.
pub fn create_device(
    root: &Path,
    name: &str,
    serial: &str,
    size_bytes: u64,
    controller: u32,
) -> io::Result<PathBuf> {
    let block = root.join("block");
    let controller_dir = root.join("devices").join(format!("virtio{controller}"));
    std::fs::create_dir_all(&block)?;
    std::fs::create_dir_all(&controller_dir)?;
    let tmp = block.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)?;
    std::fs::write(tmp.join("size"), format!("{}\n", size_bytes / 512))?;
    std::fs::write(tmp.join("serial"), format!("{serial}\n"))?;
    std::os::unix::fs::symlink(
        format!("../../devices/virtio{controller}"),
        tmp.join("device"),
    )?;
    let dest = block.join(name);
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

/// The backing file of `volume` under `root` (what its by-id link points at).
pub fn backing_file(root: &Path, volume: &str) -> PathBuf {
    root.join("backing").join(format!("{volume}.img"))
}

/// Creates the sparse backing file of `volume` (when missing: it keeps the volume's content
/// across attaches) and points `by_id_dir/virtio-<serial>` at it, atomically.
pub fn create_backing(
    root: &Path,
    by_id_dir: &Path,
    volume: &str,
    serial: &str,
    size_bytes: u64,
) -> io::Result<PathBuf> {
    let file = backing_file(root, volume);
    std::fs::create_dir_all(root.join("backing"))?;
    std::fs::create_dir_all(by_id_dir)?;
    if !file.exists() {
        std::fs::File::create(&file)?.set_len(size_bytes)?;
    }
    let link = by_id_dir.join(format!("virtio-{serial}"));
    let tmp = by_id_dir.join(format!(".virtio-{serial}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&file, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    Ok(link)
}

/// Removes the by-id link of `serial` (the device left the host VM).
pub fn remove_by_id(by_id_dir: &Path, serial: &str) -> io::Result<()> {
    match std::fs::remove_file(by_id_dir.join(format!("virtio-{serial}"))) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the backing file of a deleted volume.
pub fn remove_backing(root: &Path, volume: &str) -> io::Result<()> {
    match std::fs::remove_file(backing_file(root, volume)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn remove_device(root: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_dir_all(root.join("block").join(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The first `vdX` name (from `vdb`: `vda` is the root disk) that is neither in use under
/// `root/block` nor in `taken`.
pub fn next_free_name(root: &Path, taken: &[String]) -> String {
    let exists = |n: &str| root.join("block").join(n).exists() || taken.iter().any(|t| t == n);
    let letters = |i: usize| -> String {
        // vdb … vdz, then vdaa, vdab, … as the kernel names them.
        if i < 26 {
            ((b'a' + i as u8) as char).to_string()
        } else {
            let (hi, lo) = ((i / 26) - 1, i % 26);
            format!("{}{}", (b'a' + hi as u8) as char, (b'a' + lo as u8) as char)
        }
    };
    (1..702)
        .map(|i| format!("vd{}", letters(i)))
        .find(|n| !exists(n))
        .unwrap_or_else(|| "vdzz".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_removes_a_device_with_the_contract_layout() {
        let dir = std::env::temp_dir().join(format!("sim-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(next_free_name(&dir, &[]), "vdb");
        let path = create_device(&dir, "vdb", "3106013ae175423ea090", 1 << 30, 4).expect("create");
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
        assert_eq!(next_free_name(&dir, &[]), "vdc");
        assert_eq!(next_free_name(&dir, &["vdc".into()]), "vdd");
        remove_device(&dir, "vdb").expect("remove");
        assert!(!path.exists());
        remove_device(&dir, "vdb").expect("removing twice is fine");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
