//! Every call that changes something in CloudStack, made through one primitive: start it, and
//! when its answer is lost, see whether it happened before it is sent again; never twice.
//!
//! After a transport error on a mutating call CloudStack may or may not have acted. Blindly
//! re-sending could attach twice or create two volumes, so [`mutate`] first waits for a
//! timed-out request to settle, then asks CloudStack what it shows ([`Effect`]): the desired
//! state reached, a job running on the volume (recorded and waited for), or neither (the call
//! is sent again, at most [`ATTEMPTS`] times in all) (docs/cloudstack.md).

use std::future::Future;
use std::time::Duration;

use chrono::TimeDelta;

use cloudstack::{Client, CloudStackError, JobId, JobPolling, Snapshot, Volume};
use schema::command::{AttachVolume, CreateVolume};
use schema::{DiskOfferingId, ErrorCode, EventError, SnapshotId, VolumeId, ZoneId};

use super::jobs::{current, wait};
use super::{Halt, Operation};
use crate::cloud::classify;
use crate::context::Context;

/// How many times a call whose answer was lost is sent in all.
pub(super) const ATTEMPTS: usize = 3;

/// After a request timed out, how long CloudStack gets to finish it before its effect is
/// checked (a slow management server may still act on it).
const SETTLE_AFTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a mutating call runs: the operation's context, its CloudStack client and how its
/// jobs are polled.
#[derive(Clone, Copy)]
pub(super) struct Cloud<'a> {
    pub ctx: &'a Context,
    pub client: &'a Client,
    pub polling: JobPolling,
}

/// What CloudStack answered to a mutating call.
enum Sent<T> {
    /// An async job started (on this volume, once known).
    Job(JobId, VolumeId),
    /// A synchronous call that is done.
    Done(T),
}

/// What CloudStack shows after a call whose answer was lost.
pub(super) enum Effect<T> {
    /// The call took effect.
    Reached(T),
    /// A job runs on the volume (most likely the call's own): wait for it.
    Running(JobId, VolumeId),
    /// Neither: the call can be sent again.
    NotYet,
}

/// Sends `start` until CloudStack answers, checking `look` after every lost answer (see the
/// module doc), `attempts` sends in all. A started job is recorded before it is waited for
/// (`wait`), so a restart resumes it instead of starting another. `exhausted` is the failure
/// once every send went unanswered.
async fn mutate<T, S, SF, L, LF, W, WF>(
    cloud: Cloud<'_>,
    op: &mut Operation,
    start: S,
    look: L,
    wait: W,
    attempts: usize,
    exhausted: impl Fn(&CloudStackError) -> EventError,
) -> Result<T, Halt>
where
    S: Fn() -> SF,
    SF: Future<Output = Result<Sent<T>, CloudStackError>>,
    L: Fn() -> LF,
    LF: Future<Output = Result<Effect<T>, Halt>>,
    W: FnOnce(JobId) -> WF,
    WF: Future<Output = Result<T, Halt>>,
{
    let mut attempt = 0;
    let job = loop {
        attempt += 1;
        let lost = match start().await {
            Ok(Sent::Done(done)) => return Ok(done),
            Ok(Sent::Job(job, volume)) => break (job, volume),
            Err(e) if e.was_answered() => return Err(classify(&e).into()),
            Err(e) => e,
        };
        tracing::warn!(error = %lost, attempt, "no answer from CloudStack; checking whether the call took effect before sending it again");
        settle_after(cloud.ctx, &lost).await?;
        match look().await? {
            Effect::Reached(done) => {
                tracing::info!("the call had taken effect");
                return Ok(done);
            }
            Effect::Running(job, volume) => {
                tracing::info!(job = %job, "a job is running on the volume; waiting for it");
                break (job, volume);
            }
            Effect::NotYet if attempt >= attempts => return Err(exhausted(&lost).into()),
            Effect::NotYet => {}
        }
    };
    let (job, volume) = job;
    op.job_id = Some(job.clone());
    op.volume_id = Some(volume);
    // A job that ended by its first poll needs no record of its own: its id is committed with
    // the outcome. Any other's id is committed while it is polled, and always before the
    // outcome. A crash before either resumes as after a lost answer (`look` finds the job).
    let waiting = wait(job.clone());
    tokio::pin!(waiting);
    let first_poll = cloud.polling.min_interval * 2;
    if let Ok(ended) = tokio::time::timeout(first_poll, &mut waiting).await {
        return ended;
    }
    let (recorded, waited) =
        tokio::join!(cloud.ctx.store_job(op.id(), Some(volume), &job), waiting);
    recorded?;
    waited
}

