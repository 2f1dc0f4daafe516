//! Volume commands (docs/wire.md) and their validation.
//!
//! [`Command::parse`] is the only way into the system for a message: it checks every field
//! and says which field is wrong and why. Everything downstream trusts a [`Command`].

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::ids::{CommandId, DiskOfferingId, IdError, SnapshotId, VmId, VolumeId, ZoneId};
use crate::size::ByteSize;
use crate::trace::TraceContext;

/// Largest accepted command body (docs/wire.md).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The kinds of operation: the four volume commands, and `cancel` and `reconcile`, which act
/// on the daemon's own records (docs/wire.md).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OperationType {
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
}

impl OperationType {
    pub const ALL: [OperationType; 10] = [
        Self::Create,
        Self::Attach,
        Self::Detach,
        Self::Delete,
        Self::Cancel,
        Self::Reconcile,
        Self::Snapshot,
        Self::RevertSnapshot,
        Self::DeleteSnapshot,
        Self::Resize,
    ];

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
        }
    }

    /// Whether operations of this type call CloudStack's mutating API (cancel and reconcile
    /// never do).
    pub fn mutates_cloudstack(self) -> bool {
        !matches!(self, Self::Cancel | Self::Reconcile)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for OperationType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The AMQP properties a command may carry next to its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// The W3C `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` header, if any.
    pub tracestate: Option<String>,
}

/// A validated command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub command_id: CommandId,
    /// The caller's correlation id (body field, else the AMQP property).
    pub correlation_id: Option<String>,
    /// Queue that also receives the terminal event, through the default exchange.
    pub reply_to: Option<String>,
    /// Free-form labels, stored and echoed in the events.
    pub metadata: BTreeMap<String, String>,
    /// The producer's trace context (AMQP headers `traceparent`, `tracestate`); a malformed
    /// one is left out, never a reason to refuse the command.
    pub trace: Option<TraceContext>,
    pub action: Action,
}

