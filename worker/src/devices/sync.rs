//! Keeps the `device_mappings` of host attachments true to the guest: a mapped device that
//! vanishes becomes `linux_state = missing` (no device path), one that reappears becomes
//! `present` again with its (possibly new) path. Driven by the monitor's events; after a lag,
//! and at start, every host mapping is recomputed from the device table.

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{DeviceChange, DeviceEvent, DeviceTable, Devices};
use crate::db::store::{Store, StoreError, now};
use crate::db::{devices, exports};
use crate::host::{self, HostFiles};
use crate::mappings::LinuxState;

/// Runs for one active period. Every mapping write is fenced ([`Store::commit_fenced`]); a
/// fenced write cancels `fenced` and ends the task.
pub async fn run(
    store: Store,
    devices: Devices,
    host: HostFiles,
    shutdown: CancellationToken,
    fenced: CancellationToken,
) {
    let mut events = devices.subscribe();
    if resync(&store, &devices.table()).await.is_err() {
        fenced.cancel();
        return;
    }
    repoint(&store, &host).await;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(e) => {
                if let DeviceChange::Removed = e.change {
                    devices.release_device(&e.device.name);
                }
                match apply(&store, &e).await {
                    Ok(()) if matches!(e.change, DeviceChange::Added) => {
                        repoint(&store, &host).await;
                    }
                    Ok(()) => {}
                    Err(StoreError::Fenced(f)) => {
                        tracing::error!(error = %f, "mapping sync fenced");
                        fenced.cancel();
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, device = %e.device.name, "cannot update device_mappings");
                    }
                }
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "device events lagged; resynchronising mappings from the device table"
                );
                if resync(&store, &devices.table()).await.is_err() {
                    fenced.cancel();
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Points every persistent name at its device again (a device that came back under another
/// name, with no by-id link to follow it). Only names that point elsewhere are rewritten.
async fn repoint(store: &Store, host: &HostFiles) {
    let rows = match exports::host_links(store.pool()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read host mappings to re-point persistent names");
            return;
        }
    };
    for row in rows {
        let (Some(name), Some(device)) = (&row.persistent_device_name, &row.device_path) else {
            continue;
        };
        let target = host::link_target(row.by_id_path.as_deref(), device).await;
        match host.repoint(name, &target).await {
            Ok(true) => {
                tracing::info!(volume = %row.volume_id, name, target = %target.display(), "persistent name re-pointed")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, volume = %row.volume_id, "cannot re-point persistent name")
            }
        }
    }
}

async fn apply(store: &Store, e: &DeviceEvent) -> Result<(), StoreError> {
    let path = format!("/dev/{}", e.device.name);
    let mut tx = store.pool().begin().await?;
    match (&e.change, &e.device.serial) {
        (DeviceChange::Removed, _) => devices::device_removed(&mut tx, &path, now()).await?,
        (DeviceChange::Added, Some(serial)) => {
            devices::device_added(&mut tx, serial, &path, e.device.size, now()).await?;
        }
        (DeviceChange::Resized { .. }, _) => {
            devices::device_resized(&mut tx, &path, e.device.size, now()).await?;
        }
        (DeviceChange::Added, None) => return Ok(tx.rollback().await?),
    }
    store.commit_fenced(tx).await
}

/// Recomputes every host mapping from the table. `Err` only when fenced.
async fn resync(store: &Store, table: &DeviceTable) -> Result<(), ()> {
    let rows = match devices::host_mappings(store.pool()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read device_mappings to resynchronise");
            return Ok(());
        }
    };
    for row in rows {
        let devices::HostMapping {
            volume_id: volume,
            serial,
            device_path: path,
            linux_state: state,
        } = row;
        let found = serial
            .as_deref()
            .and_then(|s| {
                table
                    .devices
                    .values()
                    .find(|p| p.device.serial.as_deref() == Some(s))
            })
            .map(|p| format!("/dev/{}", p.device.name));
        let (want_path, want_state) = match &found {
            Some(p) => (Some(p.clone()), LinuxState::Present),
            None => (None, LinuxState::Missing),
        };
        if want_path == path && want_state == state {
            continue;
        }
        let updated = async {
            let mut tx = store.pool().begin().await?;
            devices::set_host_device(&mut tx, volume, want_path.as_deref(), want_state, now())
                .await?;
            store.commit_fenced(tx).await
        }
        .await;
        match updated {
            Ok(()) => {}
            Err(StoreError::Fenced(f)) => {
                tracing::error!(error = %f, "mapping resync fenced");
                return Err(());
            }
            Err(e) => tracing::warn!(error = %e, %volume, "cannot resynchronise device mapping"),
        }
    }
    Ok(())
}
