//! `cancel`: a `pending` operation ended `cancelled`, with its event, in one locked
//! transaction (docs/wire.md `cancel`).

use sqlx::Row;
use sqlx::mysql::MySqlRow;

use schema::{CommandId, OperationStatus, OperationType};

use crate::db::store::{Store, StoreError, operation_from_row};
use crate::model::{Operation, Terminal};

/// What a cancel found its target to be (docs/wire.md `cancel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CancelFound {
    /// The target was pending: it is now `cancelled`, its event queued.
    Cancelled(OperationType),
    /// An earlier run of this same cancel (interrupted before it ended) cancelled it.
    CancelledBefore(OperationType),
    /// It started at CloudStack: too late to cancel.
    Executing,
    /// It had already ended, with this status.
    Ended(OperationStatus),
    /// No operation has that id.
    Unknown,
}

impl Store {
    /// Ends the `pending` operation `target` as `ended` says (`cancelled`, with its terminal
    /// event), on behalf of the cancel operation `by`, whose id `ended` records in the
    /// target's `response` so a cancel resumed after a crash recognises its own work. The row
    /// is locked first: a concurrent [`Store::mark_executing`] either ran before (the target
    /// is `executing`: too late) or finds it ended and skips it.
    pub(crate) async fn cancel_pending(
        &self,
        target: &CommandId,
        by: &CommandId,
        ended: impl Fn(&Operation) -> Terminal,
    ) -> Result<CancelFound, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT CAST(status AS CHAR) AS status, \
             JSON_UNQUOTE(JSON_EXTRACT(response, '$.cancelled_by')) AS cancelled_by, \
             CAST(type AS CHAR) AS op_type, ",
            operation_columns!(),
            " FROM volume_operations WHERE id = ? FOR UPDATE"
        ))
        .bind(target.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CancelFound::Unknown);
        };
        if let Some(found) = cancel_refused(&row, by)? {
            return Ok(found);
        }
        // A stored request that no longer parses was edited by hand: leave it be.
        let Some(op) = operation_from_row(&row)? else {
            return Ok(CancelFound::Unknown);
        };
        let terminal = ended(&op);
        if !self.end_row(&mut tx, target, None, &terminal).await? {
            tx.rollback().await?;
            return Err(self.refused().await);
        }
        self.queue_event(&mut tx, &op, &terminal.event).await?;
        tx.commit().await?;
        self.bell.notify_one();
        Ok(CancelFound::Cancelled(op.command.operation_type()))
    }
}

/// What a cancel finds when its target is not pending (`None`: it is, go on).
fn cancel_refused(row: &MySqlRow, by: &CommandId) -> Result<Option<CancelFound>, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let cancelled_by: Option<String> = row.try_get("cancelled_by")?;
    let ty: String = row.try_get("op_type")?;
    // The column is an ENUM of the types: a value that does not parse is a schema the daemon
    // does not know, reported as such rather than as some type.
    let Some(ty) = OperationType::parse(&ty) else {
        let id: String = row.try_get("id")?;
        let what = format!("operation {id} has type {ty:?}, which this daemon does not know");
        return Err(sqlx::Error::Decode(what.into()));
    };
    Ok(match OperationStatus::parse(&status) {
        Some(OperationStatus::Pending) => None,
        Some(OperationStatus::Executing) => Some(CancelFound::Executing),
        Some(OperationStatus::Cancelled) if cancelled_by.as_deref() == Some(by.as_str()) => {
            Some(CancelFound::CancelledBefore(ty))
        }
        Some(other) => Some(CancelFound::Ended(other)),
        None => Some(CancelFound::Unknown),
    })
}
