//! `snapshot`: a CloudStack snapshot of the volume (`createSnapshot`), complete when CloudStack
//! reports it usable. Its CloudStack name contains the command id, so a lost answer (or a crash
//! before the job id was stored) is found again with `listSnapshots` instead of taking a second
//! snapshot. `revert_snapshot` and `delete_snapshot` share the helpers here.

use cloudstack::{Snapshot, Volume};
use schema::{ErrorCode, EventError, OperationType, SnapshotId, SnapshotInfo, VolumeId};

use super::mutate::{self, Cloud, Effect};
use super::outcome::Completed;
use super::{Halt, Operation, jobs};
use crate::context::Context;

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    volume: VolumeId,
    name: Option<&str>,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let cloud = Cloud {
        ctx,
        client: &cs.client,
        polling: cs.polling(OperationType::Snapshot),
    };
    let name = cloudstack_name(op, name);
    let taken = match op.job_id.clone() {
        // Resuming: the job was started and recorded before a restart.
        Some(job) => mutate::wait_snapshot(cloud, job).await,
        None => {
            let listed = jobs::current(cloud.client, volume).await?;
            ready(&listed)?;
            match earlier(cloud, op, volume, &name).await? {
                Some(s) => Ok(s),
                None => mutate::snapshot(cloud, op, volume, &name).await,
            }
        }
    };
    let taken = taken.map_err(kvm_setting)?;
    Ok(Completed::SnapshotTaken {
        snapshot: usable(volume, taken)?,
    })
}

/// The snapshot's CloudStack name: the command's `name` (else `vd`) and the command id.
fn cloudstack_name(op: &Operation, name: Option<&str>) -> String {
    format!("{}-{}", name.unwrap_or("vd"), op.id())
}

/// The snapshot an earlier execution of `op` may have started (it died before recording the
/// job): found by its name, its job waited for.
async fn earlier(
    cloud: Cloud<'_>,
    op: &mut Operation,
    volume: VolumeId,
    name: &str,
) -> Result<Option<Snapshot>, Halt> {
    if op.prior_attempts == 0 {
        return Ok(None);
    }
    match mutate::snapshot_effect(cloud, volume, name).await? {
        Effect::Reached(s) => Ok(Some(s)),
        Effect::Running(job, _) => {
            cloud.ctx.record_job(op, Some(volume), &job).await?;
            Ok(Some(mutate::wait_snapshot(cloud, job).await?))
        }
        Effect::NotYet => Ok(None),
    }
}

/// A volume CloudStack has made no storage for (`Allocated`: never attached) has nothing to
/// snapshot.
fn ready(listed: &Volume) -> Result<(), Halt> {
    if listed.state == "Allocated" {
        return Err(EventError::new(
            ErrorCode::CloudstackInvalidParameter,
            format!(
                "volume {} is Allocated: CloudStack makes its storage at its first attach, so there is nothing to snapshot yet",
                listed.id
            ),
        )
        .with_hint("attach the volume once, then take the snapshot")
        .into());
    }
    Ok(())
}

/// A failure naming CloudStack's `kvm.snapshot.enabled` when that is why CloudStack refused:
/// not retryable, whatever code CloudStack used.
fn kvm_setting(h: Halt) -> Halt {
    match h {
        Halt::Fail(mut e, m) if e.message.contains("kvm.snapshot.enabled") => {
            e.retryable = false;
            e.hint = "CloudStack's global setting kvm.snapshot.enabled is off, so it refuses snapshots of a volume whose VM is running: turn the setting on, or stop the VM (or detach the volume), then send the snapshot again"
                .to_owned();
            Halt::Fail(e, m)
        }
        other => other,
    }
}

/// The snapshot as the event reports it, once CloudStack says it is usable.
pub(super) fn usable(volume: VolumeId, s: Snapshot) -> Result<SnapshotInfo, Halt> {
    if !s.is_usable() {
        return Err(EventError::new(
            ErrorCode::CloudstackJobFailed,
            format!(
                "snapshot {} of volume {volume} ended in state {:?}, not BackedUp",
                s.id, s.state
            ),
        )
        .into());
    }
    Ok(info(volume, s))
}

pub(super) fn info(volume: VolumeId, s: Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id,
        volume_id: s.volumeid.unwrap_or(volume),
        created: s.created_at().unwrap_or_else(crate::db::store::now),
        name: s.name,
        state: s.state,
    }
}

/// `snapshot_id` is not a snapshot of `volume` (or of any volume).
pub(super) fn not_found(volume: VolumeId, snapshot: SnapshotId) -> Halt {
    EventError::new(
        ErrorCode::SnapshotNotFound,
        format!("CloudStack has no snapshot {snapshot} of volume {volume}"),
    )
    .into()
}

/// The snapshot `snapshot` of `volume`, as CloudStack lists it; `None` when it does not exist;
/// `SNAPSHOT_NOT_FOUND` when it is another volume's.
pub(super) async fn of_volume(
    cloud: Cloud<'_>,
    volume: VolumeId,
    snapshot: SnapshotId,
) -> Result<Option<Snapshot>, Halt> {
    match mutate::listed_snapshot(cloud, snapshot).await? {
        Some(s) if s.volumeid.is_some_and(|v| v != volume) => Err(not_found(volume, snapshot)),
        found => Ok(found),
    }
}
