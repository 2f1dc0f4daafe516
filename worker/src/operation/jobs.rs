//! Starting a CloudStack volume job without doing it twice, and waiting for it.
//!
//! After a transport error on a mutating call CloudStack may or may not have acted. Blindly
//! re-sending could attach twice or create two volumes, so [`start_and_wait`] first asks
//! `listVolumes` whether the desired state was reached, or whether a job is running on the
//! volume, and only re-issues the call when neither (CLOUDSTACK.md §4).

use std::future::Future;
use std::time::Duration;

use cloudstack::{Client, CloudStackError, JobId, JobPolling, Volume};
use schema::{ErrorCode, EventError, VolumeId};

use super::{Halt, Operation};
use crate::cloud::classify;
use crate::context::Context;

/// After a request timed out, how long CloudStack gets to finish it before its effect is
/// checked (a slow management server may still act on it).
const SETTLE_AFTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits [`SETTLE_AFTER_TIMEOUT`] when `lost` was a timeout (not a refused or reset
/// connection, where nothing is still in progress).
pub async fn settle_after(ctx: &Context, lost: &CloudStackError) -> Result<(), Halt> {
    if lost.timed_out() {
        tracing::info!(
            wait_s = SETTLE_AFTER_TIMEOUT.as_secs(),
            "the request timed out: giving CloudStack time to finish it before checking"
        );
        ctx.until_shutdown(
            "waiting for a timed-out request to settle",
            tokio::time::sleep(SETTLE_AFTER_TIMEOUT),
        )
        .await?;
    }
    Ok(())
}

/// How many times a call whose answer was lost is tried in all.
const ATTEMPTS: usize = 3;

pub fn not_found(volume: VolumeId) -> EventError {
    EventError::new(
        ErrorCode::VolumeNotFound,
        format!("CloudStack does not know volume {volume}"),
    )
}

/// The volume as CloudStack lists it now.
pub async fn current(client: &Client, volume: VolumeId) -> Result<Volume, Halt> {
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
pub async fn settled(
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
    match (listed.jobstatus, listed.jobid.clone()) {
        (Some(0), Some(job)) => {
            let job = JobId(job);
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
        _ => Ok(listed),
    }
}

/// Waits for `job` (interrupted by shutdown: the job id is stored, so that is a safe point).
pub async fn wait(
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

/// Starts a job on `volume` with `start`, records its id, and waits for it. `reached` says
/// whether a listed volume already is in the state the job would produce.
pub async fn start_and_wait<S, Fut>(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: JobPolling,
    volume: VolumeId,
    start: S,
    reached: impl Fn(&Volume) -> bool,
) -> Result<Volume, Halt>
where
    S: Fn() -> Fut,
    Fut: Future<Output = Result<JobId, CloudStackError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let lost = match start().await {
            Ok(job) => {
                ctx.record_job(op, Some(volume), &job).await?;
                return wait(ctx, client, &job, polling).await;
            }
            Err(e) if e.was_answered() => return Err(classify(&e).into()),
            Err(e) => e,
        };
        tracing::warn!(error = %lost, attempt, "no answer from CloudStack; reconciling with listVolumes before re-issuing");
        settle_after(ctx, &lost).await?;
        let now = current(client, volume).await?;
        if reached(&now) {
            tracing::info!("the call had taken effect");
            return Ok(now);
        }
        if now.jobstatus == Some(0)
            && let Some(job) = now.jobid.map(JobId)
        {
            tracing::info!(job = %job, "a job is running on the volume; waiting for it");
            ctx.record_job(op, Some(volume), &job).await?;
            return wait(ctx, client, &job, polling).await;
        }
        if attempt >= ATTEMPTS {
            return Err(classify(&lost).into());
        }
    }
}
