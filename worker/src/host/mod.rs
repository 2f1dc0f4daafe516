//! The host appliance's files (docs/host.md): for every attachment to the VM this daemon runs
//! on, a **persistent device name** (`$PERSISTENT_DEVICE_DIR/vol<hex>`, a symlink to the
//! device's by-id link, else to `/dev/vdX`) and, with `NBD_EXPORT_DIR` set, an **NBD export**
//! (`$NBD_EXPORT_DIR/migration-vol-<volume_id>`, a symlink to the persistent name) that an NBD
//! server serving the directory (`nbdkit file dir=`) picks up with no reload.
//!
//! Only the active instance calls this module. It touches nothing but those two directories,
//! and only the entries of the volume it is asked about: a detach from another VM never reaches
//! here (the v1.2.1 lesson of the old daemon). Making the directories and the tables agree when
//! an instance becomes active is `operation::host_files` (it reads tables; this module does not).

mod links;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use schema::VolumeId;
use schema::event::NbdExport;

use crate::devices::Devices;

/// `NBD_URL`: `nbd://host[:port]`, how clients reach the NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    base: String,
    host: String,
    port: u16,
}

impl NbdUrl {
    /// The URL of export `name`: `nbd://host:port/<name>`.
    pub fn export_url(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    /// Whether something accepts connections at the server's address (`/ready`'s `nbd`).
    pub async fn reachable(&self) -> bool {
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        matches!(
            tokio::time::timeout(Duration::from_secs(1), connect).await,
            Ok(Ok(_))
        )
    }
}

impl FromStr for NbdUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| format!("{s:?} is not an nbd:// URL"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("{s:?}: expected nbd://host[:port] with no path"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{s:?}: port {p:?} is not a number up to 65535"))?,
            ),
            _ => (authority, 10809),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            base: format!("nbd://{authority}"),
            host,
            port,
        })
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// The two directories and how the exports are reached. Clones share the lock and the record
/// of links to device nodes.
#[derive(Debug, Clone)]
pub struct HostFiles {
    persistent_dir: PathBuf,
    export_dir: Option<PathBuf>,
    nbd_url: NbdUrl,
    /// Persistent names pointing at a device node, by name: this process made or checked them
    /// (an instance that becomes active repairs, and so records, every host mapping's name).
    node_links: Arc<Mutex<HashMap<String, NodeLink>>>,
    /// Held by whatever changes these files and the rows that describe them, from the change
    /// to its commit: a host attach or detach until its outcome is committed, a reconcile, the
    /// repair at activation, the mapping sync's re-pointing and node-link checks. So none of
    /// them acts on a snapshot another is about to make untrue (a fresh export taken for a
    /// stray, a detached volume's links made again).
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// What a host attachment has on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLinks {
    /// `vol<hex>`.
    pub persistent_name: String,
    /// `$PERSISTENT_DEVICE_DIR/<persistent_name>`.
    pub persistent_path: PathBuf,
    pub export: Option<ExportEntry>,
}

/// An entry of `NBD_EXPORT_DIR`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportEntry {
    pub name: String,
    /// What the entry points at: the persistent path.
    pub target_path: PathBuf,
    pub url: String,
}

impl ExportEntry {
    pub fn event(&self) -> NbdExport {
        NbdExport {
            name: self.name.clone(),
            url: self.url.clone(),
        }
    }
}

/// A file operation of this module that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct HostError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn at(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HostError {
    let path = path.to_owned();
    move |source| HostError { what, path, source }
}

/// The persistent name of `volume`: `vol` and the first 8 hex digits of its id, then 12, then
/// all 32 when another attached volume holds the shorter one (`in_use`).
pub(crate) fn persistent_name(volume: VolumeId, in_use: &[String]) -> String {
    let hex = volume.as_uuid().simple().to_string();
    [8, 12, 32]
        .into_iter()
        .map(|n| format!("vol{}", &hex[..n]))
        .find(|name| !in_use.contains(name))
        .unwrap_or_else(|| format!("vol{hex}"))
}

