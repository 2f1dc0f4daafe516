//! `attach`: the volume ends attached to `vm_id` (desired state, so a retry is safe).
//!
//! Already attached to that VM: completes with no CloudStack call. Attached to another VM:
//! `VOLUME_IN_USE`. To the host VM (the one this daemon runs on) the guest device is found by
//! serial; the expectation is registered before the attach is sent.

use cloudstack::Volume;
use schema::command::AttachVolume;
use schema::event::AttachMode;
use schema::{ErrorCode, EventError, OperationType, VmId, VolumeId};

use super::jobs::{self, EarlyRead};
use super::outcome::{AttachedVolume, Attachment, Completed};
use super::{Halt, Operation, mutate};
use crate::context::Context;
use crate::db::store::now;
use crate::devices::Found;
use crate::host::{self, HostLinks};
use crate::mappings::{CloudStackState, DeviceMapping, HostRecord, LinuxState, MappingChange};

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    attach: &AttachVolume,
    early: Option<EarlyRead>,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let polling = cs.polling(OperationType::Attach);
    let (volume_id, vm) = (attach.volume_id, attach.vm_id);
    let host = cs.host_vm == Some(vm);
    // One attach or detach of this VM at a time, until this one's outcome is committed.
    ctx.hold_vm(op, vm).await;

    // Seen detached and idle while this operation waited for its turn: attached at once.
    let early = early.and_then(EarlyRead::idle_and_detached);
    let listed = match &early {
        Some(listed) => listed.clone(),
        None => jobs::settled(ctx, op, &cs.client, polling, volume_id).await?,
    };
    // Registered before the attach is sent: a device that appears early is not missed.
    let expectation = host.then(|| ctx.devices.expect(volume_id, listed.size));
    let volume = match ensure_attached(ctx, op, &cs.client, polling, attach, listed).await {
        // Refused before any job started, on a read from before this turn: read again.
        Err(refused @ Halt::Fail(..)) if early.is_some() && op.job_id.is_none() => {
            let now = jobs::settled(ctx, op, &cs.client, polling, volume_id).await?;
            if now.virtualmachineid.is_none() {
                // As it was read: the refusal stands.
                return Err(refused);
            }
            tracing::info!("the volume was attached while this operation waited for its turn");
            ensure_attached(ctx, op, &cs.client, polling, attach, now).await?
        }
        attached => attached?,
    };
    match expectation {
        None => Ok(Completed::Attached {
            volume: AttachedVolume::from(&volume),
            attachment: Attachment::Remote,
            mapping: Box::new(remote_mapping(vm, &volume)),
        }),
        Some(expectation) => find_device(ctx, op, &expectation, vm, &volume).await,
    }
}

/// The volume attached to the command's VM: as it is when it already is, else after an
/// `attachVolume` (started without doing it twice); `VOLUME_IN_USE` when another VM has it.
async fn ensure_attached(
    ctx: &Context,
    op: &mut Operation,
    client: &cloudstack::Client,
    polling: cloudstack::JobPolling,
    attach: &AttachVolume,
    listed: Volume,
) -> Result<Volume, Halt> {
    let (volume_id, vm) = (attach.volume_id, attach.vm_id);
    match listed.virtualmachineid {
        Some(v) if v == vm => match (attach.device_id, listed.deviceid) {
            // Asked for a slot the volume is not in: never "completed" as if it were there.
            (Some(want), now) if now != Some(want) => {
                let now =
                    now.map_or_else(|| "an unknown slot".to_owned(), |d| format!("device {d}"));
                Err(EventError::new(
                    ErrorCode::VolumeInUse,
                    format!(
                        "volume {volume_id} is attached to VM {vm} at {now}, not at device {want}"
                    ),
                )
                .with_hint(format!(
                    "the volume is already on this VM at {now}: detach it first, then attach it with device_id {want}"
                ))
                .into())
            }
            _ => {
                tracing::info!(%vm, "already attached to this VM; nothing to do in CloudStack");
                Ok(listed)
            }
        },
        Some(other) => Err(EventError::new(
            ErrorCode::VolumeInUse,
            format!("volume {volume_id} is attached to VM {other}, not {vm}: detach it first"),
        )
        .into()),
        None => {
            let cloud = mutate::Cloud {
                ctx,
                client,
                polling,
            };
            mutate::attach(cloud, op, attach).await
        }
    }
}

