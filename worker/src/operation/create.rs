//! `create`: createVolume, then wait for its job.

use serde_json::json;

use schema::command::CreateVolume;
use schema::{ErrorCode, EventError, VolumeInfo};

use super::{Completion, Halt, Operation};
use crate::cloud::classify;
use crate::context::Context;

pub async fn run(
    ctx: &Context,
    op: &mut Operation,
    create: &CreateVolume,
) -> Result<Completion, Halt> {
    let cs = ctx.cloud.session().await?;
    let client = &cs.client;

    let (volume_id, job) = match (op.volume_id, op.job_id.clone()) {
        // Resuming: the job was started and recorded before a restart.
        (Some(volume_id), Some(job)) => (volume_id, job),
        _ => {
            let zone = match create.zone_id.or(cs.zone) {
                Some(z) => z,
                None => client
                    .list_zones()
                    .await
                    .map_err(|e| classify(&e))?
                    .first()
                    .map(|z| z.id)
                    .ok_or_else(|| {
                        EventError::new(
                            ErrorCode::CloudstackInvalidParameter,
                            "CloudStack lists no zone",
                        )
                    })?,
            };
            let offering = match create.disk_offering_id {
                Some(o) => o,
                None => client
                    .list_disk_offerings(Some(zone))
                    .await
                    .map_err(|e| classify(&e))?
                    .into_iter()
                    .find(|o| o.iscustomized)
                    .map(|o| o.id)
                    .ok_or_else(|| {
                        EventError::new(
                            ErrorCode::CloudstackInvalidParameter,
                            format!("no disk_offering_id given and zone {zone} has no customized disk offering"),
                        )
                    })?,
            };
            let (volume_id, job) = client
                .create_volume(
                    &create.name,
                    zone,
                    offering,
                    Some(create.size.gib_rounded_up()),
                )
                .await
                .map_err(|e| classify(&e))?;
            tracing::info!(%volume_id, job = %job, "createVolume accepted");
            ctx.record_job(op, Some(volume_id), &job).await?;
            (volume_id, job)
        }
    };

    let volume = ctx
        .until_shutdown(
            &format!("waiting for job {job}"),
            client.wait_for_volume_job(&job, cs.polling),
        )
        .await?
        .map_err(|e| classify(&e))?;
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
        response: json!({"volume": info, "cloudstack_job_id": job}),
        volume: Some(info),
        ..Completion::default()
    })
}
