//! Makes the host appliance's directories and tables agree (docs/host.md). Run by an instance
//! when it becomes active, before it takes commands (and by `reconcile` once that exists):
//!
//! - every host mapping whose device the monitor's table shows (found by the volume's serial,
//!   never by a stored device name the kernel may have given to another disk) has its
//!   persistent name, pointing at the device's by-id link (else its node), and (exports on)
//!   its export entry and an active `nbd_exports` row;
//! - a host mapping whose device is not there loses a persistent name that points at a device
//!   node (that name may now be another disk's); one through a by-id link leads nowhere
//!   meanwhile and stays;
//! - an active `nbd_exports` row of a volume no longer attached to the host VM is removed;
//! - an entry of either directory that belongs to no host mapping is removed.
//!
//! Every repair is logged. Rows are written in fenced transactions, so an instance that lost
//! the lease meanwhile repairs nothing in the tables. The caller holds the host files' lock.

use std::collections::HashSet;

use schema::event::{Change, ChangeKind, NbdExport};

use crate::db::exports::HostLinkRow;
use crate::db::store::{Store, StoreError};
use crate::devices::Devices;
use crate::host::{HostError, HostFiles, persistent_name, target_of};

/// What the reconcile repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Repairs {
    /// Persistent names or export entries made or re-pointed.
    pub links: usize,
    /// Rows written (a missing persistent name or active export recorded).
    pub rows: usize,
    /// Exports of volumes no longer on the host VM, removed with their row.
    pub dropped: usize,
    /// Entries that belonged to no host mapping, removed.
    pub strays: usize,
    /// The `nbd_exports` rows recorded or removed, as a reconcile reports them.
    pub exports: Vec<Change>,
}

fn export_change(volume: schema::VolumeId, what: ChangeKind, name: &str) -> Change {
    let name = Some(name.to_owned());
    let (before, after) = match what {
        ChangeKind::ExportRemoved => (name, None),
        _ => (None, name),
    };
    Change {
        volume_id: volume,
        vm_id: None,
        what,
        before,
        after,
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Files(#[from] HostError),
}

impl ReconcileError {
    /// Whether trying again may succeed: a database error that is not permanent (a dropped
    /// connection, a killed session, a lock wait). Fenced, a file error: no.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) | Self::Store(StoreError::Db(e)) => crate::retry::transient_db(e),
            Self::Store(StoreError::Abandoned) => true,
            _ => false,
        }
    }
}

pub(crate) async fn run(
    store: &Store,
    files: &HostFiles,
    devices: &Devices,
) -> Result<Repairs, ReconcileError> {
    let mut repairs = Repairs::default();
    let mappings = store.host_links().await?;
    let mut names: Vec<String> = mappings
        .iter()
        .filter_map(|m| m.persistent_device_name.clone())
        .collect();
    for m in &mappings {
        repair_mapping(store, files, devices, m, &mut names, &mut repairs).await?;
    }
    let on_host: HashSet<_> = mappings.iter().map(|m| m.volume_id).collect();
    if files.exports_on() {
        for row in store.active_exports().await? {
            if !on_host.contains(&row.volume_id) {
                tracing::warn!(volume = %row.volume_id, export = row.export_name, "export of a volume not attached to the host VM: removed");
                files.unlink(row.volume_id, None).await?;
                store.drop_export(row.volume_id).await?;
                repairs.dropped += 1;
                repairs.exports.push(export_change(
                    row.volume_id,
                    ChangeKind::ExportRemoved,
                    &row.export_name,
                ));
            }
        }
    }
    let wanted: HashSet<String> = on_host.iter().map(|v| NbdExport::name_of(*v)).collect();
    for entry in files.export_entries().await? {
        if !wanted.contains(&entry) {
            tracing::warn!(
                entry,
                "stray export entry (no host attachment has it): removed"
            );
            files.remove_stray(true, &entry).await?;
            repairs.strays += 1;
        }
    }
    let kept: HashSet<&String> = names.iter().collect();
    for entry in files.persistent_entries().await? {
        if !kept.contains(&entry) {
            tracing::warn!(
                entry,
                "stray persistent name (no host attachment has it): removed"
            );
            files.remove_stray(false, &entry).await?;
            repairs.strays += 1;
        }
    }
    Ok(repairs)
}

/// One host mapping: its files made right, a missing name or export row recorded. A mapping
/// whose device is not known (missing) keeps what it has.
async fn repair_mapping(
    store: &Store,
    files: &HostFiles,
    devices: &Devices,
    m: &HostLinkRow,
    names: &mut Vec<String>,
    repairs: &mut Repairs,
) -> Result<(), ReconcileError> {
    let serial = m.volume_id.disk_serial();
    let Some(device) = devices.named(&serial) else {
        drop_node_link(files, devices, m).await?;
        return Ok(());
    };
    let target = target_of(devices, &device, Some(&serial), None).await;
    let recorded = m.persistent_device_name.clone();
    let name = match &recorded {
        Some(n) => n.clone(),
        None => {
            let n = persistent_name(m.volume_id, names);
            names.push(n.clone());
            n
        }
    };
    if files.ensure(m.volume_id, &name, &target).await? {
        tracing::warn!(volume = %m.volume_id, name, target = %target.path().display(), "persistent name or export entry was missing or wrong: repaired");
        repairs.links += 1;
    }
    let path = files.persistent_path(&name);
    let export = files.export_of(m.volume_id, &path);
    let has_row = match &export {
        Some(_) => store.has_active_export(m.volume_id).await?,
        None => true,
    };
    if recorded.is_some() && has_row {
        return Ok(());
    }
    let shown = path.display().to_string();
    let added = export.filter(|_| !has_row);
    let new_name = recorded.is_none().then_some(name.as_str());
    let new_export = added.as_ref().map(|e| e.name.as_str());
    store
        .record_host_files(m.volume_id, new_name, new_export, &shown)
        .await?;
    if let Some(e) = added {
        repairs
            .exports
            .push(export_change(m.volume_id, ChangeKind::ExportAdded, &e.name));
    }
    tracing::warn!(volume = %m.volume_id, name, "host mapping's persistent name or export row was missing: recorded");
    repairs.rows += 1;
    Ok(())
}

/// A host mapping whose device is not there: a persistent name of it that points at a device
/// node is removed (the kernel may give that name to another disk). Its export entry stays,
/// leading nowhere until the device is back.
async fn drop_node_link(
    files: &HostFiles,
    devices: &Devices,
    m: &HostLinkRow,
) -> Result<(), ReconcileError> {
    let Some(name) = &m.persistent_device_name else {
        return Ok(());
    };
    let Some(points_at) = files.points_at(name).await else {
        return Ok(());
    };
    if devices.is_node(&points_at) {
        tracing::warn!(volume = %m.volume_id, name, target = %points_at.display(), "persistent name points at a device node but the volume's device is not there: removed");
        files.remove_persistent(name).await?;
    }
    Ok(())
}
