//! `create`: createVolume, then wait for its job.
//!
//! After a lost answer to createVolume the volume may exist: before re-issuing, `listVolumes`
//! is asked for a volume with the command's name in that zone, created after the command was
//! accepted and not claimed by another operation (CLOUDSTACK.md §4).

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;

use cloudstack::{Client, JobId, Volume};
use schema::command::CreateVolume;
use schema::{DiskOfferingId, ErrorCode, EventError, OperationType, VolumeId, VolumeInfo, ZoneId};

use super::{Completion, Halt, Operation, jobs};
use crate::cloud::{Session, classify};
use crate::context::Context;

/// The volume an earlier execution of `op` may have made (it died between createVolume and
/// recording its job). That createVolume may still be on its way to acting: look only once it
/// has had the time to (`CREATE_RESUME_SETTLE_S`).
async fn earlier_volume(
    ctx: &Context,
    op: &Operation,
    client: &Client,
    create: &CreateVolume,
    zone: ZoneId,
) -> Result<Option<VolumeId>, Halt> {
    tracing::info!(
        settle_s = ctx.create_resume_settle.as_secs(),
        "resumed create with no recorded job: waiting before looking for the volume it may have made"
    );
    ctx.until_shutdown(
        "waiting for an earlier createVolume to settle",
        tokio::time::sleep(ctx.create_resume_settle),
    )
    .await?;
    Ok(find_created(ctx, op, client, create, zone)
        .await?
        .map(|v| v.id))
}

/// How many times a createVolume whose answer was lost is tried in all.
const ATTEMPTS: usize = 3;

pub async fn run(
    ctx: &Context,
    op: &mut Operation,
    create: &CreateVolume,
) -> Result<Completion, Halt> {
    let cs = ctx.session().await?;
    let client = &cs.client;
    let polling = cs.polling(OperationType::Create);

    let (volume_id, volume) = match (op.volume_id, op.job_id.clone()) {
        // Resuming: the job was started and recorded before a restart.
        (Some(volume_id), Some(job)) => (volume_id, jobs::wait(ctx, client, &job, polling).await?),
        (known, _) => {
            let zone = zone(&cs, create).await?;
            let offering = offering(client, create, zone).await?;
            // An earlier execution may have died between createVolume and recording its job:
            // find its volume first. A first execution has nothing to find.
            let found = match known {
                Some(v) => Some(v),
                None if op.prior_attempts > 0 => {
                    earlier_volume(ctx, op, client, create, zone).await?
                }
                None => None,
            };
            match found {
                Some(v) => {
                    let listed = jobs::current(client, v).await?;
                    (v, finish_found(ctx, op, client, polling, listed).await?)
                }
                None => issue(ctx, op, client, polling, create, zone, offering).await?,
            }
        }
    };
    let zone_id = volume
        .zoneid
        .or(create.zone_id)
        .or(cs.zone)
        .ok_or_else(|| {
            EventError::new(
                ErrorCode::Internal,
                format!("CloudStack reported volume {volume_id} without a zone"),
            )
        })?;
    let info = VolumeInfo {
        id: volume_id,
        name: volume.name.clone(),
        size: volume.size.unwrap_or(create.size.bytes()),
        zone_id,
        state: volume.state.clone(),
    };
    Ok(Completion {
        volume_id: Some(volume_id),
        response: json!({"volume": info, "cloudstack_job_id": op.job_id}),
        volume: Some(info),
        ..Completion::default()
    })
}

/// createVolume, reconciling with listVolumes after a lost answer.
async fn issue(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: cloudstack::JobPolling,
    create: &CreateVolume,
    zone: ZoneId,
    offering: DiskOfferingId,
) -> Result<(VolumeId, Volume), Halt> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client
            .create_volume(
                &create.name,
                zone,
                offering,
                Some(create.size.gib_rounded_up()),
            )
            .await
        {
            Ok((volume_id, job)) => {
                tracing::info!(%volume_id, job = %job, "createVolume accepted");
                ctx.record_job(op, Some(volume_id), &job).await?;
                return Ok((volume_id, jobs::wait(ctx, client, &job, polling).await?));
            }
            Err(e) if e.was_answered() => return Err(classify(&e).into()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "no answer to createVolume; looking for the volume before re-issuing");
                jobs::settle_after(ctx, &e).await?;
                if let Some(listed) = find_created(ctx, op, client, create, zone).await? {
                    let id = listed.id;
                    return Ok((id, finish_found(ctx, op, client, polling, listed).await?));
                }
                if attempt >= ATTEMPTS {
                    return Err(unanswered(create, &e).into());
                }
            }
        }
    }
}

