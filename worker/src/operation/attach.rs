//! `attach`: the volume ends attached to `vm_id` (desired state, so a retry is safe).
//!
//! Already attached to that VM: completes with no CloudStack call. Attached to another VM:
//! `VOLUME_IN_USE`. To the host VM (the one this daemon runs on) the guest device is found by
//! serial; the expectation is registered before the attach is sent.

use serde_json::json;

use cloudstack::Volume;
use schema::command::AttachVolume;
use schema::event::AttachMode;
use schema::{ErrorCode, EventError, OperationType, VmId, VolumeId};

use super::{Completion, Halt, Operation, jobs};
use crate::context::Context;
use crate::db::store::now;
use crate::devices::Found;
use crate::mappings::{DeviceMapping, MappingChange};

pub async fn run(
    ctx: &Context,
    op: &mut Operation,
    attach: &AttachVolume,
) -> Result<Completion, Halt> {
    let cs = ctx.cloud.session().await?;
    let client = &cs.client;
    let polling = cs.polling(OperationType::Attach);
    let (volume_id, vm) = (attach.volume_id, attach.vm_id);
    let mode = if cs.host_vm == Some(vm) {
        AttachMode::Host
    } else {
        AttachMode::Remote
    };
    let _one_at_a_time = ctx.lock_vm(vm).await;

    let listed = jobs::settled(ctx, op, client, polling, volume_id).await?;
    let expectation =
        (mode == AttachMode::Host).then(|| ctx.devices.expect(volume_id, listed.size));
    let volume = match listed.virtualmachineid {
        Some(v) if v == vm => {
            tracing::info!(%vm, "already attached to this VM; nothing to do in CloudStack");
            listed
        }
        Some(other) => {
            return Err(EventError::new(
                ErrorCode::VolumeInUse,
                format!("volume {volume_id} is attached to VM {other}, not {vm}: detach it first"),
            )
            .into());
        }
        None => {
            jobs::start_and_wait(
                ctx,
                op,
                client,
                polling,
                volume_id,
                || client.attach_volume(volume_id, vm, attach.device_id),
                |v| v.virtualmachineid == Some(vm),
            )
            .await?
        }
    };
    let response = json!({"volume": {
        "id": volume.id, "virtualmachineid": volume.virtualmachineid, "deviceid": volume.deviceid,
        "state": volume.state, "size": volume.size,
    }});
    let Some(expectation) = expectation else {
        return Ok(Completion {
            volume_id: Some(volume_id),
            vm_id: Some(vm),
            mode: Some(AttachMode::Remote),
            response,
            mapping: Some(MappingChange::Upsert(mapping(
                volume_id,
                vm,
                AttachMode::Remote,
                &volume,
                None,
                "remote",
            ))),
            ..Completion::default()
        });
    };

    // At least two scans after the job ended, whatever the job took.
    let waited = expectation.registered.elapsed();
    let timeout = ctx
        .correlation_timeout
        .max(waited + ctx.devices_period() * 2);
    match ctx
        .devices
        .correlate(&expectation, timeout, &ctx.shutdown)
        .await
    {
        Ok(found) => {
            tracing::info!(device = %found.device_path, matched_by = ?found.matched_by, "device correlated");
            ctx.metrics.correlated(expectation.registered.elapsed());
            let mut response = response;
            response["device_path"] = json!(found.device_path);
            Ok(Completion {
                volume_id: Some(volume_id),
                vm_id: Some(vm),
                mode: Some(AttachMode::Host),
                device_path: Some(found.device_path.clone()),
                by_id_path: found.by_id_path.clone(),
                response,
                mapping: Some(MappingChange::Upsert(mapping(
                    volume_id,
                    vm,
                    AttachMode::Host,
                    &volume,
                    Some(&found),
                    "present",
                ))),
                ..Completion::default()
            })
        }
        Err(_) if ctx.shutdown.is_cancelled() => Err(Halt::Interrupted(
            "shut down while waiting for the device".into(),
        )),
        Err(candidates) => {
            let seen = if candidates.is_empty() {
                "none".to_owned()
            } else {
                candidates.join(", ")
            };
            let error = EventError::new(
                ErrorCode::DeviceCorrelationTimeout,
                format!(
                    "volume {volume_id} is attached to host VM {vm} but no device with serial {} appeared within {}s; new devices seen: {seen}",
                    expectation.serial,
                    timeout.as_secs()
                ),
            );
            // The mapping records the truth: attached in CloudStack, missing in Linux.
            let truth = mapping(volume_id, vm, AttachMode::Host, &volume, None, "missing");
            Err(Halt::Fail(
                error,
                Some(Box::new(MappingChange::Upsert(truth))),
            ))
        }
    }
}

fn mapping(
    volume_id: VolumeId,
    vm: VmId,
    mode: AttachMode,
    volume: &Volume,
    found: Option<&Found>,
    linux_state: &'static str,
) -> DeviceMapping {
    DeviceMapping {
        volume_id,
        vm_id: vm,
        mode,
        device_path: found.map(|f| f.device_path.clone()),
        by_id_path: found.and_then(|f| f.by_id_path.clone()),
        serial: Some(volume_id.disk_serial()),
        cloudstack_device_id: volume.deviceid,
        cloudstack_state: "attached",
        linux_state,
        size: found.and_then(|f| f.size).or(volume.size),
        last_sync: now(),
    }
}
