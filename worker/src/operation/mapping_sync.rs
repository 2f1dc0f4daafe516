//! Keeps the `device_mappings` of host attachments true to the guest: a mapped device that
//! vanishes becomes `linux_state = missing` (no device path), one that reappears becomes
//! `present` again with its (possibly new) path. Driven by the monitor's events; after a lag,
//! and at start, every host mapping is recomputed from the device table.

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::db::devices::{DeviceFact, HostMapping};
use crate::db::fence::Fenced;
use crate::db::store::{Store, StoreError};
use crate::devices::{DeviceChange, DeviceEvent, DeviceTable, Devices};
use crate::host::{self, HostFiles, Target};
use crate::mappings::LinuxState;
use crate::retry;

/// Runs for one active period. Every mapping write is fenced (by the `Store` call); a
/// fenced write cancels `fenced` and ends the task. At every scan the persistent names that
/// point at a device node are checked (`check_node_links`).
pub(crate) async fn run(
    store: Store,
    devices: Devices,
    host: HostFiles,
    shutdown: CancellationToken,
    fenced: CancellationToken,
) {
    let mut events = devices.subscribe();
    let mut scans = devices.scans();
    if resync(&store, &devices.table()).await.is_err() {
        fenced.cancel();
        return;
    }
    repoint(&store, &devices, &host).await;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            scanned = scans.changed() => {
                let Ok(()) = scanned else { return };
                let table = scans.borrow_and_update().clone();
                check_node_links(&devices, &host, &table).await;
                continue;
            }
            e = events.recv() => e,
        };
        match event {
            Ok(e) => {
                if let DeviceChange::Removed = e.change {
                    devices.release_device(&e.device.name);
                }
                match apply_retrying(&store, &e).await {
                    Ok(()) if matches!(e.change, DeviceChange::Added) => {
                        repoint(&store, &devices, &host).await;
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

/// Gives every host mapping whose device is there (found by the volume's serial) its
/// persistent name and export entry again, pointing at the device's by-id link, else its node:
/// a device that came back, possibly under another name. Under the host files' lock, so a
/// detach that removed a volume's files is committed before its mapping is read here.
async fn repoint(store: &Store, devices: &Devices, host: &HostFiles) {
    let _held = host.lock().await;
    let rows = match store.host_links().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read host mappings to re-point persistent names");
            return;
        }
    };
    for row in rows {
        let Some(name) = &row.persistent_device_name else {
            continue;
        };
        let serial = row.volume_id.disk_serial();
        let Some(device) = devices.named(&serial) else {
            continue;
        };
        let target = host::target_of(devices, &device, Some(&serial), None).await;
        match host.ensure(row.volume_id, name, &target).await {
            Ok(true) => {
                tracing::info!(volume = %row.volume_id, name, target = %target.path().display(), "persistent name re-pointed")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, volume = %row.volume_id, "cannot re-point persistent name")
            }
        }
    }
}

/// The persistent names that point at a device node (no by-id link came), checked against
/// this scan's table: one whose device is gone or carries another serial is removed at once
/// (the kernel may have given the name to another disk: its export leads nowhere rather than
/// to that disk); one whose by-id link udev has made since is pointed at it.
async fn check_node_links(devices: &Devices, host: &HostFiles, table: &DeviceTable) {
    if host.node_links().is_empty() {
        return;
    }
    let _held = host.lock().await;
    for link in host.node_links() {
        if let Some(serial) = &link.serial
            && let Some(by_id) = devices.by_id_link(serial).await
        {
            match host
                .ensure(link.volume, &link.name, &Target::ById(by_id))
                .await
            {
                Ok(_) => {
                    tracing::info!(volume = %link.volume, name = link.name, "udev made the by-id link: persistent name points at it now")
                }
                Err(e) => {
                    tracing::warn!(error = %e, volume = %link.volume, "cannot point the persistent name at its by-id link")
                }
            }
            continue;
        }
        let now = table.devices.get(&link.device).map(|p| &p.device.serial);
        if now == Some(&link.serial) {
            continue;
        }
        tracing::warn!(
            volume = %link.volume,
            name = link.name,
            device = link.device,
            now = ?now,
            "the device this persistent name points at is gone or carries another serial: name removed"
        );
        if let Err(e) = host.remove_persistent(&link.name).await {
            tracing::error!(error = %e, volume = %link.volume, "cannot remove a persistent name that may lead to another disk");
        }
    }
}

/// [`apply`], tried again while the error is transient (a dropped connection, a killed
/// session): a device event is not read twice, so giving up loses it until the next resync.
async fn apply_retrying(store: &Store, e: &DeviceEvent) -> Result<(), StoreError> {
    let what = format!("record a change of device {}", e.device.name);
    retry::bounded(&what, 5, retry::transient, || apply(store, e)).await
}

async fn apply(store: &Store, e: &DeviceEvent) -> Result<(), StoreError> {
    let path = &format!("/dev/{}", e.device.name);
    let size = e.device.size;
    let fact = match (&e.change, &e.device.serial) {
        (DeviceChange::Removed, _) => DeviceFact::Removed { path },
        (DeviceChange::Added, Some(serial)) => DeviceFact::Added { serial, path, size },
        (DeviceChange::Resized { .. }, _) => DeviceFact::Resized { path, size },
        // No serial: no volume's device.
        (DeviceChange::Added, None) => return Ok(()),
    };
    store.record_device(&fact).await
}

/// Recomputes every host mapping from the table. `Err` only when fenced.
async fn resync(store: &Store, table: &DeviceTable) -> Result<(), Fenced> {
    let rows = match store.host_mappings().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read device_mappings to resynchronise");
            return Ok(());
        }
    };
    for row in rows {
        let HostMapping {
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
        let updated = store
            .set_host_device(volume, want_path.as_deref(), want_state)
            .await;
        match updated {
            Ok(()) => {}
            Err(StoreError::Fenced(f)) => {
                tracing::error!(error = %f, "mapping resync fenced");
                return Err(f);
            }
            Err(e) => tracing::warn!(error = %e, %volume, "cannot resynchronise device mapping"),
        }
    }
    Ok(())
}
