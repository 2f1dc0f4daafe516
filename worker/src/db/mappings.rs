//! `device_mappings` writes: the change an ending operation makes, inside its transaction.

use sqlx::MySqlConnection;

use crate::db::{exports, mode_column};
use crate::mappings::{DeviceMapping, MappingChange};

/// Applies `change` inside the caller's transaction.
pub(crate) async fn apply(
    conn: &mut MySqlConnection,
    change: &MappingChange,
) -> Result<(), sqlx::Error> {
    match change {
        MappingChange::Remove(volume) => {
            sqlx::query("DELETE FROM device_mappings WHERE volume_id = ?")
                .bind(volume.to_string())
                .execute(&mut *conn)
                .await?;
            // Exports exist only for host attachments: the volume's, if any, went with it.
            exports::mark_removed(conn, *volume).await?;
        }
        MappingChange::Resized(volume, size) => {
            sqlx::query("UPDATE device_mappings SET size = ? WHERE volume_id = ?")
                .bind(size)
                .bind(volume.to_string())
                .execute(&mut *conn)
                .await?;
        }
        MappingChange::Upsert(m) => upsert(conn, m).await?,
    }
    Ok(())
}

/// Records `m` (a new attachment, or the truth a reconcile found).
async fn upsert(conn: &mut MySqlConnection, m: &DeviceMapping) -> Result<(), sqlx::Error> {
    // A stale row may still claim this device path on this VM (a device that vanished
    // and was reused by the kernel): the new attachment is the truth.
    if let Some(path) = &m.device_path {
        sqlx::query(
            "DELETE FROM device_mappings WHERE vm_id = ? AND device_path = ? AND volume_id <> ?",
        )
        .bind(m.vm_id.to_string())
        .bind(path)
        .bind(m.volume_id.to_string())
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO device_mappings (volume_id, vm_id, operation_mode, device_path, by_id_path, serial, \
         cloudstack_device_id, cloudstack_state, linux_state, size, last_sync, \
         persistent_device_name, symlink_path) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE vm_id = VALUES(vm_id), operation_mode = VALUES(operation_mode), \
         device_path = VALUES(device_path), by_id_path = VALUES(by_id_path), serial = VALUES(serial), \
         cloudstack_device_id = VALUES(cloudstack_device_id), cloudstack_state = VALUES(cloudstack_state), \
         linux_state = VALUES(linux_state), size = VALUES(size), last_sync = VALUES(last_sync), \
         persistent_device_name = VALUES(persistent_device_name), symlink_path = VALUES(symlink_path)",
    )
    .bind(m.volume_id.to_string())
    .bind(m.vm_id.to_string())
    .bind(mode_column(m.mode))
    .bind(m.device_path.as_deref())
    .bind(m.by_id_path.as_deref())
    .bind(m.serial.as_deref())
    .bind(m.cloudstack_device_id)
    .bind(m.cloudstack_state.as_str())
    .bind(m.linux_state.as_str())
    .bind(m.size)
    .bind(m.last_sync)
    .bind(m.host.as_ref().map(|h| h.persistent_name.as_str()))
    .bind(m.host.as_ref().map(|h| h.symlink_path.as_str()))
    .execute(&mut *conn)
    .await?;
    if let Some((name, target)) = m.host.as_ref().and_then(|h| h.export.as_ref()) {
        exports::upsert_active(conn, m.volume_id, name, target).await?;
    }
    Ok(())
}