/// How a volume job (attach, detach, create, resize) is waited for: the volume it ends with.
fn volume_job<'a>(cloud: Cloud<'a>) -> impl FnOnce(JobId) -> VolumeJob<'a> {
    move |job| Box::pin(async move { wait(cloud.ctx, cloud.client, &job, cloud.polling).await })
}

type VolumeJob<'a> = Job<'a, Volume>;
type Job<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, Halt>> + Send + 'a>>;

/// How a snapshot job (createSnapshot, revertSnapshot) is waited for: the snapshot it ends with.
fn snapshot_job<'a>(cloud: Cloud<'a>) -> impl FnOnce(JobId) -> Job<'a, Snapshot> {
    move |job| Box::pin(wait_snapshot(cloud, job))
}

/// Waits for the snapshot job `job` (interrupted by shutdown: its id is stored).
pub(super) async fn wait_snapshot(cloud: Cloud<'_>, job: JobId) -> Result<Snapshot, Halt> {
    let waited = cloud.client.wait_for_snapshot_job(&job, cloud.polling);
    (cloud.ctx)
        .until_shutdown(&format!("waiting for job {job}"), waited)
        .await?
        .map_err(|e| classify(&e).into())
}

/// Waits for a job whose result is only its success (deleteSnapshot).
pub(super) async fn wait_plain(cloud: Cloud<'_>, job: JobId) -> Result<(), Halt> {
    let waited = cloud.client.wait_for_job(&job, cloud.polling);
    (cloud.ctx)
        .until_shutdown(&format!("waiting for job {job}"), waited)
        .await?
        .map(|_| ())
        .map_err(|e| classify(&e).into())
}

/// The snapshot `id` as `listSnapshots` shows it, if it exists.
pub(super) async fn listed_snapshot(
    cloud: Cloud<'_>,
    id: SnapshotId,
) -> Result<Option<Snapshot>, Halt> {
    let found = cloud.client.list_snapshots(&[("id", id.to_string())]).await;
    Ok(found.map_err(|e| classify(&e))?.into_iter().next())
}

/// What `listSnapshots` shows of the snapshot named `name` of `volume` (a name contains the
/// command id that took it): found with its job running, found, or not there.
pub(super) async fn snapshot_effect(
    cloud: Cloud<'_>,
    volume: VolumeId,
    name: &str,
) -> Result<Effect<Snapshot>, Halt> {
    let filter = [("volumeid", volume.to_string()), ("name", name.to_owned())];
    let found = cloud.client.list_snapshots(&filter).await;
    let found = found.map_err(|e| classify(&e))?.into_iter().next();
    Ok(match found {
        Some(s) => match s.running_job() {
            Some(job) => Effect::Running(job, volume),
            // Usable or failed: either way this command's snapshot, never a second one.
            None => Effect::Reached(s),
        },
        None => Effect::NotYet,
    })
}

/// `createSnapshot` of `volume`, named `name`: the snapshot once its job ended. After a lost
/// answer `listSnapshots` is asked for that name.
pub(super) async fn snapshot(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
    name: &str,
) -> Result<Snapshot, Halt> {
    mutate(
        cloud,
        op,
        || async move {
            let (id, job) = cloud.client.create_snapshot(volume, name).await?;
            tracing::info!(snapshot = %id, job = %job, "createSnapshot accepted");
            Ok(Sent::Job(job, volume))
        },
        || snapshot_effect(cloud, volume, name),
        snapshot_job(cloud),
        ATTEMPTS,
        classify,
    )
    .await
}

/// `revertSnapshot`: the snapshot once the volume was reverted to it. A revert leaves nothing
/// to see but its job on the snapshot: after a lost answer with no job of it running, it is sent
/// once more (two sends in all, the second counted as a retry and logged: reverting twice to the
/// same snapshot leaves the same data) (docs/cloudstack.md).
pub(super) async fn revert(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
    snapshot: SnapshotId,
) -> Result<Snapshot, Halt> {
    mutate(
        cloud,
        op,
        || async move {
            let job = cloud.client.revert_snapshot(snapshot).await?;
            Ok(Sent::Job(job, volume))
        },
        || async move {
            let running = listed_snapshot(cloud, snapshot)
                .await?
                .and_then(|s| s.running_job());
            Ok(match running {
                Some(job) => Effect::Running(job, volume),
                None => {
                    resent(cloud, snapshot, "its answer was lost");
                    Effect::NotYet
                }
            })
        },
        snapshot_job(cloud),
        REVERT_ATTEMPTS,
        classify,
    )
    .await
}

