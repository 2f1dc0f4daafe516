//! Temporary sysfs trees for the device monitor's tests.

use std::os::unix::fs::symlink;
use std::path::PathBuf;

/// A temporary sysfs tree, removed on drop.
pub(crate) struct Tree(pub PathBuf);

impl Tree {
    pub(crate) fn new() -> Self {
        let p = std::env::temp_dir().join(format!("vd-scan-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(p.join("block")).expect("tree");
        Self(p)
    }

    /// The simulator's layout: `block/<name>/` is a directory.
    pub(crate) fn add_dir(
        &self,
        name: &str,
        sectors: &str,
        serial: Option<&str>,
        controller: &str,
    ) {
        Self::add_dir_at(&self.0, name, sectors, serial, controller);
    }

    pub(crate) fn add_dir_at(
        root: &std::path::Path,
        name: &str,
        sectors: &str,
        serial: Option<&str>,
        controller: &str,
    ) {
        let d = root.join("block").join(name);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("size"), sectors).expect("size");
        if let Some(s) = serial {
            std::fs::write(d.join("serial"), s).expect("serial");
        }
        std::fs::create_dir_all(root.join("devices").join(controller)).expect("ctrl");
        symlink(format!("../../devices/{controller}"), d.join("device")).expect("link");
    }

    /// A virtio-scsi disk: no `serial` file, the serial in the VPD page `device/vpd_pg80`.
    pub(crate) fn add_scsi(&self, name: &str, sectors: &str, serial: &str) {
        let d = self.0.join("block").join(name);
        std::fs::create_dir_all(d.join("device")).expect("dirs");
        std::fs::write(d.join("size"), sectors).expect("size");
        let len = u8::try_from(serial.len() + 2).expect("short serial");
        let mut page = vec![0x00, 0x80, 0x00, len];
        page.extend_from_slice(serial.as_bytes());
        page.extend_from_slice(b"  ");
        std::fs::write(d.join("device/vpd_pg80"), page).expect("vpd page");
    }

    /// A real guest's layout: `block/<name>` is a symlink into `devices/`.
    pub(crate) fn add_real(&self, name: &str, sectors: &str, serial: &str, controller: &str) {
        let real = self.0.join(format!(
            "devices/pci0000:00/0000:00:06.0/{controller}/block/{name}"
        ));
        std::fs::create_dir_all(&real).expect("real dir");
        std::fs::write(real.join("size"), sectors).expect("size");
        std::fs::write(real.join("serial"), serial).expect("serial");
        symlink(format!("../../../{controller}"), real.join("device")).expect("device link");
        symlink(
            format!("../devices/pci0000:00/0000:00:06.0/{controller}/block/{name}"),
            self.0.join("block").join(name),
        )
        .expect("block link");
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