/// What the command asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create(CreateVolume),
    Attach(AttachVolume),
    Detach {
        volume_id: VolumeId,
    },
    Delete {
        volume_id: VolumeId,
    },
    /// End a `pending` operation as `cancelled`.
    Cancel {
        target: CommandId,
    },
    /// Repair `device_mappings` (and `nbd_exports`) from CloudStack and the device monitor:
    /// one VM, or every VM that has mappings and the host VM.
    Reconcile {
        vm_id: Option<VmId>,
    },
    /// Take a CloudStack snapshot of the volume.
    Snapshot {
        volume_id: VolumeId,
        /// Part of the snapshot's CloudStack name (which always contains the command id).
        name: Option<String>,
    },
    /// Return the volume to one of its snapshots.
    RevertSnapshot {
        volume_id: VolumeId,
        snapshot_id: SnapshotId,
    },
    /// Delete one of the volume's snapshots.
    DeleteSnapshot {
        volume_id: VolumeId,
        snapshot_id: SnapshotId,
    },
    Resize(ResizeVolume),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResizeVolume {
    pub volume_id: VolumeId,
    /// The new size; CloudStack receives whole GiB, rounded up.
    pub size: ByteSize,
    /// A smaller size is refused unless this is set.
    pub shrink_ok: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateVolume {
    /// The CloudStack volume name.
    pub name: String,
    pub size: ByteSize,
    /// When absent the daemon uses the zone's first customized disk offering.
    pub disk_offering_id: Option<DiskOfferingId>,
    /// When absent the daemon's configured zone.
    pub zone_id: Option<ZoneId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttachVolume {
    pub volume_id: VolumeId,
    pub vm_id: VmId,
    /// CloudStack's `deviceid` (0 = root disk; 3 is never valid).
    pub device_id: Option<u32>,
}

/// A message that is not a valid command. `command_id` is set when one could be read, so the
/// producer can be told through a failed event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid command{}: {reason}", command_id.as_ref().map(|id| format!(" {id}")).unwrap_or_default())]
pub struct InvalidCommand {
    pub command_id: Option<CommandId>,
    /// The `type` the message claimed, when it is one of the four.
    pub op_type: Option<OperationType>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub reason: String,
}

impl CreateVolume {
    /// A volume of `size` (CloudStack rounds up to whole GiB) named `name`, in the default zone
    /// with the zone's first customized disk offering unless told otherwise.
    pub fn new(name: impl Into<String>, size: ByteSize) -> Self {
        Self {
            name: name.into(),
            size,
            disk_offering_id: None,
            zone_id: None,
        }
    }

    pub fn disk_offering(mut self, id: DiskOfferingId) -> Self {
        self.disk_offering_id = Some(id);
        self
    }

    pub fn zone(mut self, id: ZoneId) -> Self {
        self.zone_id = Some(id);
        self
    }
}

/// `device_id` 3 is CloudStack's CD-ROM slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device_id 3 is the CD-ROM and never valid")]
pub struct CdromDeviceId;

impl AttachVolume {
    /// Attach `volume_id` to `vm_id` in the next free slot.
    pub fn new(volume_id: VolumeId, vm_id: VmId) -> Self {
        Self {
            volume_id,
            vm_id,
            device_id: None,
        }
    }

    /// A given CloudStack `deviceid` (0 attaches the volume as the VM's root disk).
    pub fn device_id(mut self, device_id: u32) -> Result<Self, CdromDeviceId> {
        if device_id == 3 {
            return Err(CdromDeviceId);
        }
        self.device_id = Some(device_id);
        Ok(self)
    }
}

impl From<CreateVolume> for Command {
    fn from(c: CreateVolume) -> Self {
        Command::new(Action::Create(c))
    }
}

impl From<AttachVolume> for Command {
    fn from(a: AttachVolume) -> Self {
        Command::new(Action::Attach(a))
    }
}

impl Action {
    pub fn operation_type(&self) -> OperationType {
        match self {
            Self::Create(_) => OperationType::Create,
            Self::Attach(_) => OperationType::Attach,
            Self::Detach { .. } => OperationType::Detach,
            Self::Delete { .. } => OperationType::Delete,
            Self::Cancel { .. } => OperationType::Cancel,
            Self::Reconcile { .. } => OperationType::Reconcile,
            Self::Snapshot { .. } => OperationType::Snapshot,
            Self::RevertSnapshot { .. } => OperationType::RevertSnapshot,
            Self::DeleteSnapshot { .. } => OperationType::DeleteSnapshot,
            Self::Resize(_) => OperationType::Resize,
        }
    }

    /// The volume the command is about, when it names one (a create does not yet).
    pub fn volume_id(&self) -> Option<VolumeId> {
        match self {
            Self::Create(_) | Self::Cancel { .. } | Self::Reconcile { .. } => None,
            Self::Attach(a) => Some(a.volume_id),
            Self::Detach { volume_id }
            | Self::Delete { volume_id }
            | Self::Snapshot { volume_id, .. }
            | Self::RevertSnapshot { volume_id, .. }
            | Self::DeleteSnapshot { volume_id, .. } => Some(*volume_id),
            Self::Resize(r) => Some(r.volume_id),
        }
    }

    pub fn vm_id(&self) -> Option<VmId> {
        match self {
            Self::Attach(a) => Some(a.vm_id),
            Self::Reconcile { vm_id } => *vm_id,
            _ => None,
        }
    }
}

impl Command {
    pub fn new(action: Action) -> Self {
        Self {
            command_id: CommandId::random(),
            correlation_id: None,
            reply_to: None,
            metadata: BTreeMap::new(),
            trace: None,
            action,
        }
    }

    /// `create`: see [`CreateVolume::new`] for the options.
    ///
    /// ```
    /// use schema::Command;
    /// let cmd = Command::create("migration-vm1-disk0", "10GiB".parse().unwrap())
    ///     .with_correlation_id("migration-42")
    ///     .with_metadata("purpose", "migration");
    /// assert_eq!(cmd.to_body()["size"], 10u64 << 30);
    /// ```
    pub fn create(name: impl Into<String>, size: ByteSize) -> Self {
        CreateVolume::new(name, size).into()
    }

    /// `attach` in the next free slot: see [`AttachVolume`] for a given device id.
    pub fn attach(volume_id: VolumeId, vm_id: VmId) -> Self {
        AttachVolume::new(volume_id, vm_id).into()
    }

    pub fn detach(volume_id: VolumeId) -> Self {
        Command::new(Action::Detach { volume_id })
    }

    /// `delete` (an attached volume is detached first).
    pub fn delete(volume_id: VolumeId) -> Self {
        Command::new(Action::Delete { volume_id })
    }

    /// `cancel` of the pending operation `target`.
    pub fn cancel(target: CommandId) -> Self {
        Command::new(Action::Cancel { target })
    }

    /// `reconcile` of one VM, or (`None`) of every VM with mappings and the host VM.
    pub fn reconcile(vm_id: Option<VmId>) -> Self {
        Command::new(Action::Reconcile { vm_id })
    }

    /// `snapshot` of `volume_id`; `name` becomes part of the snapshot's CloudStack name.
    pub fn snapshot(volume_id: VolumeId, name: Option<String>) -> Self {
        Command::new(Action::Snapshot { volume_id, name })
    }

    /// `revert_snapshot`: `volume_id` back to its snapshot `snapshot_id`.
    pub fn revert_snapshot(volume_id: VolumeId, snapshot_id: SnapshotId) -> Self {
        Command::new(Action::RevertSnapshot {
            volume_id,
            snapshot_id,
        })
    }

    /// `delete_snapshot` of `volume_id`'s snapshot `snapshot_id`.
    pub fn delete_snapshot(volume_id: VolumeId, snapshot_id: SnapshotId) -> Self {
        Command::new(Action::DeleteSnapshot {
            volume_id,
            snapshot_id,
        })
    }

    /// `resize` of `volume_id` to `size` (whole GiB at CloudStack, rounded up); a smaller
    /// size needs `shrink_ok`.
    pub fn resize(volume_id: VolumeId, size: ByteSize, shrink_ok: bool) -> Self {
        Command::new(Action::Resize(ResizeVolume {
            volume_id,
            size,
            shrink_ok,
        }))
    }

    /// Sends the command with the trace context `trace` (AMQP headers `traceparent` and
    /// `tracestate`): its events carry the same trace id.
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Replaces the random command id: reuse an id to retry safely.
    pub fn with_command_id(mut self, id: CommandId) -> Self {
        self.command_id = id;
        self
    }

    /// The correlation id echoed in the event (at most 255 bytes are sent).
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// A queue that also receives the terminal event.
    pub fn with_reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn operation_type(&self) -> OperationType {
        self.action.operation_type()
    }

    /// Validates a message body and its AMQP properties.
    pub fn parse(body: &[u8], props: &MessageProps) -> Result<Self, InvalidCommand> {
        let mut invalid = InvalidCommand {
            command_id: props
                .message_id
                .as_deref()
                .and_then(|m| CommandId::parse(m).ok()),
            op_type: None,
            correlation_id: props.correlation_id.clone(),
            reply_to: props.reply_to.clone(),
            reason: String::new(),
        };
        let fail = |mut inv: InvalidCommand, reason: String| {
            inv.reason = reason;
            Err(inv)
        };
        if body.len() > MAX_COMMAND_BYTES {
            return fail(
                invalid,
                format!(
                    "body is {} bytes; the limit is {MAX_COMMAND_BYTES}",
                    body.len()
                ),
            );
        }
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return fail(invalid, format!("body is not JSON: {e}")),
        };
        let Value::Object(obj) = value else {
            return fail(
                invalid,
                format!("body must be a JSON object, got {}", kind(&value)),
            );
        };
        invalid.op_type = obj
            .get("type")
            .and_then(Value::as_str)
            .and_then(OperationType::parse);

        // The command id comes first: once known, every later error can be reported to the
        // producer as a failed event.
        match obj.get("command_id") {
            Some(Value::String(s)) => match CommandId::parse(s) {
                Ok(id) => invalid.command_id = Some(id),
                Err(e) => {
                    invalid.command_id = None;
                    return fail(invalid, format!("field `command_id`: {e}"));
                }
            },
            Some(Value::Null) | None => {}
            Some(other) => {
                invalid.command_id = None;
                return fail(
                    invalid,
                    format!("field `command_id` must be a string, got {}", kind(other)),
                );
            }
        }
        let Some(command_id) = invalid.command_id.clone() else {
            let reason = match &props.message_id {
                Some(m) => format!(
                    "field `command_id` is missing and message_id {m:?} is not a valid id: {}",
                    CommandId::parse(m)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                ),
                None => "field `command_id` is missing (and the message has no message_id)".into(),
            };
            return fail(invalid, reason);
        };
        match opt_string(&obj, "correlation_id") {
            Ok(Some(c)) if c.len() > 255 => {
                return fail(
                    invalid,
                    format!("field `correlation_id` is {} bytes; at most 255", c.len()),
                );
            }
            Ok(Some(c)) => invalid.correlation_id = Some(c),
            Ok(None) => {}
            Err(reason) => return fail(invalid, reason),
        }

        match parse_body(&obj) {
            Ok((action, metadata)) => Ok(Command {
                command_id,
                correlation_id: invalid.correlation_id,
                reply_to: invalid.reply_to,
                metadata,
                trace: props
                    .traceparent
                    .as_deref()
                    .and_then(|t| TraceContext::parse(t, props.tracestate.as_deref()).ok()),
                action,
            }),
            Err(reason) => fail(invalid, reason),
        }
    }
}

type Metadata = BTreeMap<String, String>;

fn parse_body(obj: &Map<String, Value>) -> Result<(Action, Metadata), String> {
    let ty = match obj.get("type") {
        Some(Value::String(t)) => OperationType::parse(t).ok_or_else(|| {
            format!(
                "field `type`: unknown type {t:?}; expected create, attach, detach, delete, cancel, reconcile, snapshot, revert_snapshot, delete_snapshot or resize"
            )
        })?,
        Some(other) => {
            return Err(format!(
                "field `type` must be a string, got {}",
                kind(other)
            ));
        }
        None => return Err("field `type` is missing".into()),
    };
    let action = match ty {
        OperationType::Create => Action::Create(CreateVolume {
            name: req_name(obj)?,
            size: req_size(obj)?,
            disk_offering_id: opt_id(obj, "disk_offering_id", DiskOfferingId::parse)?,
            zone_id: opt_id(obj, "zone_id", ZoneId::parse)?,
        }),
        OperationType::Attach => Action::Attach(AttachVolume {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
            vm_id: req_id(obj, "vm_id", VmId::parse)?,
            device_id: opt_device_id(obj)?,
        }),
        OperationType::Detach => Action::Detach {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
        },
        OperationType::Delete => Action::Delete {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
        },
        OperationType::Cancel => Action::Cancel {
            target: req_id(obj, "target", CommandId::parse)?,
        },
        OperationType::Reconcile => Action::Reconcile {
            vm_id: opt_id(obj, "vm_id", VmId::parse)?,
        },
        OperationType::Snapshot => Action::Snapshot {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
            name: opt_snapshot_name(obj)?,
        },
        OperationType::RevertSnapshot => Action::RevertSnapshot {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
            snapshot_id: req_id(obj, "snapshot_id", SnapshotId::parse)?,
        },
        OperationType::DeleteSnapshot => Action::DeleteSnapshot {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
            snapshot_id: req_id(obj, "snapshot_id", SnapshotId::parse)?,
        },
        OperationType::Resize => Action::Resize(ResizeVolume {
            volume_id: req_id(obj, "volume_id", VolumeId::parse)?,
            size: req_size(obj)?,
            shrink_ok: opt_bool(obj, "shrink_ok")?.unwrap_or(false),
        }),
    };
    Ok((action, metadata(obj)?))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field `{field}` must be a string, got {}",
            kind(other)
        )),
    }
}

