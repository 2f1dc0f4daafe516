//! An operation as data: an accepted command and what is known of its progress, why it stopped
//! early ([`Halt`]), and how it ends ([`Terminal`]: the record and event to write). A leaf
//! module: the persistence layer, the metrics and the executor use these types without
//! depending on how operations run (the `operation` module does that).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use cloudstack::response::JobId;
use schema::{
    CloudEvent, Command, CommandId, EventError, OperationStatus, SnapshotId, SnapshotInfo, VmId,
    VolumeId,
};

use crate::mappings::MappingChange;

/// An accepted command and what is known of its progress.
#[derive(Debug, Clone)]
pub struct Operation {
    pub command: Command,
    /// When the command was accepted (the row's `created_at`).
    pub created_at: DateTime<Utc>,
    /// The CloudStack job, once one was started and recorded.
    pub job_id: Option<JobId>,
    /// The volume, once known (a create learns it from CloudStack).
    pub volume_id: Option<VolumeId>,
    /// Executions started before this one (by an earlier run of a daemon): the operation may
    /// have acted already and must reconcile before acting again.
    pub prior_attempts: u32,
    /// Locks this execution holds until its outcome is committed.
    pub held: Held,
}

/// Locks an execution holds until its outcome is committed, so that nothing else (another
/// attach or detach of the VM, a reconcile, the mapping sync) sees the state it left between
/// acting and committing: its VMs' attach/detach locks and, once it changed the host
/// appliance's files, their lock. Released when the operation is dropped, at the end of
/// `operation::execute`, after the outcome's commit.
#[derive(Debug, Clone, Default)]
pub struct Held {
    vms: Vec<(VmId, Arc<OwnedMutexGuard<()>>)>,
    host_files: Option<Arc<OwnedMutexGuard<()>>>,
}

impl Held {
    pub fn holds_vm(&self, vm: VmId) -> bool {
        self.vms.iter().any(|(v, _)| *v == vm)
    }

    pub fn hold_vm(&mut self, vm: VmId, guard: OwnedMutexGuard<()>) {
        self.vms.push((vm, Arc::new(guard)));
    }

    pub fn holds_host_files(&self) -> bool {
        self.host_files.is_some()
    }

    pub fn hold_host_files(&mut self, guard: OwnedMutexGuard<()>) {
        self.host_files = Some(Arc::new(guard));
    }
}

impl Operation {
    pub fn new(command: Command, created_at: DateTime<Utc>) -> Self {
        let volume_id = command.action.volume_id();
        Self {
            command,
            created_at,
            job_id: None,
            volume_id,
            prior_attempts: 0,
            held: Held::default(),
        }
    }

    pub fn id(&self) -> &CommandId {
        &self.command.command_id
    }
}

/// How an operation ends, ready to be written: its event (which carries the terminal status,
/// the volume and the VM), the row's `response` or error, and what it does to
/// `device_mappings`. Built where the outcome is known (`operation::outcome`); the
/// persistence layer only writes it.
#[derive(Debug, Clone)]
pub struct Terminal {
    pub event: CloudEvent,
    /// Stored as the operation's `response` (a completed or cancelled operation).
    pub response: Option<Value>,
    /// Stored as `error`, `error_code` and `error_detail` (a failed operation).
    pub error: Option<EventError>,
    /// What the operation does to `device_mappings`, in the transaction that ends it.
    pub mapping: Option<MappingChange>,
    /// What the operation does to `snapshots`, in the same transaction.
    pub snapshot: Option<SnapshotChange>,
}

/// What an operation does to the `snapshots` table when it ends.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotChange {
    /// A snapshot the daemon took (by the operation `operation_id`), or its new state.
    Taken {
        info: SnapshotInfo,
        operation_id: CommandId,
    },
    /// The snapshot is gone.
    Deleted(SnapshotId),
}

impl Terminal {
    pub fn status(&self) -> OperationStatus {
        self.event.data.status
    }
}

/// Why a command module stopped before its end.
#[derive(Debug)]
pub(crate) enum Halt {
    /// The operation failed: this is its outcome, and what it leaves in `device_mappings`
    /// (an attach whose device never appeared still records the attachment).
    Fail(EventError, Option<Box<MappingChange>>),
    /// Shutdown came first; the operation is left pending or executing and resumes at the
    /// next start.
    Interrupted(String),
}

impl From<EventError> for Halt {
    fn from(e: EventError) -> Self {
        Self::Fail(e, None)
    }
}

impl Halt {
    /// A failure that still records `mapping` (what is true whatever failed after it: a
    /// volume detached in CloudStack is no longer attached, even if a later step failed).
    pub(crate) fn recording(self, mapping: MappingChange) -> Self {
        match self {
            Self::Fail(e, None) => Self::Fail(e, Some(Box::new(mapping))),
            other => other,
        }
    }
}
