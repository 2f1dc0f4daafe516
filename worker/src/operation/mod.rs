//! One operation: an accepted command on its way to a terminal state.
//!
//! [`execute`] is the whole life of an operation once it is committed as `pending`: mark it
//! executing, run the command's own module against CloudStack, and record the outcome together
//! with its event. Each command type has its own file.

mod attach;
mod cancel;
mod create;
mod delete;
mod delete_snapshot;
mod detach;
pub(crate) mod host_files;
pub(crate) mod jobs;
pub(crate) mod mapping_sync;
mod mutate;
pub(crate) mod outcome;
mod reconcile;
mod resize;
mod revert;
mod snapshot;

use std::sync::Arc;

use tracing::Instrument;

use schema::Action;

use crate::context::Context;
use crate::executor::Slot;
pub(crate) use crate::model::{Halt, Operation};
use outcome::Completed;

/// An operation about to take its turn, with what was read for it while it waited and its
/// log span (one span from its preparation to its end).
pub(crate) struct Prepared {
    op: Operation,
    early: Option<jobs::EarlyRead>,
    span: tracing::Span,
}

/// Done while `op` waits for a slot (`executor::Runner::prepare`): the first attempt of an
/// attach reads its volume, so that its turn can start with the `attachVolume` itself
/// ([`jobs::EarlyRead`]). Reads only; a failure just means no early read.
pub(crate) async fn prepare(ctx: Arc<Context>, op: Operation) -> Prepared {
    let span = span_of(&op);
    let first_attempt = op.job_id.is_none() && op.prior_attempts == 0;
    let early = match &op.command.action {
        Action::Attach(attach) if first_attempt => {
            async {
                let cs = ctx.session().await.ok()?;
                jobs::EarlyRead::of(&cs.client, attach.volume_id).await
            }
            .instrument(span.clone())
            .await
        }
        _ => None,
    };
    Prepared { op, early, span }
}

/// Runs the prepared operation to its end and records the outcome with its event. Returns
/// when the outcome is committed, or when `ctx` shuts down first (the operation then resumes
/// at the next start). `slot` is given up once CloudStack's part is done, before the commit:
/// the next in line starts meanwhile (the VM's lock and the volume's lane are held until the
/// commit).
pub(crate) async fn execute(ctx: Arc<Context>, prepared: Prepared, slot: Slot) {
    let Prepared {
        mut op,
        early,
        span,
    } = prepared;
    async move {
        let id = op.id().clone();
        match ctx
            .db("mark the operation executing", || {
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
        let mut result = run(&ctx, &mut op, early).await;
        if let Err(Halt::Fail(e, _)) = &result
            && e.cloudstack_error_code == Some(401)
        {
            // Keys may have been rotated since this operation read them: read them again, once.
            tracing::warn!(
                "CloudStack refused the credentials; reading them again and retrying once"
            );
            result = run(&ctx, &mut op, None).await;
        }
        let at = crate::db::store::now();
        let terminal = match result {
            Ok(done) => {
                if let Some(v) = done.volume_id() {
                    tracing::Span::current().record("volume_id", tracing::field::display(v));
                }
                tracing::info!("operation completed");
                outcome::completed(&op, &done, at)
            }
            Err(Halt::Fail(e, mapping)) => {
                tracing::warn!(code = %e.code, error = %e.message, "operation failed");
                outcome::failed(&op, e, mapping.map(|m| *m), at)
            }
            Err(Halt::Interrupted(why)) => {
                tracing::info!(why, "operation interrupted; it resumes at the next start");
                return;
            }
        };
        drop(slot);
        ctx.metrics.operation_ended(&op, &terminal);
        ctx.finish(&op, terminal).await;
    }
    .instrument(span)
    .await
}

/// The log span of `op`: its id, type, correlation id and, when its command carried one, the
/// trace id (the volume is recorded once known).
fn span_of(op: &Operation) -> tracing::Span {
    let cmd = &op.command;
    let correlation_id = cmd
        .correlation_id
        .as_deref()
        .unwrap_or(cmd.command_id.as_str());
    let span = tracing::info_span!(
        "operation",
        operation_id = %op.id(),
        r#type = %cmd.operation_type(),
        correlation_id,
        trace_id = cmd.trace.as_ref().map(|t| t.trace_id()),
        volume_id = tracing::field::Empty,
    );
    if let Some(trace) = &cmd.trace {
        crate::telemetry::continue_trace(&span, trace);
    }
    span
}

/// A reconcile of every VM with mappings and the host VM (the periodic one; a `reconcile`
/// command runs the same through [`execute`]).
pub(crate) async fn reconcile_all(
    ctx: &Context,
    cs: &crate::cloud::Session,
) -> Result<Vec<schema::event::Change>, Halt> {
    reconcile::reconcile(ctx, cs, None).await
}

/// The command's own module (`early`: what was read while it waited, see [`prepare`]).
async fn run(
    ctx: &Context,
    op: &mut Operation,
    early: Option<jobs::EarlyRead>,
) -> Result<Completed, Halt> {
    match op.command.action.clone() {
        Action::Create(create) => create::run(ctx, op, &create).await,
        Action::Attach(attach) => attach::run(ctx, op, &attach, early).await,
        Action::Detach { volume_id } => detach::run(ctx, op, volume_id).await,
        Action::Delete { volume_id } => delete::run(ctx, op, volume_id).await,
        Action::Cancel { target } => cancel::run(ctx, op, &target).await,
        Action::Reconcile { vm_id } => reconcile::run(ctx, op, vm_id).await,
        Action::Snapshot { volume_id, name } => {
            snapshot::run(ctx, op, volume_id, name.as_deref()).await
        }
        Action::RevertSnapshot {
            volume_id,
            snapshot_id,
        } => revert::run(ctx, op, volume_id, snapshot_id).await,
        Action::DeleteSnapshot {
            volume_id,
            snapshot_id,
        } => delete_snapshot::run(ctx, op, volume_id, snapshot_id).await,
        Action::Resize(resize) => resize::run(ctx, op, &resize).await,
    }
}