fn req_id<T>(
    obj: &Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<T, String> {
    opt_id(obj, field, parse)?.ok_or_else(|| format!("field `{field}` is missing"))
}

fn opt_id<T>(
    obj: &Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<Option<T>, String> {
    opt_string(obj, field)?
        .map(|s| parse(&s).map_err(|e| format!("field `{field}`: {e}")))
        .transpose()
}

fn req_name(obj: &Map<String, Value>) -> Result<String, String> {
    let name = opt_string(obj, "name")?.ok_or("field `name` is missing")?;
    let len = name.chars().count();
    if name.trim().is_empty() {
        Err("field `name` must not be empty".into())
    } else if len > 255 {
        Err(format!("field `name` is {len} characters; at most 255"))
    } else {
        Ok(name)
    }
}

fn req_size(obj: &Map<String, Value>) -> Result<ByteSize, String> {
    match obj.get("size") {
        None | Some(Value::Null) => Err("field `size` is missing".into()),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(b) => ByteSize::new(b).map_err(|e| format!("field `size`: {e}")),
            None if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f <= 0.0) => {
                Err(format!("field `size`: must be greater than 0, got {n}"))
            }
            None => Err(format!(
                "field `size` must be a whole number of bytes, got {n}"
            )),
        },
        Some(other) => Err(format!(
            "field `size` must be a whole number of bytes, got {}",
            kind(other)
        )),
    }
}

