//! The JSON bodies of commands as they travel, and the JSON Schemas of commands and events.
//!
//! [`CommandBody`] is what [`Command::to_body`] serializes, so the generated schema describes
//! what producers really send. Incoming messages are validated by [`Command::parse`] (which
//! names the field and the problem); the schema says the same rules for producers in other
//! languages. `schemas/*.schema.json` at the workspace root are generated from these types, and
//! a test fails when they disagree.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::command::{Action, Command};
use crate::ids::{CommandId, DiskOfferingId, SnapshotId, VmId, VolumeId, ZoneId};

/// Fields every command may carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope {
    /// The idempotency key; it becomes the operation id. Optional only when the AMQP
    /// `message_id` carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// Echoed in the events (else the AMQP `correlation_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub correlation_id: Option<String>,
    /// Free-form labels, stored and echoed in the events.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A volume command (docs/wire.md). Routing key `volume.<type>`, at most 64 KiB; unknown fields
/// are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schemars(title = "volume-daemon command")]
pub enum CommandBody {
    /// Create a volume.
    Create {
        #[serde(flatten)]
        envelope: Envelope,
        /// The CloudStack volume name.
        #[schemars(length(min = 1, max = 255))]
        name: String,
        /// Bytes; CloudStack receives whole GiB, rounded up.
        #[schemars(range(min = 1))]
        size: u64,
        /// Default: the zone's first customized disk offering.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_offering_id: Option<DiskOfferingId>,
        /// Default: the daemon's zone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone_id: Option<ZoneId>,
    },
    /// Attach a volume to a VM (the VM the daemon runs on: the device is correlated).
    Attach {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
        vm_id: VmId,
        /// CloudStack's `deviceid`: 0 attaches as the root disk; 3 (the CD-ROM) is invalid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(max = 25), extend("not" = {"const": 3}))]
        device_id: Option<u32>,
    },
    /// Detach a volume from its VM.
    Detach {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
    },
    /// Delete a volume (an attached volume is detached first).
    Delete {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
    },
    /// End a `pending` operation as `cancelled` (its target gets `volume.<type>.cancelled`).
    Cancel {
        #[serde(flatten)]
        envelope: Envelope,
        /// The command id of the operation to cancel.
        target: CommandId,
    },
    /// Repair the daemon's mappings and exports from CloudStack and the local devices; never
    /// calls a mutating CloudStack API.
    Reconcile {
        #[serde(flatten)]
        envelope: Envelope,
        /// One VM; default every VM that has mappings, and the host VM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_id: Option<VmId>,
    },
    /// Take a CloudStack snapshot of a volume; completes when CloudStack reports it usable.
    Snapshot {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
        /// Part of the snapshot's CloudStack name, which always contains the command id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 180))]
        name: Option<String>,
    },
    /// Return a volume to one of its snapshots (CloudStack's preconditions apply: on KVM the
    /// volume detached or its VM stopped).
    RevertSnapshot {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
        snapshot_id: SnapshotId,
    },
    /// Delete one of a volume's snapshots (one already gone completes `already_absent`).
    DeleteSnapshot {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
        snapshot_id: SnapshotId,
    },
    /// Resize a volume.
    Resize {
        #[serde(flatten)]
        envelope: Envelope,
        volume_id: VolumeId,
        /// Bytes; CloudStack receives whole GiB, rounded up.
        #[schemars(range(min = 1))]
        size: u64,
        /// A smaller size than the volume's is refused unless this is true.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shrink_ok: bool,
    },
}

