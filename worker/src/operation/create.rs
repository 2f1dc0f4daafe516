//! `create`: createVolume, then wait for its job.
//!
//! After a lost answer to createVolume the volume may exist: before re-issuing, `listVolumes`
//! is asked for a volume with the command's name in that zone, created after the command was
//! accepted and not claimed by another operation ([`mutate::create`]).

use cloudstack::{Client, JobPolling, Volume};
use schema::command::CreateVolume;
use schema::{DiskOfferingId, ErrorCode, EventError, OperationType, VolumeId, VolumeInfo, ZoneId};

use super::outcome::Completed;
use super::{Halt, Operation, jobs, mutate};
use crate::cloud::{Session, classify};
use crate::context::Context;

/// The volume an earlier execution of `op` may have made (it died between createVolume and
/// recording its job). That createVolume may still be on its way to acting: look only once it
/// has had the time to (`CREATE_RESUME_SETTLE_S`).
async fn earlier_volume(
    ctx: &Context,
    op: &Operation,
    client: &Client,
    polling: JobPolling,
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
    let cloud = mutate::Cloud {
        ctx,
        client,
        polling,
    };
    let found = mutate::find_created(cloud, op.id(), op.created_at, create, zone).await?;
    Ok(found.map(|v| v.id))
}

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    create: &CreateVolume,
) -> Result<Completed, Halt> {
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
                    earlier_volume(ctx, op, client, polling, create, zone).await?
                }
                None => None,
            };
            match found {
                Some(v) => {
                    let listed = jobs::current(client, v).await?;
                    (v, finish_found(ctx, op, client, polling, listed).await?)
                }
                None => {
                    let cloud = mutate::Cloud {
                        ctx,
                        client,
                        polling,
                    };
                    let made = mutate::create(cloud, op, create, zone, offering).await?;
                    (made.id, made)
                }
            }
        }
    };
    Ok(Completed::Created {
        volume: info(&cs, create, volume_id, &volume)?,
        job: op.job_id.clone(),
    })
}

/// The new volume as the event reports it.
fn info(
    cs: &Session,
    create: &CreateVolume,
    id: VolumeId,
    volume: &Volume,
) -> Result<VolumeInfo, Halt> {
    let zone_id = (volume.zoneid.or(create.zone_id).or(cs.zone)).ok_or_else(|| {
        EventError::new(
            ErrorCode::Internal,
            format!("CloudStack reported volume {id} without a zone"),
        )
    })?;
    Ok(VolumeInfo {
        id,
        name: volume.name.clone(),
        size: volume.size.unwrap_or(create.size.bytes()),
        zone_id,
        state: volume.state.clone(),
    })
}

/// A volume found by reconciliation: record it, and wait for its job if one still runs.
async fn finish_found(
    ctx: &Context,
    op: &mut Operation,
    client: &Client,
    polling: JobPolling,
    listed: Volume,
) -> Result<Volume, Halt> {
    tracing::info!(volume_id = %listed.id, "found the volume created for this command");
    match listed.running_job() {
        Some(job) => {
            ctx.record_job(op, Some(listed.id), &job).await?;
            jobs::wait(ctx, client, &job, polling).await
        }
        None => Ok(listed),
    }
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
