//! An operation as data: an accepted command and what is known of its progress, how it ended
//! ([`Outcome`]), why it stopped early ([`Halt`]), and the terminal event it ends with
//! ([`event_for`]). A leaf module: the persistence layer, the metrics and the executor use these
//! types without depending on how operations run (the `operation` module does that).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use cloudstack::response::JobId;
use schema::event::{AttachMode, Change, NbdExport};
use schema::{
    Action, CloudEvent, Command, CommandId, EventData, EventError, EventId, OperationStatus, VmId,
    VolumeId, VolumeInfo,
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

/// What a successful operation reports.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub volume_id: Option<VolumeId>,
    pub vm_id: Option<VmId>,
    /// Stored as the operation's `response`.
    pub response: Value,
    pub volume: Option<VolumeInfo>,
    pub device_path: Option<String>,
    pub by_id_path: Option<String>,
    pub mode: Option<AttachMode>,
    /// Host attach: the persistent name's path, and the export when exports are on.
    pub persistent_path: Option<String>,
    pub nbd_export: Option<NbdExport>,
    pub already_detached: Option<bool>,
    pub already_absent: Option<bool>,
    /// Reconcile: what it repaired.
    pub changes: Option<Vec<Change>>,
    /// What the operation does to `device_mappings`, in the transaction that ends it.
    pub mapping: Option<MappingChange>,
}

/// How an operation ended: the result stored and announced.
pub type Outcome = Result<Completion, EventError>;

/// Why a command module stopped before its end.
#[derive(Debug)]
pub enum Halt {
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
    pub fn recording(self, mapping: MappingChange) -> Self {
        match self {
            Self::Fail(e, None) => Self::Fail(e, Some(Box::new(mapping))),
            other => other,
        }
    }
}

/// The terminal event of `op` with `outcome`.
pub fn event_for(
    op: &Operation,
    outcome: &Outcome,
    id: EventId,
    completed_at: DateTime<Utc>,
) -> CloudEvent {
    let empty = Completion::default();
    let (status, done, error) = match outcome {
        Ok(c) => (OperationStatus::Completed, c, None),
        Err(e) => (OperationStatus::Failed, &empty, Some(e.clone())),
    };
    event_with(op, status, done, error, id, completed_at)
}

/// The terminal event of `op` cancelled by a `cancel` operation (docs/wire.md): status
/// `cancelled`, no error.
pub fn cancelled_event(op: &Operation, id: EventId, completed_at: DateTime<Utc>) -> CloudEvent {
    let done = Completion::default();
    event_with(
        op,
        OperationStatus::Cancelled,
        &done,
        None,
        id,
        completed_at,
    )
}

fn event_with(
    op: &Operation,
    status: OperationStatus,
    done: &Completion,
    error: Option<EventError>,
    id: EventId,
    completed_at: DateTime<Utc>,
) -> CloudEvent {
    let cmd = &op.command;
    let duration_ms = (completed_at - op.created_at).num_milliseconds().max(0) as u64;
    CloudEvent::new(
        id,
        completed_at,
        EventData {
            operation_id: cmd.command_id.clone(),
            command_id: cmd.command_id.clone(),
            correlation_id: schema::correlation_or_command_id(
                cmd.correlation_id.clone(),
                &cmd.command_id,
            ),
            op_type: cmd.operation_type().into(),
            status,
            volume_id: done.volume_id.or(op.volume_id),
            vm_id: done.vm_id.or(cmd.action.vm_id()),
            device_path: done.device_path.clone(),
            by_id_path: done.by_id_path.clone(),
            mode: done.mode,
            persistent_path: done.persistent_path.clone(),
            nbd_export: done.nbd_export.clone(),
            metadata: cmd.metadata.clone(),
            error,
            created_at: op.created_at,
            completed_at,
            duration_ms,
            volume: done.volume.clone(),
            already_detached: done.already_detached,
            already_absent: done.already_absent,
            target: match &cmd.action {
                Action::Cancel { target } => Some(target.clone()),
                _ => None,
            },
            changes: done.changes.clone(),
        },
    )
}
