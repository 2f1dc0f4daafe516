//! `reconcile` (the old daemon's force-sync): make `device_mappings` and `nbd_exports` say what
//! CloudStack and the guest say (docs/wire.md). Only `listVolumes` is called; nothing in
//! CloudStack changes.
//!
//! In scope are one VM, or every VM that has mappings and the host VM. For each:
//! 1. CloudStack's attachments (`listVolumes virtualmachineid=`, root disks included: a boot
//!    volume the daemon attached at device 0 keeps its mapping).
//! 2. Each recorded mapping on a VM in scope: CloudStack no longer lists it there → it is
//!    looked up by id: on another VM (`mapping_moved`) or on none (`mapping_removed`). Still
//!    there and on the host VM → its device is compared with the monitor's table
//!    (`device_changed`).
//! 3. Each data disk CloudStack lists that no mapping records → `mapping_added` (a VM's own
//!    template root disk is not the daemon's and is never added).
//! 4. The host files and export rows are made to agree (`export_added`, `export_removed`).
//!
//! Each repair is committed on its own (fenced) and reported in the order it was made.

use std::collections::{BTreeSet, HashMap, HashSet};

use cloudstack::Volume;
use schema::api::{MappingMode, MappingView};
use schema::event::{Change, ChangeKind};
use schema::{VmId, VolumeId};

use super::outcome::Completed;
use super::{Halt, Operation, attach, detach, jobs};
use crate::cloud::{Session, classify};
use crate::context::Context;
use crate::mappings::{DeviceMapping, MappingChange};

pub(super) async fn run(
    ctx: &Context,
    _op: &Operation,
    scope: Option<VmId>,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let changes = reconcile(ctx, &cs, scope).await?;
    if changes.is_empty() {
        tracing::info!("reconcile: mappings agree with CloudStack and the guest");
    } else {
        tracing::warn!(changes = changes.len(), "reconcile repaired drift");
    }
    Ok(Completed::Reconciled { scope, changes })
}

/// Compares and repairs; returns what changed. Also the periodic reconcile's body.
pub(super) async fn reconcile(
    ctx: &Context,
    cs: &Session,
    scope: Option<VmId>,
) -> Result<Vec<Change>, Halt> {
    let read_mappings = || {
        ctx.db("read the mappings", || async {
            Ok(ctx.store.mappings(None).await?)
        })
    };
    let recorded = read_mappings().await?;
    let vms: BTreeSet<VmId> = match scope {
        Some(vm) => [vm].into(),
        None => recorded.iter().map(|m| m.vm_id).chain(cs.host_vm).collect(),
    };
    let _held = lock_scope(ctx, &vms).await;
    let recorded = read_mappings().await?;
    let mut listed: HashMap<VolumeId, (VmId, Volume)> = HashMap::new();
    for vm in &vms {
        for v in attached_to(cs, *vm).await? {
            listed.insert(v.id, (*vm, v));
        }
    }
    let mut changes = Vec::new();
    for m in recorded.iter().filter(|m| vms.contains(&m.vm_id)) {
        match listed.get(&m.volume_id) {
            Some((_, v)) => {
                if m.mode == MappingMode::Oma {
                    changes.extend(device_drift(ctx, cs, m, v).await?);
                }
            }
            None => changes.extend(gone_from(ctx, cs, m).await?),
        }
    }
    changes.extend(added(ctx, cs, &recorded, &listed).await?);
    let repairs = super::host_files::run(&ctx.store, &ctx.host, &ctx.devices)
        .await
        .map_err(|e| Halt::from(host_error(e)))?;
    changes.extend(repairs.exports);
    for c in &changes {
        ctx.metrics.reconcile_change(c.what);
    }
    Ok(changes)
}

/// The attachments CloudStack lists that no mapping records (made outside the daemon), recorded.
/// Only data disks are added: a VM's template root disk is not the daemon's. A root disk the
/// daemon attached (a boot volume at device 0) keeps its mapping.
async fn added(
    ctx: &Context,
    cs: &Session,
    recorded: &[MappingView],
    listed: &HashMap<VolumeId, (VmId, Volume)>,
) -> Result<Vec<Change>, Halt> {
    let known: HashSet<VolumeId> = recorded.iter().map(|m| m.volume_id).collect();
    let unknown = listed
        .values()
        .filter(|(_, v)| !known.contains(&v.id) && !v.is_root());
    let mut changes = Vec::new();
    for (vm, v) in unknown {
        let mapping = mapping_of(ctx, cs, *vm, v).await?;
        let export = upsert(ctx, mapping).await?;
        tracing::warn!(volume = %v.id, %vm, "reconcile: attachment made outside the daemon recorded");
        changes.push(change(
            v.id,
            Some(*vm),
            ChangeKind::MappingAdded,
            None,
            Some(vm.to_string()),
        ));
        changes.extend(export);
    }
    Ok(changes)
}

/// Serialises a reconcile with the attaches and detaches of `vms` (each holds its VM's lock
/// until its outcome is committed) and with everything that changes the host files: the VMs'
/// locks in order (no other holder takes two), then the host files'. What is read while they
/// are held cannot change under the repairs.
async fn lock_scope(
    ctx: &Context,
    vms: &BTreeSet<VmId>,
) -> (
    Vec<tokio::sync::OwnedMutexGuard<()>>,
    tokio::sync::OwnedMutexGuard<()>,
) {
    let mut held = Vec::with_capacity(vms.len());
    for vm in vms {
        held.push(ctx.lock_vm(*vm).await);
    }
    (held, ctx.host.lock().await)
}

