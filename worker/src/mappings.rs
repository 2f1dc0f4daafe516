//! Where each attached volume is (`device_mappings`): the row type and the change an operation
//! makes. Written by the persistence layer (`db::mappings`) in the transaction that ends an attach or
//! detach; kept current by the device monitor for host attachments.

use chrono::{DateTime, Utc};

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
