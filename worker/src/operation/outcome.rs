//! What a command did, one variant per command ([`Completed`]), and the terminal record it
//! ends with ([`Terminal`]): built here, where the outcome is known, and only written by
//! `db`. The operation's stored `response` is the serialization of one of the structs below
//! (docs/http.md shows them), and its event is filled from the same variant.

use chrono::{DateTime, Utc};
use serde::Serialize;

use cloudstack::Volume;
use cloudstack::response::JobId;
use schema::event::{Change, NbdExport};
use schema::{
    Action, CloudEvent, CommandId, EventData, EventError, EventId, OperationStatus, OperationType,
    SnapshotId, SnapshotInfo, VmId, VolumeId, VolumeInfo,
};

use crate::mappings::{DeviceMapping, MappingChange};
use crate::model::{Operation, SnapshotChange, Terminal};

/// What a successful operation did.
#[derive(Debug, Clone)]
pub(crate) enum Completed {
    Created {
        volume: VolumeInfo,
        job: Option<JobId>,
    },
    Attached {
        volume: AttachedVolume,
        attachment: Attachment,
        /// The mapping the attachment is recorded as.
        mapping: Box<DeviceMapping>,
    },
    Detached {
        volume: VolumeState,
        /// The VM it was detached from; `None`: it was not attached.
        from: Option<VmId>,
    },
    Deleted {
        volume: VolumeId,
        /// The VM it was detached from first, if any.
        detached_from: Option<VmId>,
        /// It did not exist.
        already_absent: bool,
    },
    Cancelled {
        target: CommandId,
        target_type: OperationType,
    },
    Reconciled {
        scope: Option<VmId>,
        changes: Vec<Change>,
    },
    SnapshotTaken {
        snapshot: SnapshotInfo,
    },
    Reverted {
        snapshot: SnapshotInfo,
    },
    SnapshotDeleted {
        volume: VolumeId,
        snapshot_id: SnapshotId,
        /// It was already gone.
        already_absent: bool,
    },
    Resized {
        /// The volume with its new size.
        volume: VolumeInfo,
        previous_size: u64,
        /// A host-attached volume keeps its device, persistent name and export.
        host: Option<Attachment>,
    },
}

/// Where an attached volume's data can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attachment {
    /// On another VM: nothing of it is on the host appliance.
    Remote,
    /// On the host VM: its guest device, persistent name and (when exports are on) export.
    Host {
        device_path: String,
        by_id_path: Option<String>,
        persistent_path: String,
        nbd_export: Option<NbdExport>,
    },
}

/// The volume of an attach response, as CloudStack lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct AttachedVolume {
    pub id: VolumeId,
    pub virtualmachineid: Option<VmId>,
    pub deviceid: Option<u32>,
    pub state: String,
    pub size: Option<u64>,
}

impl From<&Volume> for AttachedVolume {
    fn from(v: &Volume) -> Self {
        Self {
            id: v.id,
            virtualmachineid: v.virtualmachineid,
            deviceid: v.deviceid,
            state: v.state.clone(),
            size: v.size,
        }
    }
}

/// The volume of a detach response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct VolumeState {
    pub id: VolumeId,
    pub state: String,
}

/// A volume named by id alone (delete responses).
#[derive(Debug, Clone, Serialize)]
struct VolumeRef {
    id: VolumeId,
}

/// The stored `response` of each command, one struct per shape.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Response<'a> {
    Created {
        volume: &'a VolumeInfo,
        cloudstack_job_id: Option<&'a JobId>,
    },
    Attached {
        volume: &'a AttachedVolume,
        #[serde(skip_serializing_if = "Option::is_none")]
        device_path: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        persistent_path: Option<&'a str>,
    },
    AlreadyDetached {
        volume: &'a VolumeState,
        already_detached: bool,
    },
    Detached {
        volume: &'a VolumeState,
        detached_from: VmId,
    },
    AlreadyAbsent {
        volume: VolumeRef,
        already_absent: bool,
    },
    Deleted {
        volume: VolumeRef,
        deleted: bool,
        detached_from: Option<VmId>,
    },
    Cancelled {
        target: &'a CommandId,
        target_type: OperationType,
        cancelled: bool,
    },
    Reconciled {
        changes: &'a [Change],
    },
    Snapshot {
        snapshot: &'a SnapshotInfo,
    },
    SnapshotDeleted {
        snapshot_id: SnapshotId,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        already_absent: bool,
    },
    Resized {
        volume: &'a VolumeInfo,
        previous_size: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        device_path: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        persistent_path: Option<&'a str>,
    },
    /// The record of a pending operation a cancel ended.
    CancelledBy {
        cancelled_by: &'a CommandId,
    },
}