/// A host attachment: waits for the guest device with the volume's serial. Without it the
/// operation fails `DEVICE_CORRELATION_TIMEOUT`, and the mapping still records the truth
/// (attached in CloudStack, missing in Linux).
async fn find_device(
    ctx: &Context,
    op: &mut Operation,
    expectation: &crate::devices::Expectation,
    vm: VmId,
    volume: &Volume,
) -> Result<Completed, Halt> {
    // At least two scans after the job ended, whatever the job took.
    let waited = expectation.registered.elapsed();
    let timeout = ctx
        .correlation_timeout
        .max(waited + ctx.devices_period() * 2);
    match ctx.devices.correlate(expectation, timeout, &ctx.halt).await {
        Ok(found) => {
            tracing::info!(device = %found.device_path, matched_by = ?found.matched_by, "device correlated");
            ctx.metrics.correlated(expectation.registered.elapsed());
            attached_at(ctx, op, found, vm, volume).await
        }
        Err(_) if ctx.halt.is_cancelled() => Err(Halt::Interrupted(
            "shut down while waiting for the device".into(),
        )),
        Err(candidates) => Err(no_device(expectation, vm, volume, &candidates, timeout)),
    }
}

/// A host attachment whose device was found: its persistent name (through the by-id link,
/// which udev makes after the kernel's uevent, so it is given its time) and export, and the
/// outcome that records them.
async fn attached_at(
    ctx: &Context,
    op: &mut Operation,
    mut found: Found,
    vm: VmId,
    volume: &Volume,
) -> Result<Completed, Halt> {
    let shutdown = Some(&ctx.halt);
    let serial = found.serial.clone();
    let target = host::target_of(&ctx.devices, &found.name, serial.as_deref(), shutdown).await;
    found.by_id_path = by_id_path(&target);
    let mut mapping = mapping(
        volume.id,
        vm,
        AttachMode::Host,
        volume,
        Some(&found),
        LinuxState::Present,
    );
    // From here to the commit of the outcome, no reconcile or sync touches the files.
    ctx.hold_host_files(op).await;
    let links = host_links(ctx, &found, &target, &mapping).await?;
    mapping.host = Some(Box::new(host_record(&links)));
    Ok(Completed::Attached {
        volume: AttachedVolume::from(volume),
        attachment: Attachment::Host {
            device_path: found.device_path,
            by_id_path: found.by_id_path,
            persistent_path: links.persistent_path.display().to_string(),
            nbd_export: links.export.as_ref().map(|e| e.event()),
        },
        mapping: Box::new(mapping),
    })
}

/// What the mapping records of a host attachment's files.
fn host_record(links: &HostLinks) -> HostRecord {
    let persistent_path = links.persistent_path.display().to_string();
    HostRecord {
        persistent_name: links.persistent_name.clone(),
        symlink_path: persistent_path.clone(),
        export: links
            .export
            .as_ref()
            .map(|e| (e.name.clone(), persistent_path)),
    }
}

/// The mapping of `volume`, which CloudStack lists on the host VM `vm`, with its device as the
/// monitor's table shows it now (no wait: `missing` when absent) and, when the device is there,
/// its persistent name and export made. For a reconcile, which records what is.
pub(super) async fn host_mapping_now(
    ctx: &Context,
    vm: VmId,
    volume: &Volume,
) -> Result<DeviceMapping, Halt> {
    let expectation = ctx.devices.expect(volume.id, volume.size);
    let table = ctx.devices.table();
    let Some(mut found) = ctx.devices.try_match(&table, &expectation) else {
        return Ok(missing(vm, volume));
    };
    let target = host::target_of(&ctx.devices, &found.name, found.serial.as_deref(), None).await;
    found.by_id_path = by_id_path(&target);
    let mut truth = mapping(
        volume.id,
        vm,
        AttachMode::Host,
        volume,
        Some(&found),
        LinuxState::Present,
    );
    let links = host_links(ctx, &found, &target, &truth).await?;
    truth.host = Some(Box::new(host_record(&links)));
    Ok(truth)
}

