//! The `device_mappings` table: where each attached volume is. Written in the transaction that
//! ends an attach or detach; kept current by the device monitor for host attachments.

use chrono::{DateTime, Utc};
use sqlx::MySqlConnection;

use schema::VmId;
use schema::VolumeId;
use schema::event::AttachMode;

/// One attached volume.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMapping {
    pub volume_id: VolumeId,
    pub vm_id: VmId,
    pub mode: AttachMode,
    /// `/dev/vdX` for a host attachment whose device was found; `None` otherwise.
    pub device_path: Option<String>,
    pub by_id_path: Option<String>,
    pub serial: Option<String>,
    pub cloudstack_device_id: Option<u32>,
    /// `attached` once CloudStack reports the attachment.
    pub cloudstack_state: &'static str,
    /// `present`, `missing` (host, no device), or `remote`.
    pub linux_state: &'static str,
    /// Bytes.
    pub size: Option<u64>,
    pub last_sync: DateTime<Utc>,
}

/// What an operation does to the mappings when it ends.
#[derive(Debug, Clone, PartialEq)]
pub enum MappingChange {
    Upsert(DeviceMapping),
    Remove(VolumeId),
}

fn mode_column(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Host => "oma",
        AttachMode::Remote => "failover",
    }
}

/// Applies `change` inside the caller's transaction.
pub async fn apply(conn: &mut MySqlConnection, change: &MappingChange) -> Result<(), sqlx::Error> {
    match change {
        MappingChange::Remove(volume) => {
            sqlx::query("DELETE FROM device_mappings WHERE volume_id = ?")
                .bind(volume.to_string())
                .execute(conn)
                .await?;
        }
        MappingChange::Upsert(m) => {
            // A stale row may still claim this device path on this VM (a device that vanished
            // and was reused by the kernel): the new attachment is the truth.
            if let Some(path) = &m.device_path {
                sqlx::query("DELETE FROM device_mappings WHERE vm_id = ? AND device_path = ? AND volume_id <> ?")
                    .bind(m.vm_id.to_string())
                    .bind(path)
                    .bind(m.volume_id.to_string())
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO device_mappings (volume_id, vm_id, operation_mode, device_path, by_id_path, serial, \
                 cloudstack_device_id, cloudstack_state, linux_state, size, last_sync) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE vm_id = VALUES(vm_id), operation_mode = VALUES(operation_mode), \
                 device_path = VALUES(device_path), by_id_path = VALUES(by_id_path), serial = VALUES(serial), \
                 cloudstack_device_id = VALUES(cloudstack_device_id), cloudstack_state = VALUES(cloudstack_state), \
                 linux_state = VALUES(linux_state), size = VALUES(size), last_sync = VALUES(last_sync)",
            )
            .bind(m.volume_id.to_string())
            .bind(m.vm_id.to_string())
            .bind(mode_column(m.mode))
            .bind(m.device_path.as_deref())
            .bind(m.by_id_path.as_deref())
            .bind(m.serial.as_deref())
            .bind(m.cloudstack_device_id)
            .bind(m.cloudstack_state)
            .bind(m.linux_state)
            .bind(m.size)
            .bind(m.last_sync)
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}
