//! Reading a volume and waiting for CloudStack's jobs on it: before an operation acts
//! ([`settled`], or [`EarlyRead`] while it waited for its turn), and after it started one
//! ([`wait`]). Starting one is `mutate`'s.

use std::time::Instant;

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

/// The volume as `listVolumes` showed it while its operation waited for a slot, on the
/// operation's first attempt (so no job of its own can be running), before it was marked
/// executing. It may be seconds old: an operation acts on it only where CloudStack checks the
/// same state itself when it is sent the call ([`EarlyRead::idle_and_detached`]: `attachVolume`
/// refuses a volume attached meanwhile), and reads again after a refusal; anything else reads
/// the volume when its turn comes ([`settled`]).
pub(crate) struct EarlyRead {
    volume: Volume,
    at: Instant,
}

impl EarlyRead {
    /// Reads `volume` now; `None` when that fails (the operation reads again in its turn).
    pub(crate) async fn of(client: &Client, volume: VolumeId) -> Option<Self> {
        match current(client, volume).await {
            Ok(listed) => Some(Self {
                volume: listed,
                at: Instant::now(),
            }),
            Err(e) => {
                tracing::debug!(error = ?e, "no early read of the volume; it is read in its turn");
                None
            }
        }
    }

    /// The volume when it was attached to no VM and no job ran on it.
    pub(crate) fn idle_and_detached(self) -> Option<Volume> {
        let usable = self.volume.virtualmachineid.is_none() && self.volume.running_job().is_none();
        if usable {
            let age_ms = u64::try_from(self.at.elapsed().as_millis()).unwrap_or(u64::MAX);
            tracing::debug!(
                age_ms,
                "acting on the volume as read while waiting for a slot"
            );
        }
        usable.then_some(self.volume)
    }
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
