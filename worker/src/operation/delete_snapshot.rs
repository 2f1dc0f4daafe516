//! `delete_snapshot`: one of the volume's snapshots removed (`deleteSnapshot`); one already
//! gone completes with `already_absent: true`.

use schema::{OperationType, SnapshotId, VolumeId};

use super::mutate::{self, Cloud};
use super::outcome::Completed;
use super::snapshot::of_volume;
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
        polling: cs.polling(OperationType::DeleteSnapshot),
    };
    let deleted = match op.job_id.clone() {
        // Resuming: the job was started and recorded before a restart.
        Some(job) => mutate::wait_plain(cloud, job).await.map(|()| true)?,
        None => {
            jobs::current(cloud.client, volume).await?;
            match of_volume(cloud, volume, snapshot).await? {
                None => {
                    tracing::info!(%snapshot, "snapshot does not exist; nothing to delete");
                    false
                }
                Some(s) => match s.running_job().filter(|_| op.prior_attempts > 0) {
                    Some(job) => {
                        ctx.record_job(op, Some(volume), &job).await?;
                        mutate::wait_plain(cloud, job).await.map(|()| true)?
                    }
                    None => mutate::delete_snapshot(cloud, op, volume, snapshot).await?,
                },
            }
        }
    };
    Ok(Completed::SnapshotDeleted {
        volume,
        snapshot_id: snapshot,
        already_absent: !deleted,
    })
}
