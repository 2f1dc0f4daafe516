//! Reading a volume and waiting for CloudStack's jobs on it: before an operation acts
//! ([`settled`]), and after it started one ([`wait`]). Starting one is `mutate`'s.

use cloudstack::{Client, JobId, JobPolling, Volume};
use schema::{ErrorCode, EventError, VolumeId};

use super::{Halt, Operation};
use crate::cloud::classify;
use crate::context::Context;

pub(crate) fn not_found(volume: VolumeId) -> EventError {
    EventError::new(
        ErrorCode::VolumeNotFound,
        format!("CloudStack does not know volume {volume}"),
    )
}

/// The volume as CloudStack lists it now.
pub(crate) async fn current(client: &Client, volume: VolumeId) -> Result<Volume, Halt> {
    client
        .get_volume(volume)
        .await
        .map_err(|e| classify(&e))?
        .ok_or_else(|| not_found(volume).into())
}

/// The volume once no job runs on it. First the job this operation stored before a restart
/// (its failure is this operation's failure); then any job still in progress on the volume
/// (ours from before a crash that came before the id was stored, or anyone's), so that no call
/// is sent while CloudStack is still acting.
pub(crate) async fn settled(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: JobPolling,
    volume: VolumeId,
) -> Result<Volume, Halt> {
    if let Some(job) = op.job_id.clone() {
        wait(ctx, client, &job, polling).await?;
    }
    let listed = current(client, volume).await?;
    match listed.running_job() {
        Some(job) => {
            tracing::info!(job = %job, "a job is running on the volume; waiting for it before acting");
            if op.prior_attempts > 0 {
                // Most likely ours, started before a crash: record it so a restart waits too.
                ctx.record_job(op, Some(volume), &job).await?;
            }
            // Its outcome is read from the volume's state below, whatever it was.
            let _ = ctx
                .until_shutdown(
                    "waiting for a running job",
                    client.wait_for_job(&job, polling),
                )
                .await?;
            current(client, volume).await
        }
        None => Ok(listed),
    }
}

/// Waits for `job` (interrupted by shutdown: the job id is stored, so that is a safe point).
pub(crate) async fn wait(
    ctx: &Context,
    client: &Client,
    job: &JobId,
    polling: JobPolling,
) -> Result<Volume, Halt> {
    ctx.until_shutdown(
        &format!("waiting for job {job}"),
        client.wait_for_volume_job(job, polling),
    )
    .await?
    .map_err(|e| classify(&e).into())
}