impl Completed {
    /// The operation's stored `response`.
    pub(crate) fn response(&self) -> serde_json::Value {
        let r = match self {
            Self::Created { volume, job } => Response::Created {
                volume,
                cloudstack_job_id: job.as_ref(),
            },
            Self::Attached {
                volume, attachment, ..
            } => attached(volume, attachment),
            Self::Detached { volume, from: None } => Response::AlreadyDetached {
                volume,
                already_detached: true,
            },
            Self::Detached {
                volume,
                from: Some(vm),
            } => Response::Detached {
                volume,
                detached_from: *vm,
            },
            Self::Deleted {
                volume,
                detached_from,
                already_absent,
            } => deleted(*volume, *detached_from, *already_absent),
            Self::Cancelled {
                target,
                target_type,
            } => Response::Cancelled {
                target,
                target_type: *target_type,
                cancelled: true,
            },
            Self::Reconciled { changes, .. } => Response::Reconciled { changes },
            Self::SnapshotTaken { snapshot } | Self::Reverted { snapshot } => {
                Response::Snapshot { snapshot }
            }
            Self::SnapshotDeleted {
                snapshot_id,
                already_absent,
                ..
            } => Response::SnapshotDeleted {
                snapshot_id: *snapshot_id,
                already_absent: *already_absent,
            },
            Self::Resized {
                volume,
                previous_size,
                host,
            } => resized(volume, *previous_size, host.as_ref()),
        };
        serde_json::to_value(r).unwrap_or_default()
    }

    /// What the operation does to `device_mappings` when it ends.
    pub(crate) fn mapping_change(&self) -> Option<MappingChange> {
        match self {
            Self::Attached { mapping, .. } => Some(MappingChange::Upsert((**mapping).clone())),
            Self::Detached { volume, .. } => Some(MappingChange::Remove(volume.id)),
            Self::Deleted { volume, .. } => Some(MappingChange::Remove(*volume)),
            Self::Resized { volume, .. } => Some(MappingChange::Resized(volume.id, volume.size)),
            Self::Created { .. }
            | Self::Cancelled { .. }
            | Self::Reconciled { .. }
            | Self::SnapshotTaken { .. }
            | Self::Reverted { .. }
            | Self::SnapshotDeleted { .. } => None,
        }
    }

    /// What the operation `by` does to `snapshots` when it ends.
    pub(crate) fn snapshot_change(&self, by: &CommandId) -> Option<SnapshotChange> {
        match self {
            Self::SnapshotTaken { snapshot } => Some(SnapshotChange::Taken {
                info: snapshot.clone(),
                operation_id: by.clone(),
            }),
            Self::SnapshotDeleted { snapshot_id, .. } => {
                Some(SnapshotChange::Deleted(*snapshot_id))
            }
            _ => None,
        }
    }

    /// The volume this outcome is about, when it names one.
    pub(crate) fn volume_id(&self) -> Option<VolumeId> {
        match self {
            Self::Created { volume, .. } => Some(volume.id),
            Self::Attached { volume, .. } => Some(volume.id),
            Self::Detached { volume, .. } => Some(volume.id),
            Self::Deleted { volume, .. } => Some(*volume),
            Self::SnapshotTaken { snapshot } | Self::Reverted { snapshot } => {
                Some(snapshot.volume_id)
            }
            Self::SnapshotDeleted { volume, .. } => Some(*volume),
            Self::Resized { volume, .. } => Some(volume.id),
            Self::Cancelled { .. } | Self::Reconciled { .. } => None,
        }
    }

    /// Fills the event's command-specific fields.
    fn fill(&self, data: &mut EventData) {
        data.volume_id = self.volume_id().or(data.volume_id);
        match self {
            Self::Created { volume, .. } => data.volume = Some(volume.clone()),
            Self::Attached {
                attachment,
                mapping,
                ..
            } => {
                data.vm_id = Some(mapping.vm_id);
                data.mode = Some(mapping.mode);
                fill_host(data, attachment);
            }
            Self::Detached { from, .. } => {
                data.vm_id = *from;
                data.already_detached = Some(from.is_none());
            }
            Self::Deleted {
                detached_from,
                already_absent,
                ..
            } => {
                data.vm_id = *detached_from;
                data.already_absent = Some(*already_absent);
            }
            Self::Cancelled { .. } => {}
            Self::Reconciled { scope, changes } => {
                data.vm_id = *scope;
                data.changes = Some(changes.clone());
            }
            Self::SnapshotTaken { snapshot } | Self::Reverted { snapshot } => {
                data.snapshot = Some(snapshot.clone());
            }
            Self::SnapshotDeleted {
                snapshot_id,
                already_absent,
                ..
            } => {
                data.snapshot_id = Some(*snapshot_id);
                data.already_absent = Some(*already_absent);
            }
            Self::Resized {
                volume,
                previous_size,
                host,
            } => {
                data.volume = Some(volume.clone());
                data.previous_size = Some(*previous_size);
                if let Some(attachment) = host {
                    fill_host(data, attachment);
                }
            }
        }
    }
}

/// The host fields of an event (a host attach, a resize of a host-attached volume).
fn fill_host(data: &mut EventData, attachment: &Attachment) {
    if let Attachment::Host {
        device_path,
        by_id_path,
        persistent_path,
        nbd_export,
    } = attachment
    {
        data.device_path = Some(device_path.clone());
        data.by_id_path = by_id_path.clone();
        data.persistent_path = Some(persistent_path.clone());
        data.nbd_export = nbd_export.clone();
    }
}

