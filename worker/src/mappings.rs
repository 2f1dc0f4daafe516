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
    pub cloudstack_state: CloudStackState,
    pub linux_state: LinuxState,
    /// Bytes.
    pub size: Option<u64>,
    pub last_sync: DateTime<Utc>,
    /// A host attachment's persistent name and export, once made.
    pub host: Option<Box<HostRecord>>,
}

/// The files of a host attachment (docs/host.md) as recorded with its mapping: the persistent
/// name (`persistent_device_name`, `symlink_path`) and, with exports on, its `nbd_exports` row.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub persistent_name: String,
    pub symlink_path: String,
    /// `(export_name, target_path)`.
    pub export: Option<(String, String)>,
}

/// What CloudStack says of the attachment (`cloudstack_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudStackState {
    /// CloudStack reports the volume attached to `vm_id`.
    Attached,
}

/// Where the guest device is (`linux_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxState {
    /// A host attachment whose device was found: `device_path` is set.
    Present,
    /// A host attachment with no device (not seen yet, or vanished).
    Missing,
    /// Attached to another VM: this guest has no device for it.
    Remote,
}

/// A column value that names no variant (the row was written by something else).
#[derive(Debug, thiserror::Error)]
#[error("{column} {value:?} is not one this daemon writes")]
pub struct UnknownState {
    column: &'static str,
    value: String,
}

impl CloudStackState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "attached",
        }
    }
}

impl TryFrom<String> for CloudStackState {
    type Error = UnknownState;
    fn try_from(value: String) -> Result<Self, UnknownState> {
        match value.as_str() {
            "attached" => Ok(Self::Attached),
            _ => Err(UnknownState {
                column: "cloudstack_state",
                value,
            }),
        }
    }
}

impl LinuxState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Present => "present",
            Self::Missing => "missing",
            Self::Remote => "remote",
        }
    }
}

impl TryFrom<String> for LinuxState {
    type Error = UnknownState;
    fn try_from(value: String) -> Result<Self, UnknownState> {
        match value.as_str() {
            "present" => Ok(Self::Present),
            "missing" => Ok(Self::Missing),
            "remote" => Ok(Self::Remote),
            _ => Err(UnknownState {
                column: "linux_state",
                value,
            }),
        }
    }
}

/// What an operation does to the mappings when it ends.
#[derive(Debug, Clone, PartialEq)]
pub enum MappingChange {
    Upsert(DeviceMapping),
    Remove(VolumeId),
    /// The volume's size (bytes) changed: its mapping, if any, records it.
    Resized(VolumeId, u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_what_they_write() {
        for s in [LinuxState::Present, LinuxState::Missing, LinuxState::Remote] {
            assert_eq!(LinuxState::try_from(s.as_str().to_owned()).ok(), Some(s));
        }
        let a = CloudStackState::Attached;
        assert_eq!(
            CloudStackState::try_from(a.as_str().to_owned()).ok(),
            Some(a)
        );
        let err = LinuxState::try_from("gone".to_owned()).expect_err("not a state");
        assert_eq!(
            err.to_string(),
            "linux_state \"gone\" is not one this daemon writes"
        );
    }
}
