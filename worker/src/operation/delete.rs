//! `delete`: the volume ends absent. An attached volume is detached first; deleting a volume
//! that does not exist completes with `already_absent: true`.

use schema::{OperationType, VolumeId};

use super::outcome::Completed;
use super::{Halt, Operation, detach, jobs, mutate};
use crate::context::Context;
use crate::mappings::MappingChange;

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume_id: VolumeId,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let client = &cs.client;
    let polling = cs.polling(OperationType::Delete);
    let absent = |vm| Completed::Deleted {
        volume: volume_id,
        detached_from: vm,
        already_absent: true,
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
    let cloud = mutate::Cloud {
        ctx,
        client,
        polling,
    };
    if !mutate::delete(cloud, op, volume_id)
        .await
        .map_err(|h| h.recording(gone()))?
    {
        return Ok(absent(detached_from));
    }
    Ok(Completed::Deleted {
        volume: volume_id,
        detached_from,
        already_absent: false,
    })
}