/// The longest `name` of a snapshot: CloudStack's name column holds 255 characters, and the
/// daemon adds the command id (at most 64) and a separator.
pub const MAX_SNAPSHOT_NAME: usize = 180;

fn opt_snapshot_name(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    let Some(name) = opt_string(obj, "name")? else {
        return Ok(None);
    };
    let len = name.chars().count();
    if name.trim().is_empty() {
        Err("field `name` must not be empty when given".into())
    } else if len > MAX_SNAPSHOT_NAME {
        Err(format!(
            "field `name` is {len} characters; at most {MAX_SNAPSHOT_NAME}"
        ))
    } else {
        Ok(Some(name))
    }
}

fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!(
            "field `{field}` must be a boolean, got {}",
            kind(other)
        )),
    }
}

fn opt_device_id(obj: &Map<String, Value>) -> Result<Option<u32>, String> {
    match obj.get("device_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().and_then(|d| u32::try_from(d).ok()) {
            Some(3) => Err("field `device_id`: 3 is the CD-ROM and never valid".into()),
            Some(d) => Ok(Some(d)),
            None => Err(format!(
                "field `device_id` must be a non-negative whole number, got {n}"
            )),
        },
        Some(other) => Err(format!(
            "field `device_id` must be a number, got {}",
            kind(other)
        )),
    }
}

