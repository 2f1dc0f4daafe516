//! The `volume_operations` table: accepting commands, recording progress, and ending an
//! operation together with its outbox row.

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::{MySqlPool, Row};

use cloudstack::response::JobId;
use schema::{
    CloudEvent, Command, CommandId, EventId, MessageProps, OperationStatus, Topology, VolumeId,
};

use crate::mappings::{self, MappingChange};
use crate::operation::{Operation, Outcome, event_for};
use crate::outbox;

/// What accepting a command found.
#[derive(Debug)]
pub enum Accepted {
    /// A new operation, committed as `pending`.
    New(Box<Operation>),
    /// The same command id is already pending or executing: nothing to do.
    InFlight,
    /// The same command id already ended; its terminal event was queued again.
    Ended,
}

/// Access to the operations table. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
    topology: Topology,
}

/// Timestamps are stored with millisecond precision; keep the in-memory copy identical.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

impl Store {
    pub fn new(pool: MySqlPool, topology: Topology) -> Self {
        Self { pool, topology }
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Commits `command` as a `pending` operation (CONTRACT §3 rule 1: only then is the message
    /// acknowledged). A command id seen before is not executed again (rule 2): if its operation
    /// ended, its terminal event is queued again with the same event id.
    pub async fn accept(&self, command: Command) -> Result<Accepted, sqlx::Error> {
        let created_at = now();
        let inserted = sqlx::query(
            "INSERT INTO volume_operations \
             (id, type, status, volume_id, vm_id, correlation_id, reply_to, request, created_at) \
             VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
        )
        .bind(command.command_id.as_str())
        .bind(command.operation_type().as_str())
        .bind(command.action.volume_id().map(|v| v.to_string()))
        .bind(command.action.vm_id().map(|v| v.to_string()))
        .bind(command.correlation_id.as_deref())
        .bind(command.reply_to.as_deref())
        .bind(command.to_body().to_string())
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(Accepted::New(Box::new(Operation::new(command, created_at)))),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                self.duplicate(&command).await
            }
            Err(e) => Err(e),
        }
    }

