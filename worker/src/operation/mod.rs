//! One operation: an accepted command on its way to a terminal state.
//!
//! [`execute`] is the whole life of an operation once it is committed as `pending`: mark it
//! executing, run the command's own module against CloudStack, and record the outcome together
//! with its event. Each command type has its own file.

mod attach;
mod create;
mod delete;
mod detach;
pub mod jobs;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::Instrument;

use cloudstack::response::JobId;
use schema::event::AttachMode;
use schema::{
    Action, CloudEvent, Command, CommandId, EventData, EventError, EventId, OperationStatus, VmId,
    VolumeId, VolumeInfo,
};

use crate::context::Context;
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
    pub already_detached: Option<bool>,
    pub already_absent: Option<bool>,
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

/// The terminal event of `op` with `outcome`.
pub fn event_for(
    op: &Operation,
    outcome: &Outcome,
    id: EventId,
    completed_at: DateTime<Utc>,
) -> CloudEvent {
    let cmd = &op.command;
    let duration_ms = (completed_at - op.created_at).num_milliseconds().max(0) as u64;
    let empty = Completion::default();
    let (status, done, error) = match outcome {
        Ok(c) => (OperationStatus::Completed, c, None),
        Err(e) => (OperationStatus::Failed, &empty, Some(e.clone())),
    };
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
            metadata: cmd.metadata.clone(),
            error,
            created_at: op.created_at,
            completed_at,
            duration_ms,
            volume: done.volume.clone(),
            already_detached: done.already_detached,
            already_absent: done.already_absent,
        },
    )
}

/// Runs `op` to its end and records the outcome with its event. Returns when the outcome is
/// committed, or when `ctx` shuts down first (the operation then resumes at the next start).
pub async fn execute(ctx: Arc<Context>, mut op: Operation) {
    let span = tracing::info_span!(
        "operation",
        operation_id = %op.id(),
        r#type = %op.command.operation_type(),
        volume_id = tracing::field::Empty,
    );
    async move {
        let id = op.id().clone();
        match ctx
            .write("mark the operation executing", || {
                ctx.store.mark_executing(&id)
            })
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Ended meanwhile (by an earlier holder of the lease): not ours to execute.
                tracing::info!("operation already ended; not executing it again");
                return;
            }
            // Stopped or fenced first: the row is still pending and resumes later.
            Err(_) => return,
        }
        let mut result = run(&ctx, &mut op).await;
        if let Err(Halt::Fail(e, _)) = &result
            && e.cloudstack_error_code == Some(401)
        {
            // Keys may have been rotated since this operation read them: read them again, once.
            tracing::warn!(
                "CloudStack refused the credentials; reading them again and retrying once"
            );
            result = run(&ctx, &mut op).await;
        }
        let (outcome, mapping) = match result {
            Ok(mut done) => {
                let mapping = done.mapping.take();
                (Ok(done), mapping)
            }
            Err(Halt::Fail(e, mapping)) => (Err(e), mapping.map(|m| *m)),
            Err(Halt::Interrupted(why)) => {
                tracing::info!(why, "operation interrupted; it resumes at the next start");
                return;
            }
        };
        match &outcome {
            Ok(c) => {
                if let Some(v) = c.volume_id {
                    tracing::Span::current().record("volume_id", tracing::field::display(v));
                }
                tracing::info!("operation completed");
            }
            Err(e) => tracing::warn!(code = %e.code, error = %e.message, "operation failed"),
        }
        ctx.metrics.operation_ended(&op, &outcome);
        ctx.finish(&op, outcome, mapping).await;
    }
    .instrument(span)
    .await
}

/// The command's own module.
async fn run(ctx: &Context, op: &mut Operation) -> Result<Completion, Halt> {
    match op.command.action.clone() {
        Action::Create(create) => create::run(ctx, op, &create).await,
        Action::Attach(attach) => attach::run(ctx, op, &attach).await,
        Action::Detach { volume_id } => detach::run(ctx, op, volume_id).await,
        Action::Delete { volume_id } => delete::run(ctx, op, volume_id).await,
    }
}
