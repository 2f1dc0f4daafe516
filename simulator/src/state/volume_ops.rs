//! Snapshots and resize, with CloudStack's rules (docs/cloudstack.md):
//! - `createSnapshot` (async, answers the snapshot's id and job): the volume must be `Ready`
//!   (attached once); on KVM a volume whose VM is running fails the job with 530 unless
//!   `kvm.snapshot.enabled` is on. The snapshot is `Allocated`, then `BackedUp` when the job
//!   ends, and (with a sysfs root) keeps a copy of the volume's backing file.
//! - `revertSnapshot` (async): the snapshot must be `BackedUp` and (KVM) the volume detached or
//!   its VM stopped; the volume's backing file gets the snapshot's data back, in place.
//! - `deleteSnapshot` (async): the snapshot becomes `Destroyed` and leaves `listSnapshots`.
//! - `resizeVolume` (async, `size` in GiB): a smaller size needs `shrinkok=true`; the job grows
//!   (or shrinks) the volume, its backing file and, on the host VM, the guest device's size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use schema::{SnapshotId, VolumeId};

use super::{
    ApiError, GIB, Inner, JobState, Sim, cs_time, find_volume, new_job, parse_id, required,
};
use crate::sysfs;

#[derive(Debug, Clone)]
pub(super) struct SimSnapshot {
    id: SnapshotId,
    volume: VolumeId,
    name: String,
    state: &'static str,
    created: DateTime<Utc>,
    last_job: Option<String>,
}

/// What CloudStack's KVM snapshot code says when `kvm.snapshot.enabled` is off.
pub const KVM_SNAPSHOT_DISABLED: &str = "KVM Snapshot is not supported for Running VMs. It is disabled by default due to a possible volume corruption in certain cases. To enable it set global settings kvm.snapshot.enabled to True. See the documentation for more details.";

impl Sim {
    /// Turns `kvm.snapshot.enabled` on or off.
    pub fn set_kvm_snapshot_enabled(&self, on: bool) {
        self.lock().kvm_snapshot_enabled = on;
    }

    /// The snapshots of `volume` that exist (not destroyed): (id, state).
    pub fn snapshots_of(&self, volume: VolumeId) -> Vec<(SnapshotId, String)> {
        let inner = self.lock();
        let mut found: Vec<&SimSnapshot> = inner
            .snapshots
            .values()
            .filter(|s| s.volume == volume && s.state != "Destroyed")
            .collect();
        found.sort_by_key(|s| s.created);
        found.iter().map(|s| (s.id, s.state.to_owned())).collect()
    }