/// The by-id link a persistent name points at, as the event and the mapping report it.
fn by_id_path(target: &host::Target) -> Option<String> {
    match target {
        host::Target::ById(link) => Some(link.display().to_string()),
        host::Target::Node { .. } => None,
    }
}

/// The mapping of `volume`, which CloudStack lists on the VM `vm` (not the host VM).
pub(super) fn remote_mapping(vm: VmId, volume: &Volume) -> DeviceMapping {
    mapping(
        volume.id,
        vm,
        AttachMode::Remote,
        volume,
        None,
        LinuxState::Remote,
    )
}

/// The persistent name (and export) of a host attachment whose device was found. The name
/// depends on the volume alone, so a re-attach gets it back; on failure the operation fails
/// `INTERNAL` and the mapping still records the attachment.
async fn host_links(
    ctx: &Context,
    found: &Found,
    target: &host::Target,
    truth: &DeviceMapping,
) -> Result<HostLinks, Halt> {
    let volume = truth.volume_id;
    let in_use = ctx
        .db("read the persistent names in use", || async {
            Ok(ctx.store.names_in_use(volume).await?)
        })
        .await?;
    let name = host::persistent_name(volume, &in_use);
    ctx.host.link(volume, &name, target).await.map_err(|e| {
        let error = EventError::new(
            ErrorCode::Internal,
            format!("volume {volume} is attached to the host VM at {} but {e}", found.device_path),
        )
        .with_hint("check that the daemon may write PERSISTENT_DEVICE_DIR and NBD_EXPORT_DIR, then reconcile");
        Halt::Fail(error, Some(Box::new(MappingChange::Upsert(truth.clone()))))
    })
}

/// The failure of a host attachment whose device never appeared, with the mapping that records
/// the truth (attached in CloudStack, missing in Linux).
fn no_device(
    expectation: &crate::devices::Expectation,
    vm: VmId,
    volume: &Volume,
    candidates: &[String],
    timeout: std::time::Duration,
) -> Halt {
    let seen = if candidates.is_empty() {
        "none".to_owned()
    } else {
        candidates.join(", ")
    };
    let error = EventError::new(
        ErrorCode::DeviceCorrelationTimeout,
        format!(
            "volume {} is attached to host VM {vm} but no device with serial {} appeared within {}s; new devices seen: {seen}",
            volume.id,
            expectation.serial,
            timeout.as_secs()
        ),
    );
    let truth = missing(vm, volume);
    Halt::Fail(error, Some(Box::new(MappingChange::Upsert(truth))))
}

/// A host attachment whose device is not there: attached in CloudStack, missing in Linux.
fn missing(vm: VmId, volume: &Volume) -> DeviceMapping {
    mapping(
        volume.id,
        vm,
        AttachMode::Host,
        volume,
        None,
        LinuxState::Missing,
    )
}

fn mapping(
    volume_id: VolumeId,
    vm: VmId,
    mode: AttachMode,
    volume: &Volume,
    found: Option<&Found>,
    linux_state: LinuxState,
) -> DeviceMapping {
    DeviceMapping {
        volume_id,
        vm_id: vm,
        mode,
        device_path: found.map(|f| f.device_path.clone()),
        by_id_path: found.and_then(|f| f.by_id_path.clone()),
        serial: Some(volume_id.disk_serial()),
        cloudstack_device_id: volume.deviceid,
        cloudstack_state: CloudStackState::Attached,
        linux_state,
        size: found.and_then(|f| f.size).or(volume.size),
        last_sync: now(),
        host: None,
    }
}