/// The response of a delete.
fn deleted<'a>(
    volume: VolumeId,
    detached_from: Option<VmId>,
    already_absent: bool,
) -> Response<'a> {
    let volume = VolumeRef { id: volume };
    match already_absent {
        true => Response::AlreadyAbsent {
            volume,
            already_absent,
        },
        false => Response::Deleted {
            volume,
            deleted: true,
            detached_from,
        },
    }
}

/// The response of a resize.
fn resized<'a>(
    volume: &'a VolumeInfo,
    previous_size: u64,
    host: Option<&'a Attachment>,
) -> Response<'a> {
    let (device_path, persistent_path) = match host {
        Some(Attachment::Host {
            device_path,
            persistent_path,
            ..
        }) => (Some(device_path.as_str()), Some(persistent_path.as_str())),
        _ => (None, None),
    };
    Response::Resized {
        volume,
        previous_size,
        device_path,
        persistent_path,
    }
}

/// The response of an attach.
fn attached<'a>(volume: &'a AttachedVolume, attachment: &'a Attachment) -> Response<'a> {
    let (device_path, persistent_path) = match attachment {
        Attachment::Remote => (None, None),
        Attachment::Host {
            device_path,
            persistent_path,
            ..
        } => (Some(device_path.as_str()), Some(persistent_path.as_str())),
    };
    Response::Attached {
        volume,
        device_path,
        persistent_path,
    }
}

/// The terminal record of `op`, which completed with `done`.
pub(crate) fn completed(op: &Operation, done: &Completed, at: DateTime<Utc>) -> Terminal {
    let mut data = data(op, OperationStatus::Completed, None, at);
    done.fill(&mut data);
    Terminal {
        event: traced(event(data), op),
        response: Some(done.response()),
        error: None,
        mapping: done.mapping_change(),
        snapshot: done.snapshot_change(op.id()),
    }
}

/// The terminal record of `op`, which failed with `error`, leaving `mapping` (what is true
/// whatever failed: an attach whose device never appeared is still attached).
pub(crate) fn failed(
    op: &Operation,
    error: EventError,
    mapping: Option<MappingChange>,
    at: DateTime<Utc>,
) -> Terminal {
    Terminal {
        event: traced(
            event(data(op, OperationStatus::Failed, Some(error.clone()), at)),
            op,
        ),
        response: None,
        error: Some(error),
        mapping,
        snapshot: None,
    }
}

/// The terminal record of the pending operation `op`, cancelled by the cancel operation `by`
/// (recorded in its `response`, so a cancel resumed after a crash recognises its own work).
pub(crate) fn cancelled(op: &Operation, by: &CommandId, at: DateTime<Utc>) -> Terminal {
    let response = Response::CancelledBy { cancelled_by: by };
    Terminal {
        event: traced(event(data(op, OperationStatus::Cancelled, None, at)), op),
        response: serde_json::to_value(response).ok(),
        error: None,
        mapping: None,
        snapshot: None,
    }
}

fn event(data: EventData) -> CloudEvent {
    CloudEvent::new(EventId::new_random(), data.completed_at, data)
}

/// `event` in the trace of `op`'s command, when it carried one: the same trace id with a span
/// of the daemon's (the operation's) as parent, `tracestate` verbatim (docs/wire.md).
fn traced(mut event: CloudEvent, op: &Operation) -> CloudEvent {
    if let Some(trace) = &op.command.trace {
        let span = crate::telemetry::current_span_id()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_owned());
        let child = trace.child(&span);
        event.traceparent = Some(child.traceparent);
        event.tracestate = child.tracestate;
    }
    event
}

/// The event data of `op` ending with `status`, before the command's own fields are filled.
fn data(
    op: &Operation,
    status: OperationStatus,
    error: Option<EventError>,
    completed_at: DateTime<Utc>,
) -> EventData {
    let cmd = &op.command;
    let duration_ms = (completed_at - op.created_at).num_milliseconds().max(0) as u64;
    EventData {
        operation_id: cmd.command_id.clone(),
        command_id: cmd.command_id.clone(),
        correlation_id: schema::correlation_or_command_id(
            cmd.correlation_id.clone(),
            &cmd.command_id,
        ),
        op_type: cmd.operation_type().into(),
        status,
        volume_id: op.volume_id,
        vm_id: cmd.action.vm_id(),
        device_path: None,
        by_id_path: None,
        mode: None,
        persistent_path: None,
        nbd_export: None,
        metadata: cmd.metadata.clone(),
        error,
        created_at: op.created_at,
        completed_at,
        duration_ms,
        volume: None,
        already_detached: None,
        already_absent: None,
        target: match &cmd.action {
            Action::Cancel { target } => Some(target.clone()),
            _ => None,
        },
        changes: None,
        snapshot: None,
        snapshot_id: None,
        previous_size: None,
    }
}
