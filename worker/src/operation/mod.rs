//! One operation: an accepted command on its way to a terminal state.
//!
//! [`execute`] is the whole life of an operation once it is committed as `pending`: mark it
//! executing, run the command's own module against CloudStack, and record the outcome together
//! with its event. Each command type has its own file.

mod create;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::Instrument;

use cloudstack::response::JobId;
use schema::event::AttachMode;
use schema::{
    Action, CloudEvent, Command, CommandId, ErrorCode, EventData, EventError, EventId,
    OperationStatus, VmId, VolumeId, VolumeInfo,
};

use crate::context::Context;

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
}

impl Operation {
    pub fn new(command: Command, created_at: DateTime<Utc>) -> Self {
        let volume_id = command.action.volume_id();
        Self {
            command,
            created_at,
            job_id: None,
            volume_id,
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
}

/// How an operation ended: the result stored and announced.
pub type Outcome = Result<Completion, EventError>;

/// Why a command module stopped before its end.
#[derive(Debug)]
pub enum Halt {
    /// The operation failed: this is its outcome.
    Fail(EventError),
    /// Shutdown came first; the operation is left pending or executing and resumes at the
    /// next start.
    Interrupted(String),
}

impl From<EventError> for Halt {
    fn from(e: EventError) -> Self {
        Self::Fail(e)
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
            correlation_id: cmd.correlation_id.clone(),
            op_type: cmd.operation_type(),
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
        if let Err(e) = ctx.store.mark_executing(op.id()).await {
            // The row stays pending: it resumes at the next start.
            tracing::error!(error = %e, "cannot mark the operation executing; leaving it pending");
            return;
        }
        let result = match op.command.action.clone() {
            Action::Create(create) => create::run(&ctx, &mut op, &create).await,
            other => Err(Halt::Fail(EventError::new(
                ErrorCode::Internal,
                format!("{} is not supported yet", other.operation_type()),
            ))),
        };
        let outcome = match result {
            Ok(done) => Ok(done),
            Err(Halt::Fail(e)) => Err(e),
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
        ctx.finish(&op, outcome).await;
    }
    .instrument(span)
    .await
}
