//! `detach`: the volume ends attached to no VM. Detaching a detached volume completes with
//! `already_detached: true`.

use cloudstack::{Client, JobPolling, Volume};
use schema::{ErrorCode, EventError, OperationType, VmId, VolumeId};

use super::outcome::{Completed, VolumeState};
use super::{Halt, Operation, jobs, mutate};
use crate::context::Context;
use crate::mappings::MappingChange;

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume_id: VolumeId,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let polling = cs.polling(OperationType::Detach);
    let listed = jobs::settled(ctx, op, &cs.client, polling, volume_id).await?;
    let Some(vm) = listed.virtualmachineid else {
        tracing::info!("not attached; nothing to do in CloudStack");
        // Detached already (by an earlier execution, or another instance): its device is free.
        ctx.devices.release(volume_id);
        ctx.hold_host_files(op).await;
        release_host_files(ctx, volume_id, false).await?;
        return Ok(Completed::Detached {
            volume: VolumeState {
                id: volume_id,
                state: listed.state,
            },
            from: None,
        });
    };
    let on_host = cs.host_vm == Some(vm);
    let volume = detach_now(ctx, op, &cs.client, polling, volume_id, vm, on_host).await?;
    Ok(Completed::Detached {
        volume: VolumeState {
            id: volume.id,
            state: volume.state,
        },
        from: Some(vm),
    })
}

/// Detaches `volume` from `vm` (reconciling after a lost answer) and gives up its guest
/// device and, when `vm` is the host VM, its export and persistent name. Holds `vm`'s
/// attach/detach lock, and the host files' lock once it removes them, until the outcome is
/// committed.
pub(super) async fn detach_now(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: JobPolling,
    volume: VolumeId,
    vm: VmId,
    on_host: bool,
) -> Result<Volume, Halt> {
    ctx.hold_vm(op, vm).await;
    let cloud = mutate::Cloud {
        ctx,
        client,
        polling,
    };
    let detached = mutate::detach(cloud, op, volume).await?;
    ctx.devices.release(volume);
    ctx.hold_host_files(op).await;
    // Detached in CloudStack: a failure to remove the files still removes the mapping (N17).
    release_host_files(ctx, volume, on_host)
        .await
        .map_err(|h| h.recording(MappingChange::Remove(volume)))?;
    Ok(detached)
}

/// Removes `volume`'s export entry and persistent name, and only when it was a host
/// attachment: CloudStack had it on the host VM (`on_host`), or its mapping or export row says
/// so (a detach resumed after the CloudStack side was done). A detach from any other VM never
/// touches an export (the v1.2.1 lesson). A failure fails the operation; retrying the command
/// finds the volume detached and tries again. The caller holds the host files' lock.
pub(super) async fn release_host_files(
    ctx: &Context,
    volume: VolumeId,
    on_host: bool,
) -> Result<(), Halt> {
    let name = ctx
        .db("read the persistent name", || async {
            Ok(ctx.store.persistent_name_of(volume).await?)
        })
        .await?;
    let exported = ctx
        .db("read the export", || async {
            Ok(ctx.store.has_active_export(volume).await?)
        })
        .await?;
    if !(on_host || name.is_some() || exported) {
        return Ok(());
    }
    ctx.host.unlink(volume, name.as_deref()).await.map_err(|e| {
        EventError::new(
            ErrorCode::Internal,
            format!("volume {volume} left the host VM but {e}"),
        )
        .with_hint("check that the daemon may write PERSISTENT_DEVICE_DIR and NBD_EXPORT_DIR, then send the command again")
        .into()
    })
}