/// What a persistent name points at (docs/host.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// udev's by-id link of the device: named by the serial, it leads only to that disk,
    /// follows it across renames and goes with it.
    ById(PathBuf),
    /// The device node (`$DEVICE_NODE_DIR/<device>`), when no by-id link came within
    /// `BY_ID_LINK_WAIT_MS`. The kernel reuses names, so such a link is checked against the
    /// serial the device had (`None`: a serial-less disk) at every scan, and removed once the
    /// device is gone or carries another serial ([`HostFiles::node_links`]).
    Node {
        path: PathBuf,
        device: String,
        serial: Option<String>,
    },
}

impl Target {
    pub fn path(&self) -> &Path {
        match self {
            Self::ById(p) | Self::Node { path: p, .. } => p,
        }
    }
}

/// The target for the device `device` that carries `serial` now: its by-id link when udev made
/// one, else its node. `wait`: give udev up to `BY_ID_LINK_WAIT_MS` to make the link (a fresh
/// attach); a repair takes what is there.
pub(crate) async fn target_of(
    devices: &Devices,
    device: &str,
    serial: Option<&str>,
    wait: Option<&tokio_util::sync::CancellationToken>,
) -> Target {
    let link = match (serial, wait) {
        (None, _) => None,
        (Some(s), Some(shutdown)) => devices.wait_by_id_link(s, shutdown).await,
        (Some(s), None) => devices.by_id_link(s).await,
    };
    match link {
        Some(link) => Target::ById(link),
        None => Target::Node {
            path: devices.node(device),
            device: device.to_owned(),
            serial: serial.map(str::to_owned),
        },
    }
}

/// A persistent name that points at a device node: what it must still lead to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLink {
    pub volume: VolumeId,
    /// The persistent name (`vol<hex>`).
    pub name: String,
    pub device: String,
    pub serial: Option<String>,
}

impl HostFiles {
    pub fn new(persistent_dir: PathBuf, export_dir: Option<PathBuf>, nbd_url: NbdUrl) -> Self {
        Self {
            persistent_dir,
            export_dir,
            nbd_url,
            node_links: Arc::default(),
            lock: Arc::default(),
        }
    }

    /// Waits for the host files' lock (see the field).
    pub async fn lock(&self) -> OwnedMutexGuard<()> {
        self.lock.clone().lock_owned().await
    }

    /// The persistent names that point at a device node, to be checked at every scan.
    pub fn node_links(&self) -> Vec<NodeLink> {
        self.lock_node_links().values().cloned().collect()
    }

