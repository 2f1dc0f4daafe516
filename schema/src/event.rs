//! Completion events (docs/wire.md): CloudEvents 1.0 in structured mode.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::command::OperationType;
use crate::error::EventError;
use crate::ids::{CommandId, EventId, SnapshotId, VmId, VolumeId, ZoneId};

/// `content_type` of every event message.
pub const EVENT_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The CloudEvents `source` attribute.
pub const EVENT_SOURCE: &str = "volume-daemon";

/// Where an operation stands. `pending` and `executing` are in flight; the rest are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationStatus {
    Pending,
    Executing,
    Completed,
    Failed,
    Cancelled,
}

impl OperationStatus {
    pub const ALL: [OperationStatus; 5] = [
        Self::Pending,
        Self::Executing,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Executing => "executing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Executing)
    }
}

/// How an attached volume is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Attached to the VM the daemon runs on: the guest device is correlated.
    Host,
    /// Attached to another VM: no device path.
    Remote,
}

/// An NBD export of a host attachment: `url` is `NBD_URL/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NbdExport {
    /// `migration-vol-<volume_id>`.
    pub name: String,
    pub url: String,
}

impl NbdExport {
    /// The export name of `volume` (docs/host.md).
    pub fn name_of(volume: VolumeId) -> String {
        format!("migration-vol-{volume}")
    }
}

/// The `volume` object of a create event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    /// Bytes.
    pub size: u64,
    pub zone_id: ZoneId,
    /// CloudStack's state (`Allocated`, `Ready`, ...).
    pub state: String,
}

/// Serializes timestamps as RFC 3339 UTC with milliseconds (`2026-11-22T10:00:00.123Z`).
pub mod millis {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

/// The `type` of an event's data: the operation's type, or `unknown` for a rejected message
/// whose type could be read neither from its body nor from its routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventOpType {
    Create,
    Attach,
    Detach,
    Delete,
    Cancel,
    Reconcile,
    Snapshot,
    RevertSnapshot,
    DeleteSnapshot,
    Resize,
    Unknown,
}

impl EventOpType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Attach => "attach",
            Self::Detach => "detach",
            Self::Delete => "delete",
            Self::Cancel => "cancel",
            Self::Reconcile => "reconcile",
            Self::Snapshot => "snapshot",
            Self::RevertSnapshot => "revert_snapshot",
            Self::DeleteSnapshot => "delete_snapshot",
            Self::Resize => "resize",
            Self::Unknown => "unknown",
        }
    }

    /// The operation type, unless `unknown`.
    pub fn known(self) -> Option<OperationType> {
        OperationType::parse(self.as_str())
    }
}

impl From<OperationType> for EventOpType {
    fn from(op: OperationType) -> Self {
        match op {
            OperationType::Create => Self::Create,
            OperationType::Attach => Self::Attach,
            OperationType::Detach => Self::Detach,
            OperationType::Delete => Self::Delete,
            OperationType::Cancel => Self::Cancel,
            OperationType::Reconcile => Self::Reconcile,
            OperationType::Snapshot => Self::Snapshot,
            OperationType::RevertSnapshot => Self::RevertSnapshot,
            OperationType::DeleteSnapshot => Self::DeleteSnapshot,
            OperationType::Resize => Self::Resize,
        }
    }
}

impl std::fmt::Display for EventOpType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `data` of an event: the operation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventData {
    pub operation_id: CommandId,
    pub command_id: CommandId,
    /// The command's correlation id, else its command id: the same value as the event's AMQP
    /// `correlation_id` property, never null.
    pub correlation_id: String,
    #[serde(rename = "type")]
    pub op_type: EventOpType,
    pub status: OperationStatus,
    pub volume_id: Option<VolumeId>,
    pub vm_id: Option<VmId>,
    pub device_path: Option<String>,
    pub by_id_path: Option<String>,
    pub mode: Option<AttachMode>,
    /// Host attach only: the volume's persistent path (docs/host.md), stable across re-attaches.
    #[serde(default)]
    pub persistent_path: Option<String>,
    /// Host attach with exports on: the NBD export the replication engine writes through.
    #[serde(default)]
    pub nbd_export: Option<NbdExport>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub error: Option<EventError>,
    #[serde(with = "millis")]
    #[schemars(with = "DateTime<Utc>")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "millis")]
    #[schemars(with = "DateTime<Utc>")]
    pub completed_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Create only: the new volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeInfo>,
    /// Detach only: the volume was not attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub already_detached: Option<bool>,
    /// Delete only: the volume did not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub already_absent: Option<bool>,
    /// Cancel only: the command id of the operation it cancelled (or tried to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<CommandId>,
    /// Reconcile only: what it repaired (empty when nothing had drifted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
    /// Snapshot and revert_snapshot: the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// Delete_snapshot: the snapshot deleted (or already gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<SnapshotId>,
    /// Resize: the volume's size before, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_size: Option<u64>,
}

/// The `snapshot` object of a snapshot or revert_snapshot event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    /// CloudStack's name of the snapshot (it contains the command id that took it).
    pub name: String,
    /// CloudStack's state (`BackedUp`, `CreatedOnPrimary`, ...).
    pub state: String,
    /// When CloudStack took it.
    #[serde(with = "millis")]
    #[schemars(with = "DateTime<Utc>")]
    pub created: DateTime<Utc>,
}

/// One repair a reconcile made (docs/wire.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    pub volume_id: VolumeId,
    /// The VM the mapping is on after the change (before it, for a removed mapping).
    pub vm_id: Option<VmId>,
    pub what: ChangeKind,
    /// The value before the change (a VM id, a device path or an export name), null if none.
    pub before: Option<String>,
    /// The value after the change, null if none.
    pub after: Option<String>,
}

