//! `revert_snapshot`: the volume back to one of its snapshots (`revertSnapshot`). CloudStack's
//! preconditions are the caller's to meet and are checked first, so a refusal names them: the
//! snapshot usable, and (KVM) the volume detached or its VM stopped.

use cloudstack::{Snapshot, Volume};
use schema::{ErrorCode, EventError, OperationType, SnapshotId, VolumeId};

use super::mutate::{self, Cloud};
use super::outcome::Completed;
use super::snapshot::{info, not_found, of_volume};
use super::{Halt, Operation, jobs};
use crate::context::Context;

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume: VolumeId,
    snapshot: SnapshotId,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let cloud = Cloud {
        ctx,
        client: &cs.client,
        polling: cs.polling(OperationType::RevertSnapshot),
    };
    let reverted = match op.job_id.clone() {
        // Resuming: the job was started and recorded before a restart.
        Some(job) => mutate::wait_snapshot(cloud, job).await?,
        None => {
            let listed = jobs::current(cloud.client, volume).await?;
            let snap = of_volume(cloud, volume, snapshot)
                .await?
                .ok_or_else(|| not_found(volume, snapshot))?;
            preconditions(&listed, &snap)?;
            match (snap.running_job(), op.prior_attempts) {
                // Ours, from before a crash that came before the job id was stored.
                (Some(job), 1..) => {
                    ctx.record_job(op, Some(volume), &job).await?;
                    mutate::wait_snapshot(cloud, job).await?
                }
                (None, 1..) => {
                    // An earlier execution may have sent it and died: a revert leaves nothing
                    // to look at once its job ended, so it is sent again (docs/cloudstack.md).
                    mutate::resent(cloud, snapshot, "an earlier execution may have sent it");
                    mutate::revert(cloud, op, volume, snapshot).await?
                }
                (_, 0) => mutate::revert(cloud, op, volume, snapshot).await?,
            }
        }
    };
    Ok(Completed::Reverted {
        snapshot: info(volume, reverted),
    })
}

/// CloudStack's conditions for a revert, checked before it is asked: a refusal is
/// `VOLUME_IN_USE`, not retryable, its hint naming the condition.
fn preconditions(listed: &Volume, snap: &Snapshot) -> Result<(), Halt> {
    let refuse = |message: String, hint: String| -> Result<(), Halt> {
        Err(EventError::new(ErrorCode::VolumeInUse, message)
            .with_hint(hint)
            .into())
    };
    if snap.state != "BackedUp" {
        return refuse(
            format!(
                "snapshot {} is {}: only a BackedUp snapshot can be reverted to",
                snap.id, snap.state
            ),
            "wait until CloudStack lists the snapshot BackedUp, then send the revert again".into(),
        );
    }
    if let Some(vm) = listed.virtualmachineid
        && listed.vmstate.as_deref() != Some("Stopped")
    {
        return refuse(
            format!(
                "volume {} is attached to VM {vm}, which is {}: CloudStack reverts a KVM volume only when it is detached or its VM is stopped",
                listed.id,
                listed.vmstate.as_deref().unwrap_or("not stopped")
            ),
            format!(
                "detach volume {} (or stop VM {vm}), then send the revert again",
                listed.id
            ),
        );
    }
    Ok(())
}