    fn lock_node_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeLink>> {
        self.node_links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the persistent name `name` of `volume` now points at.
    fn note_target(&self, volume: VolumeId, name: &str, target: &Target) {
        let mut links = self.lock_node_links();
        match target {
            Target::ById(_) => {
                links.remove(name);
            }
            Target::Node { device, serial, .. } => {
                links.insert(
                    name.to_owned(),
                    NodeLink {
                        volume,
                        name: name.to_owned(),
                        device: device.clone(),
                        serial: serial.clone(),
                    },
                );
            }
        }
    }

    pub fn exports_on(&self) -> bool {
        self.export_dir.is_some()
    }

    pub fn nbd_url(&self) -> &NbdUrl {
        &self.nbd_url
    }

    pub fn persistent_path(&self, name: &str) -> PathBuf {
        self.persistent_dir.join(name)
    }

    /// Creates both directories when missing (at start, so a wrong path fails early).
    pub async fn prepare(&self) -> Result<(), HostError> {
        let dirs = std::iter::once(&self.persistent_dir).chain(self.export_dir.as_ref());
        for dir in dirs {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(at("cannot create directory", dir))?;
        }
        Ok(())
    }

    /// The export entry `volume` has (or would have) when exports are on.
    pub fn export_of(&self, volume: VolumeId, persistent_path: &Path) -> Option<ExportEntry> {
        let name = NbdExport::name_of(volume);
        self.export_dir.as_ref().map(|_| ExportEntry {
            url: self.nbd_url.export_url(&name),
            name,
            target_path: persistent_path.to_owned(),
        })
    }

    /// Points the persistent name `name` of `volume` at `target` and, with exports on, makes
    /// the export entry point at the persistent name. Idempotent: a resumed attach, a re-attach
    /// and the reconcile all call it.
    #[tracing::instrument(name = "nbd.export", skip_all, fields(volume_id = %volume))]
    pub async fn link(
        &self,
        volume: VolumeId,
        name: &str,
        target: &Target,
    ) -> Result<HostLinks, HostError> {
        let persistent_path = self.persistent_path(name);
        links::replace(target.path(), &persistent_path)
            .await
            .map_err(at("cannot create the persistent name", &persistent_path))?;
        self.note_target(volume, name, target);
        let export = self.export_of(volume, &persistent_path);
        if let (Some(dir), Some(e)) = (&self.export_dir, &export) {
            let entry = dir.join(&e.name);
            links::replace(&persistent_path, &entry)
                .await
                .map_err(at("cannot create the export entry", &entry))?;
        }
        Ok(HostLinks {
            persistent_name: name.to_owned(),
            persistent_path,
            export,
        })
    }

    /// Removes `volume`'s export entry (first: no client can open it once its target is gone)
    /// and its persistent name `name`. Nothing else is touched.
    #[tracing::instrument(name = "nbd.unexport", skip_all, fields(volume_id = %volume))]
    pub async fn unlink(&self, volume: VolumeId, name: Option<&str>) -> Result<(), HostError> {
        if let Some(dir) = &self.export_dir {
            let entry = dir.join(NbdExport::name_of(volume));
            if links::remove(&entry)
                .await
                .map_err(at("cannot remove the export entry", &entry))?
            {
                tracing::info!(export = %entry.display(), "export removed");
            }
        }
        if let Some(name) = name {
            self.remove_persistent(name).await?;
        }
        Ok(())
    }

    /// Whether `volume`'s persistent name `name` points at `target` and, with exports on, its
    /// export entry at the persistent name; when not, makes them so and returns `true`.
    pub async fn ensure(
        &self,
        volume: VolumeId,
        name: &str,
        target: &Target,
    ) -> Result<bool, HostError> {
        let persistent_path = self.persistent_path(name);
        let link_ok = links::target(&persistent_path).await.as_deref() == Some(target.path());
        let export_ok = match &self.export_dir {
            None => true,
            Some(dir) => {
                let entry = dir.join(NbdExport::name_of(volume));
                links::target(&entry).await.as_deref() == Some(persistent_path.as_path())
            }
        };
        if link_ok && export_ok {
            self.note_target(volume, name, target);
            return Ok(false);
        }
        self.link(volume, name, target).await?;
        Ok(true)
    }

    /// Where the persistent name `name` points, if it exists.
    pub async fn points_at(&self, name: &str) -> Option<PathBuf> {
        links::target(&self.persistent_path(name)).await
    }

    /// Removes the persistent name `name` alone: its export entry, if any, stays and leads
    /// nowhere until the name is made again.
    pub async fn remove_persistent(&self, name: &str) -> Result<(), HostError> {
        let path = self.persistent_path(name);
        links::remove(&path)
            .await
            .map_err(at("cannot remove the persistent name", &path))?;
        self.lock_node_links().remove(name);
        Ok(())
    }

    /// Entries of the export directory (none with exports off).
    pub async fn export_entries(&self) -> Result<Vec<String>, HostError> {
        match &self.export_dir {
            None => Ok(Vec::new()),
            Some(dir) => links::entries(dir)
                .await
                .map_err(at("cannot list the export directory", dir)),
        }
    }

    /// Entries of the persistent-name directory.
    pub async fn persistent_entries(&self) -> Result<Vec<String>, HostError> {
        links::entries(&self.persistent_dir).await.map_err(at(
            "cannot list the persistent-name directory",
            &self.persistent_dir,
        ))
    }

    /// Removes a stray entry `name` of the export directory (`exports`) or of the persistent
    /// names.
    pub async fn remove_stray(&self, exports: bool, name: &str) -> Result<(), HostError> {
        let dir = match (&self.export_dir, exports) {
            (Some(d), true) => d,
            (None, true) => return Ok(()),
            (_, false) => &self.persistent_dir,
        };
        let path = dir.join(name);
        links::remove(&path)
            .await
            .map(|_| ())
            .map_err(at("cannot remove the stray entry", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_persistent_name_grows_only_on_a_clash() {
        let v = VolumeId::parse("3106013a-e175-423e-a090-0123456789ab").expect("id");
        assert_eq!(persistent_name(v, &[]), "vol3106013a");
        assert_eq!(
            persistent_name(v, &["vol3106013a".into()]),
            "vol3106013ae175"
        );
        assert_eq!(
            persistent_name(v, &["vol3106013a".into(), "vol3106013ae175".into()]),
            "vol3106013ae175423ea0900123456789ab"
        );
    }

    #[test]
    fn nbd_urls_are_parsed_with_a_default_port() {
        let u: NbdUrl = "nbd://127.0.0.1:10810".parse().expect("url");
        assert_eq!(
            u.export_url("migration-vol-x"),
            "nbd://127.0.0.1:10810/migration-vol-x"
        );
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 10810));
        let d: NbdUrl = "nbd://appliance/".parse().expect("url");
        assert_eq!(
            (d.host.as_str(), d.port, d.to_string().as_str()),
            ("appliance", 10809, "nbd://appliance")
        );
        for bad in ["http://x", "nbd://", "nbd://h:99999", "nbd://h/export"] {
            assert!(bad.parse::<NbdUrl>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn link_and_unlink_touch_only_the_volume_asked_about() {
        let root = std::env::temp_dir().join(format!("vd-host-{}", uuid::Uuid::new_v4().simple()));
        let files = HostFiles::new(
            root.join("devices"),
            Some(root.join("exports")),
            "nbd://127.0.0.1:10809".parse().expect("url"),
        );
        files.prepare().await.expect("dirs");
        let (a, b) = (VolumeId::new_random(), VolumeId::new_random());
        let node = |device: &str, v: VolumeId| Target::Node {
            path: PathBuf::from(format!("/dev/{device}")),
            device: device.to_owned(),
            serial: Some(v.disk_serial()),
        };
        let la = files
            .link(a, &persistent_name(a, &[]), &node("vdb", a))
            .await
            .expect("a");
        files
            .link(
                b,
                &persistent_name(b, &[]),
                &Target::ById(PathBuf::from("/dev/disk/by-id/virtio-b")),
            )
            .await
            .expect("b");
        let ea = la.export.clone().expect("exports on");
        assert_eq!(ea.name, format!("migration-vol-{a}"));
        assert_eq!(
            links::target(&root.join("exports").join(&ea.name)).await,
            Some(la.persistent_path.clone())
        );
        let noted: Vec<(VolumeId, String)> = (files.node_links().into_iter())
            .map(|l| (l.volume, l.device))
            .collect();
        assert_eq!(
            noted,
            vec![(a, "vdb".to_owned())],
            "only a's name points at a node"
        );
        assert!(
            files
                .ensure(a, &la.persistent_name, &node("vdd", a))
                .await
                .expect("re-point")
        );
        assert!(
            !files
                .ensure(a, &la.persistent_name, &node("vdd", a))
                .await
                .expect("same")
        );
        assert_eq!(files.node_links()[0].device, "vdd");

        files
            .unlink(a, Some(&la.persistent_name))
            .await
            .expect("unlink a");
        let left = links::entries(&root.join("exports")).await.expect("list");
        assert_eq!(
            left,
            vec![format!("migration-vol-{b}")],
            "b's export untouched"
        );
        let left = links::entries(&root.join("devices")).await.expect("list");
        assert_eq!(left, vec![persistent_name(b, &[])]);
        assert!(files.node_links().is_empty(), "a's node link is forgotten");
        tokio::fs::remove_dir_all(&root).await.expect("clean up");
    }
}