/// What a reconcile changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A mapping row for an attachment CloudStack shows and the daemon did not record.
    MappingAdded,
    /// CloudStack shows the volume detached (or gone): the row was removed.
    MappingRemoved,
    /// CloudStack shows the volume on another VM.
    MappingMoved,
    /// A host attachment's Linux device changed name.
    DeviceChanged,
    ExportAdded,
    ExportRemoved,
}

impl ChangeKind {
    pub const ALL: [Self; 6] = [
        Self::MappingAdded,
        Self::MappingRemoved,
        Self::MappingMoved,
        Self::DeviceChanged,
        Self::ExportAdded,
        Self::ExportRemoved,
    ];

    /// The wire name (`mapping_added`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MappingAdded => "mapping_added",
            Self::MappingRemoved => "mapping_removed",
            Self::MappingMoved => "mapping_moved",
            Self::DeviceChanged => "device_changed",
            Self::ExportAdded => "export_added",
            Self::ExportRemoved => "export_removed",
        }
    }
}

impl EventData {
    /// The data of a failed event for `command_id` that never became an operation (a rejected
    /// message): no volume, no duration. Without a correlation id the command id stands in.
    pub fn rejected(
        command_id: CommandId,
        op_type: EventOpType,
        correlation_id: Option<String>,
        error: EventError,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            operation_id: command_id.clone(),
            correlation_id: correlation_or_command_id(correlation_id, &command_id),
            command_id,
            op_type,
            status: OperationStatus::Failed,
            volume_id: None,
            vm_id: None,
            device_path: None,
            by_id_path: None,
            mode: None,
            persistent_path: None,
            nbd_export: None,
            metadata: BTreeMap::new(),
            error: Some(error),
            created_at: at,
            completed_at: at,
            duration_ms: 0,
            volume: None,
            already_detached: None,
            already_absent: None,
            target: None,
            changes: None,
            snapshot: None,
            snapshot_id: None,
            previous_size: None,
        }
    }
}

/// The correlation id an event carries: the command's, else its command id (docs/wire.md).
pub fn correlation_or_command_id(correlation_id: Option<String>, command_id: &CommandId) -> String {
    correlation_id.unwrap_or_else(|| command_id.as_str().to_owned())
}

/// A CloudEvents 1.0 structured event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(title = "volume-daemon completion event (CloudEvents 1.0, structured)")]
pub struct CloudEvent {
    pub specversion: String,
    pub id: EventId,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The volume id, when known (absent otherwise: CloudEvents attributes are never null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(with = "millis")]
    #[schemars(with = "DateTime<Utc>")]
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// Distributed-tracing extension: the command's trace, with the daemon's operation span
    /// as parent (only when the command carried a `traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The command's `tracestate`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    pub data: EventData,
}

/// Routing key and CloudEvent type of an event: `volume.<type>.<completed|failed|cancelled>`
/// (`volume.unknown.failed` for a rejected message of unknown type).
pub fn event_type(op: impl Into<EventOpType>, status: OperationStatus) -> String {
    format!("volume.{}.{}", op.into().as_str(), status.as_str())
}

impl CloudEvent {
    /// Wraps an operation outcome; the event type follows from its type and status.
    pub fn new(id: EventId, time: DateTime<Utc>, data: EventData) -> Self {
        Self {
            specversion: "1.0".into(),
            id,
            source: EVENT_SOURCE.into(),
            event_type: event_type(data.op_type, data.status),
            subject: data.volume_id.map(|v| v.to_string()),
            time,
            datacontenttype: "application/json".into(),
            traceparent: None,
            tracestate: None,
            data,
        }
    }

    /// The AMQP `correlation_id` of the event: the same as `data.correlation_id`.
    pub fn amqp_correlation_id(&self) -> &str {
        &self.data.correlation_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn sample() -> CloudEvent {
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123Z")
            .expect("time")
            .with_timezone(&Utc);
        let error = EventError::new(ErrorCode::CloudstackInvalidParameter, "bad offering")
            .with_cloudstack_code(Some(431));
        let data = EventData::rejected(
            CommandId::parse("cmd-1").expect("id"),
            OperationType::Create.into(),
            None,
            error,
            t,
        );
        CloudEvent::new(EventId::new_random(), t, data)
    }

    #[test]
    fn change_kinds_are_named_as_they_serialize() {
        for kind in ChangeKind::ALL {
            assert_eq!(serde_json::to_value(kind).expect("json"), kind.as_str());
        }
    }

    #[test]
    fn serializes_with_contract_field_names() {
        let ev = sample();
        let v = serde_json::to_value(&ev).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "volume.create.failed");
        assert_eq!(v["source"], "volume-daemon");
        assert_eq!(v["time"], "2026-11-22T10:00:00.123Z");
        assert_eq!(v["data"]["type"], "create");
        assert_eq!(v["data"]["status"], "failed");
        assert_eq!(v["data"]["error"]["code"], "CLOUDSTACK_INVALID_PARAMETER");
        assert_eq!(v["data"]["error"]["cloudstack_error_code"], 431);
        assert_eq!(v["data"]["error"]["retryable"], false);
        assert!(v["data"]["device_path"].is_null());
        assert!(v["data"].get("volume").is_none());
        assert!(
            v.get("subject").is_none(),
            "no volume id: no subject attribute at all"
        );
        assert_eq!(ev.amqp_correlation_id(), "cmd-1");
        assert_eq!(
            v["data"]["correlation_id"], "cmd-1",
            "no correlation id: the command id stands in, never null"
        );
        let back: CloudEvent = serde_json::from_value(v).expect("parse back");
        assert_eq!(back, ev);
    }
}
