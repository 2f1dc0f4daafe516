//! `delete`: the volume ends absent. An attached volume is detached first; deleting a volume
//! that does not exist completes with `already_absent: true`.

use serde_json::json;

use schema::{OperationType, VolumeId};

use super::{Completion, Halt, Operation, detach, jobs};
use crate::cloud::classify;
use crate::context::Context;
use crate::mappings::MappingChange;

/// How many times a deleteVolume whose answer was lost is tried in all.
const ATTEMPTS: usize = 3;

pub async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume_id: VolumeId,
) -> Result<Completion, Halt> {
    let cs = ctx.session().await?;
    let client = &cs.client;
    let polling = cs.polling(OperationType::Delete);
    let absent = |vm| Completion {
        volume_id: Some(volume_id),
        vm_id: vm,
        already_absent: Some(true),
        response: json!({"volume": {"id": volume_id}, "already_absent": true}),
        mapping: Some(MappingChange::Remove(volume_id)),
        ..Completion::default()
    };
    let listed = match jobs::settled(ctx, op, client, polling, volume_id).await {
        Ok(v) => v,
        Err(Halt::Fail(e, _)) if e.code == schema::ErrorCode::VolumeNotFound => {
            tracing::info!("volume does not exist; nothing to delete");
            ctx.hold_host_files(op).await;
            detach::release_host_files(ctx, volume_id, false).await?;
            return Ok(absent(None));
        }
        Err(e) => return Err(e),
    };
    let detached_from = listed.virtualmachineid;
    match detached_from {
        Some(vm) => {
            tracing::info!(%vm, "volume is attached; detaching it first");
            let on_host = cs.host_vm == Some(vm);
            detach::detach_now(ctx, op, client, polling, volume_id, vm, on_host).await?;
        }
        None => {
            ctx.hold_host_files(op).await;
            detach::release_host_files(ctx, volume_id, false).await?;
        }
    }

    // Detached by now: a failure from here on still removes the mapping (N17).
    let gone = || MappingChange::Remove(volume_id);
    if !delete_now(client, volume_id)
        .await
        .map_err(|h| h.recording(gone()))?
    {
        return Ok(absent(detached_from));
    }
    Ok(Completion {
        volume_id: Some(volume_id),
        vm_id: detached_from,
        already_absent: Some(false),
        response: json!({"volume": {"id": volume_id}, "deleted": true, "detached_from": detached_from}),
        mapping: Some(MappingChange::Remove(volume_id)),
        ..Completion::default()
    })
}

/// `deleteVolume` (synchronous), checking with `listVolumes` after a lost answer before sending
/// it again. `false`: the volume was already gone.
async fn delete_now(client: &cloudstack::Client, volume_id: VolumeId) -> Result<bool, Halt> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.delete_volume(volume_id).await {
            Ok(()) => return Ok(true),
            // Gone meanwhile (CloudStack's answer for an id it does not know).
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) if e.was_answered() || attempt >= ATTEMPTS => return Err(classify(&e).into()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "no answer to deleteVolume; checking whether it took effect");
                if client
                    .get_volume(volume_id)
                    .await
                    .map_err(|e| classify(&e))?
                    .is_none()
                {
                    return Ok(true);
                }
            }
        }
    }
}