/// The end of a create whose every createVolume went unanswered and whose volume was not
/// found after the last: CloudStack may still make it, so the producer must not simply send the
/// command again (not retryable; the hint says what to look for).
fn unanswered(create: &CreateVolume, last: &cloudstack::CloudStackError) -> EventError {
    EventError::new(
        ErrorCode::Timeout,
        format!("createVolume was sent {ATTEMPTS} times and never answered; no volume named {:?} was found after the last: {last}", create.name),
    )
    .with_hint(format!(
        "CloudStack may still create volume {:?}: look for it (listVolumes name={}) or send a reconcile before creating it again",
        create.name, create.name
    ))
}

/// A volume found by reconciliation: record it, and wait for its job if one still runs.
async fn finish_found(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: cloudstack::JobPolling,
    listed: Volume,
) -> Result<Volume, Halt> {
    tracing::info!(volume_id = %listed.id, "found the volume created for this command");
    match (listed.jobstatus, listed.jobid.clone()) {
        (Some(0), Some(job)) => {
            let job = JobId(job);
            ctx.record_job(op, Some(listed.id), &job).await?;
            jobs::wait(ctx, client, &job, polling).await
        }
        _ => Ok(listed),
    }
}

/// The volume this command created, if CloudStack has it: same name and zone, created after the
/// command was accepted (CloudStack's timestamps have whole seconds), not another operation's.
async fn find_created(
    ctx: &Context,
    op: &Operation,
    client: &Client,
    create: &CreateVolume,
    zone: ZoneId,
) -> Result<Option<Volume>, Halt> {
    let since = op
        .created_at
        .duration_trunc(TimeDelta::seconds(1))
        .unwrap_or(op.created_at);
    let listed = client
        .list_volumes(&[("name", create.name.clone()), ("zoneid", zone.to_string())])
        .await
        .map_err(|e| classify(&e))?;
    for v in listed {
        let created = v
            .created
            .as_deref()
            .and_then(|c| DateTime::parse_from_str(c, "%Y-%m-%dT%H:%M:%S%z").ok())
            .map(|c| c.with_timezone(&Utc));
        if created.is_none_or(|c| c < since) {
            continue;
        }
        let claimed = ctx
            .store
            .volume_claimed_by_other(v.id, op.id())
            .await
            .map_err(|e| {
                EventError::new(
                    ErrorCode::Internal,
                    format!(
                        "checking whether volume {} belongs to another operation: {e}",
                        v.id
                    ),
                )
            })?;
        if !claimed {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The command's zone, else the configured one, else CloudStack's first.
async fn zone(cs: &Session, create: &CreateVolume) -> Result<ZoneId, Halt> {
    if let Some(z) = create.zone_id.or(cs.zone) {
        return Ok(z);
    }
    let zones = cs.client.list_zones().await.map_err(|e| classify(&e))?;
    zones.first().map(|z| z.id).ok_or_else(|| {
        EventError::new(
            ErrorCode::CloudstackInvalidParameter,
            "CloudStack lists no zone",
        )
        .into()
    })
}

/// The command's disk offering, else the zone's first customized one.
async fn offering(
    client: &Client,
    create: &CreateVolume,
    zone: ZoneId,
) -> Result<DiskOfferingId, Halt> {
    if let Some(o) = create.disk_offering_id {
        return Ok(o);
    }
    let offerings = client
        .list_disk_offerings(Some(zone))
        .await
        .map_err(|e| classify(&e))?;
    offerings
        .into_iter()
        .find(|o| o.iscustomized)
        .map(|o| o.id)
        .ok_or_else(|| {
            EventError::new(
                ErrorCode::CloudstackInvalidParameter,
                format!(
                    "no disk_offering_id given and zone {zone} has no customized disk offering"
                ),
            )
            .into()
        })
}
