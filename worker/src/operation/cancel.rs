//! `cancel`: end a `pending` operation as `cancelled` before it reaches CloudStack (docs/wire.md).
//!
//! The target's row, its `cancelled` event and the marker naming this cancel are written in one
//! transaction ([`crate::db::store::Store::cancel_pending`]); this operation then completes with
//! `target` in its own event. The executor skips a cancelled target when its turn comes (its
//! `mark_executing` finds it ended). Nothing here calls CloudStack.

use schema::{CommandId, ErrorCode, EventError};

use super::outcome::{self, Completed};
use super::{Halt, Operation};
use crate::context::Context;
use crate::db::cancel::CancelFound;

pub(super) async fn run(
    ctx: &Context,
    op: &Operation,
    target: &CommandId,
) -> Result<Completed, Halt> {
    let by = op.id().clone();
    let found = ctx
        .db(&format!("cancel operation {target}"), || {
            ctx.store.cancel_pending(target, &by, |t| {
                outcome::cancelled(t, &by, crate::db::store::now())
            })
        })
        .await?;
    let fail = |code, message: String| {
        Err(Halt::from(EventError::new(code, message).with_hint(
            "only a pending operation can be cancelled; read its state with `volumectl get`",
        )))
    };
    match found {
        CancelFound::Cancelled(ty) | CancelFound::CancelledBefore(ty) => {
            if matches!(found, CancelFound::Cancelled(_)) {
                ctx.metrics.operation_cancelled(ty);
            }
            tracing::info!(%target, "cancelled a pending {ty} operation");
            Ok(Completed::Cancelled {
                target: target.clone(),
                target_type: ty,
            })
        }
        CancelFound::Executing => fail(
            ErrorCode::VolumeInUse,
            format!("operation {target} is executing at CloudStack; it can no longer be cancelled"),
        ),
        CancelFound::Ended(status) => fail(
            ErrorCode::InvalidCommand,
            format!(
                "operation {target} already ended ({}); nothing to cancel",
                status.as_str()
            ),
        ),
        CancelFound::Unknown => fail(
            ErrorCode::InvalidCommand,
            format!("no operation has the id {target}"),
        ),
    }
}
