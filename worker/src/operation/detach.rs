//! `detach`: the volume ends attached to no VM. Detaching a detached volume completes with
//! `already_detached: true`.

use serde_json::json;

use cloudstack::{Client, JobPolling, Volume};
use schema::{OperationType, VmId, VolumeId};

use super::{Completion, Halt, Operation, jobs};
use crate::context::Context;
use crate::mappings::MappingChange;

pub async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume_id: VolumeId,
) -> Result<Completion, Halt> {
    let cs = ctx.session().await?;
    let polling = cs.polling(OperationType::Detach);
    let listed = jobs::settled(ctx, op, &cs.client, polling, volume_id).await?;
    let Some(vm) = listed.virtualmachineid else {
        tracing::info!("not attached; nothing to do in CloudStack");
        return Ok(Completion {
            volume_id: Some(volume_id),
            already_detached: Some(true),
            response: json!({"volume": {"id": volume_id, "state": listed.state}, "already_detached": true}),
            mapping: Some(MappingChange::Remove(volume_id)),
            ..Completion::default()
        });
    };
    let volume = detach_now(ctx, op, &cs.client, polling, volume_id, vm).await?;
    Ok(Completion {
        volume_id: Some(volume_id),
        vm_id: Some(vm),
        already_detached: Some(false),
        response: json!({"volume": {"id": volume.id, "state": volume.state}, "detached_from": vm}),
        mapping: Some(MappingChange::Remove(volume_id)),
        ..Completion::default()
    })
}

/// Detaches `volume` from `vm` (reconciling after a lost answer) and gives up its guest
/// device. Holds `vm`'s attach/detach lock meanwhile.
pub(super) async fn detach_now(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: JobPolling,
    volume: VolumeId,
    vm: VmId,
) -> Result<Volume, Halt> {
    let _one_at_a_time = ctx.lock_vm(vm).await;
    let detached = jobs::start_and_wait(
        ctx,
        op,
        client,
        polling,
        volume,
        || client.detach_volume(volume),
        |v| v.virtualmachineid.is_none(),
    )
    .await?;
    ctx.devices.release(volume);
    Ok(detached)
}