    pub fn create_snapshot(
        self: &Arc<Self>,
        p: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let volume = parse_id(
            required(p, "volumeid", "createsnapshot")?,
            "volumeid",
            VolumeId::parse,
        )?;
        let mut inner = self.lock();
        let vol = find_volume(&inner, volume)?;
        if vol.state != "Ready" {
            return Err(ApiError::param(format!(
                "VolumeId: {volume} is not in Ready state but {}. Cannot take snapshot.",
                vol.state
            )));
        }
        let running = vol
            .vm
            .and_then(|vm| inner.vms.get(&vm))
            .is_some_and(|vm| vm.running);
        let refused = running && !inner.kvm_snapshot_enabled;
        let id = SnapshotId::new_random();
        let name = p
            .get("name")
            .cloned()
            .unwrap_or_else(|| format!("{}_{}", vol.name, Utc::now().format("%Y%m%d%H%M%S")));
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.snapshot.CreateSnapshotCmd",
            Some(volume),
        );
        inner.snapshots.insert(
            id,
            SimSnapshot {
                id,
                volume,
                name,
                state: "Allocated",
                created: Utc::now(),
                last_job: Some(job_id.clone()),
            },
        );
        let fails = inner.faults.job_fails();
        drop(inner);
        let root = self.config.sysfs_root.clone();
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| {
                format!("Failed to create snapshot of volume {volume}: injected job failure")
            }),
            move |inner| {
                if refused {
                    if let Some(s) = inner.snapshots.get_mut(&id) {
                        s.state = "Error";
                    }
                    return Err((530, KVM_SNAPSHOT_DISABLED.to_owned()));
                }
                if let Some(root) = &root {
                    copy_if_present(
                        &sysfs::backing_file(root, &volume.to_string()),
                        &snapshot_file(root, id),
                    )
                    .map_err(|e| (530, format!("cannot copy volume {volume}: {e}")))?;
                }
                inner
                    .snapshots
                    .get_mut(&id)
                    .ok_or((530, format!("snapshot {id} vanished")))?
                    .state = "BackedUp";
                let snap = find_snapshot(inner, id).map_err(|e| (530, e.text))?;
                Ok(json!({"snapshot": snapshot_json(snap, inner)}))
            },
        );
        Ok(json!({"id": id, "jobid": job_id}))
    }

    pub fn list_snapshots(&self, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let volume = p
            .get("volumeid")
            .map(|s| parse_id(s, "volumeid", VolumeId::parse))
            .transpose()?;
        let id = p
            .get("id")
            .map(|s| parse_id(s, "id", SnapshotId::parse))
            .transpose()?;
        let inner = self.lock();
        let mut found: Vec<&SimSnapshot> = inner
            .snapshots
            .values()
            .filter(|s| s.state != "Destroyed")
            .filter(|s| volume.is_none_or(|v| s.volume == v))
            .filter(|s| id.is_none_or(|id| s.id == id))
            .filter(|s| p.get("name").is_none_or(|n| &s.name == n))
            .collect();
        if found.is_empty() {
            return Ok(json!({}));
        }
        found.sort_by_key(|s| s.created);
        let items: Vec<Value> = found.iter().map(|s| snapshot_json(s, &inner)).collect();
        Ok(json!({"count": items.len(), "snapshot": items}))
    }

    pub fn revert_snapshot(
        self: &Arc<Self>,
        p: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let id = parse_id(
            required(p, "id", "revertsnapshot")?,
            "id",
            SnapshotId::parse,
        )?;
        let mut inner = self.lock();
        let snap = find_snapshot(&inner, id)?;
        if snap.state != "BackedUp" {
            return Err(ApiError::param(format!(
                "Snapshot {id} is {}: only a BackedUp snapshot can be reverted to",
                snap.state
            )));
        }
        let volume = snap.volume;
        let vol = find_volume(&inner, volume)?;
        if let Some(vm) = vol.vm
            && inner.vms.get(&vm).is_some_and(|m| m.running)
        {
            return Err(ApiError::param(format!(
                "Volume {volume} is attached to VM {vm}, which is running: detach the volume or stop the VM before reverting it to a snapshot"
            )));
        }
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.snapshot.RevertSnapshotCmd",
            Some(volume),
        );
        if let Some(s) = inner.snapshots.get_mut(&id) {
            s.last_job = Some(job_id.clone());
        }
        let fails = inner.faults.job_fails();
        drop(inner);
        let root = self.config.sysfs_root.clone();
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to revert snapshot {id}: injected job failure")),
            move |inner| {
                if let Some(root) = &root {
                    copy_if_present(
                        &snapshot_file(root, id),
                        &sysfs::backing_file(root, &volume.to_string()),
                    )
                    .map_err(|e| (530, format!("cannot revert volume {volume}: {e}")))?;
                }
                let snap = find_snapshot(inner, id).map_err(|e| (530, e.text))?;
                Ok(json!({"snapshot": snapshot_json(snap, inner)}))
            },
        );
        Ok(json!({"jobid": job_id}))
    }

    pub fn delete_snapshot(
        self: &Arc<Self>,
        p: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let id = parse_id(
            required(p, "id", "deletesnapshot")?,
            "id",
            SnapshotId::parse,
        )?;
        let mut inner = self.lock();
        let volume = find_snapshot(&inner, id)?.volume;
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.snapshot.DeleteSnapshotCmd",
            Some(volume),
        );
        if let Some(s) = inner.snapshots.get_mut(&id) {
            s.last_job = Some(job_id.clone());
        }
        let fails = inner.faults.job_fails();
        drop(inner);
        let root = self.config.sysfs_root.clone();
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to delete snapshot {id}: injected job failure")),
            move |inner| {
                let snap = inner
                    .snapshots
                    .get_mut(&id)
                    .ok_or((530, format!("snapshot {id} vanished")))?;
                snap.state = "Destroyed";
                if let Some(root) = &root {
                    let _ = std::fs::remove_file(snapshot_file(root, id));
                }
                Ok(json!({"success": true}))
            },
        );
        Ok(json!({"jobid": job_id}))
    }

    pub fn resize_volume(self: &Arc<Self>, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let volume = parse_id(required(p, "id", "resizevolume")?, "id", VolumeId::parse)?;
        let size = required(p, "size", "resizevolume")?;
        let Some(gib) = size.parse::<u64>().ok().filter(|g| *g >= 1) else {
            return Err(ApiError::param(format!(
                "Invalid size {size}: must be a whole number of GiB, at least 1"
            )));
        };
        let shrink_ok = p.get("shrinkok").is_some_and(|s| s == "true");
        let mut inner = self.lock();
        let vol = find_volume(&inner, volume)?;
        let new_bytes = gib * GIB;
        if new_bytes < vol.size_bytes && !shrink_ok {
            return Err(ApiError::param(format!(
                "Going from existing size of {} GB to size of {gib} GB would shrink the volume. Need to sign off by supplying the shrinkok parameter with value of true.",
                vol.size_bytes / GIB
            )));
        }
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.volume.ResizeVolumeCmd",
            Some(volume),
        );
        let fails = inner.faults.job_fails();
        drop(inner);
        let root = self.config.sysfs_root.clone();
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to resize volume {volume}: injected job failure")),
            move |inner| {
                let vol = inner
                    .volumes
                    .get_mut(&volume)
                    .ok_or((530, format!("volume {volume} vanished")))?;
                vol.size_bytes = new_bytes;
                if let Some(root) = &root {
                    grow(root, volume, inner.device_names.get(&volume), new_bytes)
                        .map_err(|e| (530, format!("cannot resize volume {volume}: {e}")))?;
                }
                Ok(super::volume_json_by_id(volume, inner))
            },
        );
        Ok(json!({"jobid": job_id}))
    }
}