impl From<&Command> for CommandBody {
    fn from(c: &Command) -> Self {
        let envelope = Envelope {
            command_id: Some(c.command_id.clone()),
            correlation_id: c.correlation_id.clone(),
            metadata: c.metadata.clone(),
        };
        match &c.action {
            Action::Create(x) => CommandBody::Create {
                envelope,
                name: x.name.clone(),
                size: x.size.bytes(),
                disk_offering_id: x.disk_offering_id,
                zone_id: x.zone_id,
            },
            Action::Attach(x) => CommandBody::Attach {
                envelope,
                volume_id: x.volume_id,
                vm_id: x.vm_id,
                device_id: x.device_id,
            },
            Action::Detach { volume_id } => CommandBody::Detach {
                envelope,
                volume_id: *volume_id,
            },
            Action::Delete { volume_id } => CommandBody::Delete {
                envelope,
                volume_id: *volume_id,
            },
            Action::Cancel { target } => CommandBody::Cancel {
                envelope,
                target: target.clone(),
            },
            Action::Reconcile { vm_id } => CommandBody::Reconcile {
                envelope,
                vm_id: *vm_id,
            },
            Action::Snapshot { volume_id, name } => CommandBody::Snapshot {
                envelope,
                volume_id: *volume_id,
                name: name.clone(),
            },
            Action::RevertSnapshot {
                volume_id,
                snapshot_id,
            } => CommandBody::RevertSnapshot {
                envelope,
                volume_id: *volume_id,
                snapshot_id: *snapshot_id,
            },
            Action::DeleteSnapshot {
                volume_id,
                snapshot_id,
            } => CommandBody::DeleteSnapshot {
                envelope,
                volume_id: *volume_id,
                snapshot_id: *snapshot_id,
            },
            Action::Resize(r) => CommandBody::Resize {
                envelope,
                volume_id: r.volume_id,
                size: r.size.bytes(),
                shrink_ok: r.shrink_ok,
            },
        }
    }
}

/// The JSON Schema of command bodies.
pub fn command_schema() -> serde_json::Value {
    schemars::schema_for!(CommandBody).to_value()
}

/// The JSON Schema of events.
pub fn event_schema() -> serde_json::Value {
    schemars::schema_for!(crate::CloudEvent).to_value()
}

impl Command {
    /// The JSON body a producer publishes for this command (a [`CommandBody`]).
    pub fn to_body(&self) -> serde_json::Value {
        // A body is strings, numbers and maps with string keys: serde_json cannot refuse it.
        serde_json::to_value(CommandBody::from(self))
            .unwrap_or_else(|e| unreachable!("a command body always serializes: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn schemas_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
    }

    /// `UPDATE_SCHEMAS=1 cargo test -p schema` rewrites the committed files.
    #[test]
    fn committed_schemas_match_the_types() {
        for (file, schema) in [
            ("command.schema.json", command_schema()),
            ("event.schema.json", event_schema()),
        ] {
            let path = schemas_dir().join(file);
            let generated = format!("{}\n", serde_json::to_string_pretty(&schema).expect("json"));
            if std::env::var_os("UPDATE_SCHEMAS").is_some() {
                std::fs::write(&path, &generated).expect("write schema");
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "{} is out of date with the schema crate's types: run `UPDATE_SCHEMAS=1 cargo test -p schema` and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn the_body_of_every_command_type_round_trips_through_the_wire_type() {
        let vol = VolumeId::new_random();
        let vm = VmId::new_random();
        let commands = [
            Command::create("d", "1GiB".parse().expect("size"))
                .with_metadata("k", "v")
                .with_correlation_id("c"),
            crate::command::AttachVolume::new(vol, vm)
                .device_id(0)
                .map(Command::from)
                .expect("attach"),
            Command::detach(vol),
            Command::delete(vol),
            Command::cancel(CommandId::parse("op-1").expect("id")),
            Command::reconcile(Some(vm)),
            Command::reconcile(None),
            Command::snapshot(vol, Some("before".into())),
            Command::snapshot(vol, None),
            Command::revert_snapshot(vol, crate::SnapshotId::new_random()),
            Command::delete_snapshot(vol, crate::SnapshotId::new_random()),
            Command::resize(vol, "20GiB".parse().expect("size"), false),
            Command::resize(vol, "1GiB".parse().expect("size"), true),
        ];
        for c in commands {
            let body = c.to_body();
            let wire: CommandBody =
                serde_json::from_value(body.clone()).expect("the wire type reads the body");
            assert_eq!(serde_json::to_value(&wire).expect("json"), body);
            let parsed =
                Command::parse(body.to_string().as_bytes(), &Default::default()).expect("valid");
            assert_eq!(parsed, c);
        }
    }
}
