//! `resize`: the volume to a new size (`resizeVolume`, whole GiB rounded up). The same size
//! after rounding completes with no CloudStack call; a smaller one needs `shrink_ok`. A
//! host-attached volume keeps its device, persistent name and export: the resize completes
//! once the guest sees the new size, and its event carries them.

use std::time::Duration;

use cloudstack::Volume;
use schema::command::ResizeVolume;
use schema::{ErrorCode, EventError, OperationType, VolumeId, VolumeInfo, ZoneId};

use super::mutate::{self, Cloud};
use super::outcome::{Attachment, Completed};
use super::{Halt, Operation, jobs};
use crate::context::Context;

pub(super) async fn run(
    ctx: &Context,
    op: &mut Operation,
    resize: &ResizeVolume,
) -> Result<Completed, Halt> {
    let cs = ctx.session().await?;
    let polling = cs.polling(OperationType::Resize);
    let volume = resize.volume_id;
    // A resumed resize waits for its recorded job here, then finds the size reached.
    let listed = jobs::settled(ctx, op, &cs.client, polling, volume).await?;
    let previous = listed.size.unwrap_or_default();
    let gib = resize.size.gib_rounded_up();
    let wanted = gib << 30;
    if wanted < previous && !resize.shrink_ok {
        return Err(EventError::new(
            ErrorCode::InvalidCommand,
            format!(
                "volume {volume} is {previous} bytes; resizing it to {wanted} bytes ({gib} GiB) would shrink it"
            ),
        )
        .with_hint("send the resize with \"shrink_ok\": true to shrink the volume (its data past the new size is lost)")
        .into());
    }
    let resized = if wanted == previous {
        tracing::info!(
            size = wanted,
            "already this size; nothing to do in CloudStack"
        );
        listed
    } else {
        let cloud = Cloud {
            ctx,
            client: &cs.client,
            polling,
        };
        mutate::resize(cloud, op, volume, gib, resize.shrink_ok).await?
    };
    let on_host = cs.host_vm.is_some() && resized.virtualmachineid == cs.host_vm;
    let host = match on_host {
        true => Some(host_side(ctx, volume, wanted).await?),
        false => None,
    };
    Ok(Completed::Resized {
        volume: info(&resized, wanted, cs.zone)?,
        previous_size: previous,
        host,
    })
}

fn info(v: &Volume, size: u64, zone: Option<ZoneId>) -> Result<VolumeInfo, Halt> {
    let zone_id = v.zoneid.or(zone).ok_or_else(|| {
        EventError::new(
            ErrorCode::Internal,
            format!("CloudStack reported volume {} without a zone", v.id),
        )
    })?;
    Ok(VolumeInfo {
        id: v.id,
        name: v.name.clone(),
        size: v.size.unwrap_or(size),
        zone_id,
        state: v.state.clone(),
    })
}

/// A host-attached volume after its resize: once the guest device shows `size` (the device
/// monitor reads it), its device path, persistent name and export, which stay as they were.
async fn host_side(ctx: &Context, volume: VolumeId, size: u64) -> Result<Attachment, Halt> {
    let serial = volume.disk_serial();
    let deadline = tokio::time::Instant::now() + ctx.correlation_timeout;
    let device = loop {
        let table = ctx.devices.table();
        let seen = table
            .devices
            .values()
            .find(|p| p.device.serial.as_deref() == Some(serial.as_str()));
        match seen {
            Some(p) if p.device.size == Some(size) => break p.device.name.clone(),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(EventError::new(
                    ErrorCode::DeviceCorrelationTimeout,
                    format!(
                        "volume {volume} was resized to {size} bytes in CloudStack but the guest device with serial {serial} did not show that size within {}s",
                        ctx.correlation_timeout.as_secs()
                    ),
                )
                .into());
            }
            _ => {}
        }
        let pause = ctx.devices.period().min(Duration::from_millis(250));
        ctx.until_shutdown(
            "waiting for the guest to see the new size",
            tokio::time::sleep(pause),
        )
        .await?;
    };
    let name = ctx
        .db("read the persistent name", || async {
            Ok(ctx.store.persistent_name_of(volume).await?)
        })
        .await?;
    let by_id = ctx.devices.by_id_link(&serial).await;
    let persistent = name.map(|n| ctx.host.persistent_path(&n));
    let export = persistent
        .as_ref()
        .and_then(|p| ctx.host.export_of(volume, p))
        .map(|e| e.event());
    Ok(Attachment::Host {
        device_path: format!("/dev/{device}"),
        by_id_path: by_id.map(|p| p.display().to_string()),
        persistent_path: persistent
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        nbd_export: export,
    })
}