/// A snapshot that exists, else CloudStack's answer for an unknown id.
fn find_snapshot(inner: &Inner, id: SnapshotId) -> Result<&SimSnapshot, ApiError> {
    inner
        .snapshots
        .get(&id)
        .filter(|s| s.state != "Destroyed")
        .ok_or_else(|| ApiError::unknown_id(format!("Unable to find snapshot by id {id}")))
}

fn snapshot_json(s: &SimSnapshot, inner: &Inner) -> Value {
    let job_status = s
        .last_job
        .as_ref()
        .and_then(|j| inner.jobs.get(j))
        .map(|j| match j.state {
            JobState::Pending => 0,
            JobState::Succeeded(_) => 1,
            JobState::Failed { .. } => 2,
        });
    let volume = inner.volumes.get(&s.volume);
    json!({
        "id": s.id, "name": s.name, "volumeid": s.volume,
        "volumename": volume.map(|v| v.name.clone()), "volumetype": volume.map(|v| v.kind),
        "state": s.state, "created": cs_time(s.created), "snapshottype": "MANUAL",
        "intervaltype": "MANUAL", "locationtype": "PRIMARY", "zoneid": crate::ZONE_ID,
        "jobid": s.last_job, "jobstatus": job_status,
    })
}

/// Where a snapshot's copy of the volume's data is kept.
fn snapshot_file(root: &Path, id: SnapshotId) -> PathBuf {
    root.join("snapshots").join(format!("{id}.img"))
}

/// Copies `from` over `to` in place (same inode: a device node or link to `to` still leads to
/// it), when `from` exists (a volume never attached to the host VM has no backing file).
fn copy_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.exists() {
        return Ok(());
    }
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to).map(|_| ())
}

/// The volume's backing file and, when it is on the host VM, its guest device grow to
/// `bytes` (the device's `size` is in 512-byte sectors, as the kernel reports it).
fn grow(root: &Path, volume: VolumeId, device: Option<&String>, bytes: u64) -> std::io::Result<()> {
    let backing = sysfs::backing_file(root, &volume.to_string());
    if backing.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&backing)?
            .set_len(bytes)?;
    }
    if let Some(name) = device {
        let size = root.join("block").join(name).join("size");
        if size.exists() {
            std::fs::write(size, format!("{}\n", bytes / 512))?;
        }
    }
    Ok(())
}