/// Logs and counts (`volume_daemon_cloudstack_retries{command="revertSnapshot"}`) a
/// revertSnapshot about to be sent again because `why` and no job of it runs.
pub(super) fn resent(cloud: Cloud<'_>, snapshot: SnapshotId, why: &str) {
    tracing::warn!(%snapshot, why, "no revertSnapshot job runs on the snapshot: sending the revert (again)");
    cloudstack::Observer::retry(&*cloud.ctx.metrics, "revertSnapshot");
}

/// Sends of a revertSnapshot whose answers were lost (see [`revert`]).
const REVERT_ATTEMPTS: usize = 2;

/// `deleteSnapshot`. `false`: the snapshot was already gone.
pub(super) async fn delete_snapshot(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
    snapshot: SnapshotId,
) -> Result<bool, Halt> {
    mutate(
        cloud,
        op,
        || async move {
            match cloud.client.delete_snapshot(snapshot).await {
                Ok(job) => Ok(Sent::Job(job, volume)),
                Err(e) if e.is_not_found() => Ok(Sent::Done(false)),
                Err(e) => Err(e),
            }
        },
        || async move {
            Ok(match listed_snapshot(cloud, snapshot).await? {
                None => Effect::Reached(true),
                Some(s) => match s.running_job() {
                    Some(job) => Effect::Running(job, volume),
                    None => Effect::NotYet,
                },
            })
        },
        |job| -> Job<'_, bool> {
            Box::pin(async move { wait_plain(cloud, job).await.map(|()| true) })
        },
        ATTEMPTS,
        classify,
    )
    .await
}

/// `resizeVolume` to `gib` GiB: the volume once its job ended.
pub(super) async fn resize(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
    gib: u64,
    shrink_ok: bool,
) -> Result<Volume, Halt> {
    let bytes = gib << 30;
    mutate(
        cloud,
        op,
        || async move {
            let job = cloud.client.resize_volume(volume, gib, shrink_ok).await?;
            Ok(Sent::Job(job, volume))
        },
        || volume_effect(cloud.client, volume, move |v| v.size == Some(bytes)),
        volume_job(cloud),
        ATTEMPTS,
        classify,
    )
    .await
}