    /// A command id seen before. An ended operation's event is queued again, to the events
    /// exchange and to the duplicate's own `reply_to` (the first command's sender had its copy).
    async fn duplicate(&self, command: &Command) -> Result<Accepted, sqlx::Error> {
        let row = sqlx::query(
            "SELECT CAST(status AS CHAR) AS status, event_id FROM volume_operations WHERE id = ?",
        )
        .bind(command.command_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        let status: String = row.try_get("status")?;
        let event_id: Option<String> = row.try_get("event_id")?;
        match (OperationStatus::parse(&status), event_id) {
            (Some(s), Some(event_id)) if s.is_terminal() => {
                sqlx::query(
                    "INSERT INTO outbox (event_id, exchange, routing_key, payload, correlation_id, reply_to) \
                     SELECT event_id, exchange, routing_key, payload, correlation_id, ? \
                     FROM outbox WHERE event_id = ? ORDER BY id LIMIT 1",
                )
                .bind(command.reply_to.as_deref())
                .bind(event_id)
                .execute(&self.pool)
                .await?;
                Ok(Accepted::Ended)
            }
            _ => Ok(Accepted::InFlight),
        }
    }

    /// Queues the failed event of a message that was not a valid command, unless an operation
    /// with that command id exists (its own event must stay the only terminal one).
    pub async fn queue_rejection_event(
        &self,
        event: &CloudEvent,
        reply_to: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM volume_operations WHERE id = ?")
            .bind(event.data.command_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            outbox::insert(&mut tx, event, &self.topology.events_exchange(), reply_to).await?;
        }
        tx.commit().await
    }

    /// Whether another create operation already owns `volume` (reconciliation must not take
    /// another command's volume).
    pub async fn volume_claimed_by_other(
        &self,
        volume: VolumeId,
        id: &CommandId,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT 1 FROM volume_operations WHERE volume_id = ? AND id <> ? AND type = 'create' LIMIT 1")
            .bind(volume.to_string())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn mark_executing(&self, id: &CommandId) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE volume_operations SET status = 'executing', attempts = attempts + 1, \
             started_at = COALESCE(started_at, ?) WHERE id = ? AND status IN ('pending', 'executing')",
        )
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records the CloudStack job (and, for a create, the new volume) before polling it, so a
    /// restart resumes from the job instead of starting a second one.
    pub async fn record_job(
        &self,
        id: &CommandId,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE volume_operations SET cloudstack_job_id = ?, volume_id = COALESCE(?, volume_id) WHERE id = ?",
        )
        .bind(&job.0)
        .bind(volume.map(|v| v.to_string()))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends `op` with `outcome`: the row's terminal state, the change to `device_mappings` and
    /// the outbox row of its event, in one transaction. An operation that already ended is left
    /// as it is.
    pub async fn finish(
        &self,
        op: &Operation,
        outcome: &Outcome,
        mapping: Option<&MappingChange>,
    ) -> Result<(), sqlx::Error> {
        let completed_at = now();
        let event = event_for(op, outcome, EventId::new_random(), completed_at);
        let (response, error, error_code) = match outcome {
            Ok(c) => (Some(c.response.to_string()), None, None),
            Err(e) => (None, Some(e.message.as_str()), Some(e.code.as_str())),
        };
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE volume_operations SET status = ?, volume_id = COALESCE(?, volume_id), \
             vm_id = COALESCE(?, vm_id), response = ?, error = ?, error_code = ?, event_id = ?, \
             completed_at = ? WHERE id = ? AND status IN ('pending', 'executing')",
        )
        .bind(event.data.status.as_str())
        .bind(event.data.volume_id.map(|v| v.to_string()))
        .bind(event.data.vm_id.map(|v| v.to_string()))
        .bind(response)
        .bind(error)
        .bind(error_code)
        .bind(event.id.to_string())
        .bind(completed_at)
        .bind(op.id().as_str())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tracing::warn!(operation_id = %op.id(), "operation had already ended; keeping its first outcome");
            return tx.rollback().await;
        }
        if let Some(change) = mapping {
            mappings::apply(&mut tx, change).await?;
        }
        outbox::insert(
            &mut tx,
            &event,
            &self.topology.events_exchange(),
            op.command.reply_to.as_deref(),
        )
        .await?;
        tx.commit().await
    }

    /// Every `pending` and `executing` operation, oldest first, to resume at start.
    pub async fn resumable(&self) -> Result<Vec<Operation>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, CAST(request AS CHAR) AS request, correlation_id, reply_to, cloudstack_job_id, \
             volume_id, created_at, attempts FROM volume_operations \
             WHERE status IN ('pending', 'executing') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut ops = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let request: String = row.try_get("request")?;
            let props = MessageProps {
                message_id: Some(id.clone()),
                correlation_id: row.try_get("correlation_id")?,
                reply_to: row.try_get("reply_to")?,
            };
            let command = match Command::parse(request.as_bytes(), &props) {
                Ok(c) => c,
                Err(e) => {
                    // Only valid commands are ever stored; a row that no longer parses was
                    // edited by hand. Leave it for the operator rather than guess.
                    tracing::error!(operation_id = %id, error = %e, "stored request does not parse; not resuming it");
                    continue;
                }
            };
            let mut op = Operation::new(command, row.try_get("created_at")?);
            op.job_id = row
                .try_get::<Option<String>, _>("cloudstack_job_id")?
                .map(JobId);
            if let Some(v) = row.try_get::<Option<String>, _>("volume_id")? {
                op.volume_id = VolumeId::parse(&v).ok().or(op.volume_id);
            }
            op.prior_attempts = row.try_get("attempts")?;
            ops.push(op);
        }
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdb::TestDb;
    use schema::VolumeId;

    #[tokio::test]
    async fn a_resumed_operation_sees_the_executions_started_before() {
        let db = TestDb::new().await;
        let store = Store::new(db.pool.clone(), Topology::new("unit"));
        let command = Command::detach(VolumeId::new_random());
        let id = command.command_id.clone();
        assert!(matches!(
            store.accept(command).await.expect("accept"),
            Accepted::New(_)
        ));
        assert_eq!(
            store.resumable().await.expect("resumable")[0].prior_attempts,
            0
        );

        store.mark_executing(&id).await.expect("first run");
        store.mark_executing(&id).await.expect("second run");

        let resumed = store.resumable().await.expect("resumable");
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].id(), &id);
        assert_eq!(
            resumed[0].prior_attempts, 2,
            "the stored attempts are loaded"
        );
    }
}