/// The volumes CloudStack lists on `vm`, root disks included (a mapped boot volume is one).
async fn attached_to(cs: &Session, vm: VmId) -> Result<Vec<Volume>, Halt> {
    let volumes = cs
        .client
        .list_volumes(&[("virtualmachineid", vm.to_string())])
        .await
        .map_err(|e| classify(&e))?;
    Ok(volumes
        .into_iter()
        .filter(|v| v.virtualmachineid == Some(vm))
        .collect())
}

/// A recorded mapping CloudStack no longer lists on its VM: moved, or detached (or deleted).
/// A host attachment's export goes with it (`export_removed`).
async fn gone_from(ctx: &Context, cs: &Session, m: &MappingView) -> Result<Vec<Change>, Halt> {
    let now = match jobs::current(&cs.client, m.volume_id).await {
        Ok(v) => Some(v),
        Err(Halt::Fail(e, _)) if e.code == schema::ErrorCode::VolumeNotFound => None,
        Err(other) => return Err(other),
    };
    let mut changes = Vec::new();
    if m.mode == MappingMode::Oma {
        let exported = ctx
            .db("read the export", || async {
                Ok(ctx.store.has_active_export(m.volume_id).await?)
            })
            .await?;
        ctx.devices.release(m.volume_id);
        detach::release_host_files(ctx, m.volume_id, true).await?;
        if exported {
            let name = schema::event::NbdExport::name_of(m.volume_id);
            changes.push(change(
                m.volume_id,
                Some(m.vm_id),
                ChangeKind::ExportRemoved,
                Some(name),
                None,
            ));
        }
    }
    let mut found = moved_or_removed(ctx, cs, m, now).await?;
    found.extend(changes);
    Ok(found)
}

async fn moved_or_removed(
    ctx: &Context,
    cs: &Session,
    m: &MappingView,
    now: Option<Volume>,
) -> Result<Vec<Change>, Halt> {
    match now.and_then(|v| v.virtualmachineid.map(|vm| (vm, v))) {
        Some((other, v)) => {
            let mapping = mapping_of(ctx, cs, other, &v).await?;
            let export = upsert(ctx, mapping).await?;
            tracing::warn!(volume = %m.volume_id, from = %m.vm_id, to = %other, "reconcile: volume is on another VM");
            let moved = change(
                m.volume_id,
                Some(other),
                ChangeKind::MappingMoved,
                Some(m.vm_id.to_string()),
                Some(other.to_string()),
            );
            Ok([moved].into_iter().chain(export).collect())
        }
        None => {
            apply(ctx, MappingChange::Remove(m.volume_id)).await?;
            tracing::warn!(volume = %m.volume_id, vm = %m.vm_id, "reconcile: volume is attached to no VM; mapping removed");
            Ok(vec![change(
                m.volume_id,
                Some(m.vm_id),
                ChangeKind::MappingRemoved,
                Some(m.vm_id.to_string()),
                None,
            )])
        }
    }
}

/// Records `mapping`; when it brings an export (a host attachment with exports on), that is
/// reported too (`export_added`).
async fn upsert(ctx: &Context, mapping: DeviceMapping) -> Result<Option<Change>, Halt> {
    let export = mapping
        .host
        .as_ref()
        .and_then(|h| h.export.as_ref())
        .map(|(name, _)| {
            change(
                mapping.volume_id,
                Some(mapping.vm_id),
                ChangeKind::ExportAdded,
                None,
                Some(name.clone()),
            )
        });
    apply(ctx, MappingChange::Upsert(mapping)).await?;
    Ok(export)
}

/// A host mapping whose recorded device is not the one the monitor sees for its serial.
async fn device_drift(
    ctx: &Context,
    cs: &Session,
    m: &MappingView,
    v: &Volume,
) -> Result<Option<Change>, Halt> {
    let truth = mapping_of(ctx, cs, m.vm_id, v).await?;
    if truth.device_path == m.device_path {
        return Ok(None);
    }
    let (before, after) = (m.device_path.clone(), truth.device_path.clone());
    apply(ctx, MappingChange::Upsert(truth)).await?;
    tracing::warn!(volume = %m.volume_id, ?before, ?after, "reconcile: host device changed");
    Ok(Some(change(
        m.volume_id,
        Some(m.vm_id),
        ChangeKind::DeviceChanged,
        before,
        after,
    )))
}

/// The mapping of `v` on `vm` as it is now: a host attachment with its device (and files) as
/// the monitor sees it, or a remote one.
async fn mapping_of(
    ctx: &Context,
    cs: &Session,
    vm: VmId,
    v: &Volume,
) -> Result<DeviceMapping, Halt> {
    if cs.host_vm == Some(vm) {
        attach::host_mapping_now(ctx, vm, v).await
    } else {
        Ok(attach::remote_mapping(vm, v))
    }
}

async fn apply(ctx: &Context, change: MappingChange) -> Result<(), Halt> {
    ctx.db("repair a mapping", || ctx.store.apply_mapping(&change))
        .await
}

fn change(
    volume_id: VolumeId,
    vm_id: Option<VmId>,
    what: ChangeKind,
    before: Option<String>,
    after: Option<String>,
) -> Change {
    Change {
        volume_id,
        vm_id,
        what,
        before,
        after,
    }
}

fn host_error(e: super::host_files::ReconcileError) -> schema::EventError {
    schema::EventError::new(
        schema::ErrorCode::Internal,
        format!("cannot make the host files agree with the tables: {e}"),
    )
    .with_hint("check that the daemon may write PERSISTENT_DEVICE_DIR and NBD_EXPORT_DIR, then reconcile again")
}