fn metadata(obj: &Map<String, Value>) -> Result<Metadata, String> {
    match obj.get("metadata") {
        None | Some(Value::Null) => Ok(Metadata::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!(
                    "field `metadata.{k}` must be a string, got {}",
                    kind(other)
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "field `metadata` must be an object of strings, got {}",
            kind(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VOL: &str = "3106013a-e175-423e-a090-1234567890ab";
    const VM: &str = "9a8b7c6d-0000-4000-8000-000000000001";

    fn parse(v: Value) -> Result<Command, InvalidCommand> {
        Command::parse(v.to_string().as_bytes(), &MessageProps::default())
    }

    fn reason(v: Value) -> String {
        parse(v).expect_err("should be invalid").reason
    }

    #[test]
    fn parses_each_command_type() {
        let c = parse(
            json!({"command_id": "c1", "type": "create", "name": "disk0",
            "size": 10737418240u64, "metadata": {"purpose": "migration"}, "extra": 1}),
        )
        .expect("create");
        assert_eq!(c.command_id.as_str(), "c1");
        assert_eq!(c.metadata["purpose"], "migration");
        let Action::Create(create) = &c.action else {
            panic!("not a create: {c:?}")
        };
        assert_eq!(create.size.gib_rounded_up(), 10);

        let a = parse(json!({"command_id": "c2", "type": "attach", "volume_id": VOL, "vm_id": VM, "device_id": 0}))
            .expect("attach");
        assert_eq!(
            a.action.volume_id().map(|v| v.to_string()).as_deref(),
            Some(VOL)
        );
        assert_eq!(a.action.vm_id().map(|v| v.to_string()).as_deref(), Some(VM));

        for ty in ["detach", "delete"] {
            let c = parse(json!({"command_id": "c3", "type": ty, "volume_id": VOL})).expect(ty);
            assert_eq!(c.operation_type().as_str(), ty);
        }

        const SNAP: &str = "9b2c7e14-58f1-4c3a-8a8e-0d8d2b6f4a11";
        let s = parse(json!({"command_id": "c4", "type": "snapshot", "volume_id": VOL, "name": "before-test"}))
            .expect("snapshot");
        assert_eq!(
            s.action,
            Action::Snapshot {
                volume_id: VolumeId::parse(VOL).expect("id"),
                name: Some("before-test".into())
            }
        );
        for ty in ["revert_snapshot", "delete_snapshot"] {
            let c = parse(
                json!({"command_id": "c5", "type": ty, "volume_id": VOL, "snapshot_id": SNAP}),
            )
            .expect(ty);
            assert_eq!(c.operation_type().as_str(), ty);
            assert_eq!(
                c.action.volume_id().map(|v| v.to_string()).as_deref(),
                Some(VOL)
            );
        }
        let r = parse(
            json!({"command_id": "c6", "type": "resize", "volume_id": VOL, "size": 3u64 << 30}),
        )
        .expect("resize");
        let Action::Resize(resize) = &r.action else {
            panic!("not a resize: {r:?}")
        };
        assert_eq!((resize.size.gib_rounded_up(), resize.shrink_ok), (3, false));
        let shrink = parse(json!({"command_id": "c7", "type": "resize", "volume_id": VOL, "size": 1, "shrink_ok": true}))
            .expect("shrink");
        assert!(matches!(&shrink.action, Action::Resize(r) if r.shrink_ok));
    }

    #[test]
    fn message_id_stands_in_for_a_missing_command_id() {
        let props = MessageProps {
            message_id: Some("from-props".into()),
            correlation_id: Some("corr".into()),
            reply_to: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        };
        let body = json!({"type": "delete", "volume_id": VOL}).to_string();
        let c = Command::parse(body.as_bytes(), &props).expect("valid");
        assert_eq!(c.command_id.as_str(), "from-props");
        assert_eq!(c.correlation_id.as_deref(), Some("corr"));
        let trace = c.trace.expect("the trace context");
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // A malformed traceparent is left out; the command is still valid.
        let bad = MessageProps {
            traceparent: Some("garbage".into()),
            ..props
        };
        let c = Command::parse(body.as_bytes(), &bad).expect("still valid");
        assert_eq!(c.trace, None);
    }

    #[test]
    fn to_body_round_trips() {
        let original = parse(
            json!({"command_id": "c1", "type": "attach", "volume_id": VOL,
            "vm_id": VM, "device_id": 5, "correlation_id": "x", "metadata": {"a": "b"}}),
        )
        .expect("valid");
        let again = parse(original.to_body()).expect("round trip");
        assert_eq!(original, again);
    }

    #[test]
    fn invalid_messages_name_the_field_and_problem() {
        let cases: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "JSON object, got an array"),
            (json!({"type": "create"}), "`command_id` is missing"),
            (
                json!({"command_id": 7, "type": "create"}),
                "`command_id` must be a string",
            ),
            (
                json!({"command_id": "bad id", "type": "create"}),
                "`command_id`: contains ' '",
            ),
            (json!({"command_id": "c"}), "`type` is missing"),
            (
                json!({"command_id": "c", "type": "grow"}),
                "unknown type \"grow\"",
            ),
            (
                json!({"command_id": "c", "type": "resize", "volume_id": VOL}),
                "`size` is missing",
            ),
            (
                json!({"command_id": "c", "type": "resize", "volume_id": VOL, "size": 1, "shrink_ok": "yes"}),
                "`shrink_ok` must be a boolean, got a string",
            ),
            (
                json!({"command_id": "c", "type": "revert_snapshot", "volume_id": VOL}),
                "`snapshot_id` is missing",
            ),
            (
                json!({"command_id": "c", "type": "delete_snapshot", "volume_id": VOL, "snapshot_id": "nope"}),
                "`snapshot_id`:",
            ),
            (
                json!({"command_id": "c", "type": "snapshot", "volume_id": VOL, "name": " "}),
                "`name` must not be empty",
            ),
            (
                json!({"command_id": "c", "type": "snapshot", "volume_id": VOL, "name": "n".repeat(181)}),
                "`name` is 181 characters; at most 180",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n"}),
                "`size` is missing",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n", "size": 0}),
                "`size`: size must be greater than 0",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n", "size": -5}),
                "greater than 0, got -5",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n", "size": "10GiB"}),
                "`size` must be a whole number of bytes, got a string",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n", "size": 1.5}),
                "whole number of bytes, got 1.5",
            ),
            (
                json!({"command_id": "c", "type": "create", "size": 1}),
                "`name` is missing",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "", "size": 1}),
                "`name` must not be empty",
            ),
            (
                json!({"command_id": "c", "type": "create", "name": "n", "size": 1, "zone_id": "z1"}),
                "`zone_id`: \"z1\" is not a UUID",
            ),
            (
                json!({"command_id": "c", "type": "attach", "vm_id": VM}),
                "`volume_id` is missing",
            ),
            (
                json!({"command_id": "c", "type": "attach", "volume_id": VOL}),
                "`vm_id` is missing",
            ),
            (
                json!({"command_id": "c", "type": "attach", "volume_id": VOL, "vm_id": 12}),
                "`vm_id` must be a string, got a number",
            ),
            (
                json!({"command_id": "c", "type": "attach", "volume_id": VOL, "vm_id": VM, "device_id": 3}),
                "3 is the CD-ROM",
            ),
            (
                json!({"command_id": "c", "type": "attach", "volume_id": VOL, "vm_id": VM, "device_id": -1}),
                "non-negative",
            ),
            (
                json!({"command_id": "c", "type": "detach", "volume_id": "vol-1"}),
                "\"vol-1\" is not a UUID",
            ),
            (
                json!({"command_id": "c", "type": "delete", "volume_id": VOL, "metadata": {"k": 1}}),
                "`metadata.k` must be a string",
            ),
            (
                json!({"command_id": "c", "type": "delete", "volume_id": VOL, "metadata": []}),
                "`metadata` must be an object",
            ),
        ];
        for (input, expected) in cases {
            let got = reason(input.clone());
            assert!(
                got.contains(expected),
                "{input}: got {got:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn invalid_messages_keep_a_readable_command_id() {
        let err =
            parse(json!({"command_id": "c9", "type": "create", "size": 0})).expect_err("invalid");
        assert_eq!(err.command_id.map(|c| c.to_string()).as_deref(), Some("c9"));
        let err = parse(json!({"command_id": "no good", "type": "create"})).expect_err("invalid");
        assert_eq!(err.command_id, None);
    }

    #[test]
    fn rejects_non_json_and_oversize_bodies() {
        let props = MessageProps::default();
        let err = Command::parse(b"not json", &props).expect_err("invalid");
        assert!(err.reason.starts_with("body is not JSON"), "{}", err.reason);
        let big = vec![b' '; MAX_COMMAND_BYTES + 1];
        let err = Command::parse(&big, &props).expect_err("invalid");
        assert!(err.reason.contains("the limit is 65536"), "{}", err.reason);
        let err = Command::parse(&[0xff, 0xfe], &props).expect_err("invalid");
        assert!(err.reason.starts_with("body is not JSON"), "{}", err.reason);
    }
}