/// Waits [`SETTLE_AFTER_TIMEOUT`] when `lost` was a timeout (not a refused or reset
/// connection, where nothing is still in progress).
pub(super) async fn settle_after(ctx: &Context, lost: &CloudStackError) -> Result<(), Halt> {
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

/// What `listVolumes` shows of `volume` after a lost answer: `reached` says whether it is in
/// the state the call would produce.
async fn volume_effect(
    client: &Client,
    volume: VolumeId,
    reached: impl Fn(&Volume) -> bool,
) -> Result<Effect<Volume>, Halt> {
    let now = current(client, volume).await?;
    Ok(if reached(&now) {
        Effect::Reached(now)
    } else if let Some(job) = now.running_job() {
        Effect::Running(job, volume)
    } else {
        Effect::NotYet
    })
}

/// `attachVolume`: the volume as CloudStack lists it once attached.
pub(super) async fn attach(
    cloud: Cloud<'_>,
    op: &mut Operation,
    attach: &AttachVolume,
) -> Result<Volume, Halt> {
    let (volume, vm, device) = (attach.volume_id, attach.vm_id, attach.device_id);
    let reached =
        |v: &Volume| v.virtualmachineid == Some(vm) && device.is_none_or(|d| v.deviceid == Some(d));
    mutate(
        cloud,
        op,
        || async move {
            let job = cloud.client.attach_volume(volume, vm, device).await?;
            Ok(Sent::Job(job, volume))
        },
        || volume_effect(cloud.client, volume, reached),
        volume_job(cloud),
        ATTEMPTS,
        classify,
    )
    .await
}

/// `detachVolume`: the volume as CloudStack lists it once detached.
pub(super) async fn detach(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
) -> Result<Volume, Halt> {
    mutate(
        cloud,
        op,
        || async move {
            let job = cloud.client.detach_volume(volume).await?;
            Ok(Sent::Job(job, volume))
        },
        || volume_effect(cloud.client, volume, |v| v.virtualmachineid.is_none()),
        volume_job(cloud),
        ATTEMPTS,
        classify,
    )
    .await
}

/// `deleteVolume` (synchronous). `false`: the volume was already gone.
pub(super) async fn delete(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
) -> Result<bool, Halt> {
    mutate(
        cloud,
        op,
        || async move {
            match cloud.client.delete_volume(volume).await {
                Ok(()) => Ok(Sent::Done(true)),
                // Gone meanwhile (CloudStack's answer for an id it does not know).
                Err(e) if e.is_not_found() => Ok(Sent::Done(false)),
                Err(e) => Err(e),
            }
        },
        || async move {
            let listed = cloud.client.get_volume(volume).await;
            Ok(match listed.map_err(|e| classify(&e))? {
                None => Effect::Reached(true),
                Some(_) => Effect::NotYet,
            })
        },
        // deleteVolume starts no job.
        |_| async { Ok(true) },
        ATTEMPTS,
        classify,
    )
    .await
}

/// `createVolume` of `create` in `zone`: the new volume once its job ended.
pub(super) async fn create(
    cloud: Cloud<'_>,
    op: &mut Operation,
    create: &CreateVolume,
    zone: ZoneId,
    offering: DiskOfferingId,
) -> Result<Volume, Halt> {
    let accepted = op.created_at;
    let id = &op.id().clone();
    mutate(
        cloud,
        op,
        || async move {
            let size = Some(create.size.gib_rounded_up());
            let (volume, job) = (cloud.client)
                .create_volume(&create.name, zone, offering, size)
                .await?;
            tracing::info!(%volume, job = %job, "createVolume accepted");
            Ok(Sent::Job(job, volume))
        },
        || async move {
            let found = find_created(cloud, id, accepted, create, zone).await?;
            Ok(match found {
                Some(v) => match v.running_job() {
                    Some(job) => Effect::Running(job, v.id),
                    None => Effect::Reached(v),
                },
                None => Effect::NotYet,
            })
        },
        volume_job(cloud),
        ATTEMPTS,
        |lost| unanswered(create, lost),
    )
    .await
}

/// The end of a create whose every createVolume went unanswered and whose volume was not
/// found after the last: CloudStack may still make it, so the producer must not simply send the
/// command again (not retryable; the hint says what to look for).
fn unanswered(create: &CreateVolume, last: &CloudStackError) -> EventError {
    EventError::new(
        ErrorCode::Timeout,
        format!("createVolume was sent {ATTEMPTS} times and never answered; no volume named {:?} was found after the last: {last}", create.name),
    )
    .with_hint(format!(
        "CloudStack may still create volume {:?}: look for it (listVolumes name={}) or send a reconcile before creating it again",
        create.name, create.name
    ))
}

/// How far CloudStack's clock may be behind the daemon's when a volume's `created` is compared
/// with the time its command was accepted (an earlier volume of the name cannot be the
/// command's; one within this much is taken to be, unless another operation claims it).
const CLOCK_SKEW_ALLOWED: TimeDelta = TimeDelta::seconds(5);

/// The volume the create operation `id` (accepted at `accepted`) made, if CloudStack has it:
/// same name and zone, in the daemon's own account, created after the command was accepted
/// (give or take [`CLOCK_SKEW_ALLOWED`]), not another operation's. Creates of one name never
/// run at once (the executor's lanes), so an unrecorded volume of the name is this one's.
pub(super) async fn find_created(
    cloud: Cloud<'_>,
    id: &schema::CommandId,
    accepted: chrono::DateTime<chrono::Utc>,
    create: &CreateVolume,
    zone: ZoneId,
) -> Result<Option<Volume>, Halt> {
    // CloudStack's `created` is whole seconds on its own clock: allow for both.
    let since = accepted - CLOCK_SKEW_ALLOWED;
    let filter = [("name", create.name.clone()), ("zoneid", zone.to_string())];
    let listed = cloud
        .client
        .list_own_volumes(&filter)
        .await
        .map_err(|e| classify(&e))?;
    for v in listed {
        if v.created_at().is_none_or(|c| c < since) {
            continue;
        }
        let claimed = cloud
            .ctx
            .db(
                &format!("check whether volume {} is another operation's", v.id),
                || async { Ok(cloud.ctx.store.volume_claimed_by_other(v.id, id).await?) },
            )
            .await?;
        if !claimed {
            return Ok(Some(v));
        }
    }
    Ok(None)
}
