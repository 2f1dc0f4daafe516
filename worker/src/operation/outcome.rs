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
    VmId, VolumeId, VolumeInfo,
};

use crate::mappings::{DeviceMapping, MappingChange};
use crate::model::{Operation, Terminal};

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
                already_absent: true,
                ..
            } => Response::AlreadyAbsent {
                volume: VolumeRef { id: *volume },
                already_absent: true,
            },
            Self::Deleted {
                volume,
                detached_from,
                ..
            } => Response::Deleted {
                volume: VolumeRef { id: *volume },
                deleted: true,
                detached_from: *detached_from,
            },
            Self::Cancelled {
                target,
                target_type,
            } => Response::Cancelled {
                target,
                target_type: *target_type,
                cancelled: true,
            },
            Self::Reconciled { changes, .. } => Response::Reconciled { changes },
        };
        serde_json::to_value(r).unwrap_or_default()
    }

    /// What the operation does to `device_mappings` when it ends.
    pub(crate) fn mapping_change(&self) -> Option<MappingChange> {
        match self {
            Self::Attached { mapping, .. } => Some(MappingChange::Upsert((**mapping).clone())),
            Self::Detached { volume, .. } => Some(MappingChange::Remove(volume.id)),
            Self::Deleted { volume, .. } => Some(MappingChange::Remove(*volume)),
            Self::Created { .. } | Self::Cancelled { .. } | Self::Reconciled { .. } => None,
        }
    }

    /// The volume this outcome is about, when it names one.
    pub(crate) fn volume_id(&self) -> Option<VolumeId> {
        match self {
            Self::Created { volume, .. } => Some(volume.id),
            Self::Attached { volume, .. } => Some(volume.id),
            Self::Detached { volume, .. } => Some(volume.id),
            Self::Deleted { volume, .. } => Some(*volume),
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
        }
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
        event: event(data),
        response: Some(done.response()),
        error: None,
        mapping: done.mapping_change(),
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
        event: event(data(op, OperationStatus::Failed, Some(error.clone()), at)),
        response: None,
        error: Some(error),
        mapping,
    }
}

/// The terminal record of the pending operation `op`, cancelled by the cancel operation `by`
/// (recorded in its `response`, so a cancel resumed after a crash recognises its own work).
pub(crate) fn cancelled(op: &Operation, by: &CommandId, at: DateTime<Utc>) -> Terminal {
    let response = Response::CancelledBy { cancelled_by: by };
    Terminal {
        event: event(data(op, OperationStatus::Cancelled, None, at)),
        response: serde_json::to_value(response).ok(),
        error: None,
        mapping: None,
    }
}

fn event(data: EventData) -> CloudEvent {
    CloudEvent::new(EventId::new_random(), data.completed_at, data)
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
    }
}
