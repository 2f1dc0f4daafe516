//! The `volume_operations` table: accepting commands, recording progress, and ending an
//! operation together with its outbox row.
//!
//! Every write is fenced: it changes nothing unless the execution lease still has this active
//! period's epoch. The writes of every command carry that check in their first statement
//! (`fenced!`: accepting it is one INSERT, marking it executing and recording its job one
//! UPDATE each, ending it a transaction whose first UPDATE is fenced); the rarer ones run in
//! a transaction that checks just before it commits ([`Fence::check`]). Either way the check
//! takes a shared lock on the lease row that a takeover waits for. A write of an instance that
//! lost the lease fails with [`StoreError::Fenced`] and changes nothing.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::{MySqlPool, MySqlTransaction, Row};
use tokio::sync::Notify;

use cloudstack::response::JobId;
use schema::{CloudEvent, Command, CommandId, MessageProps, OperationStatus, Topology, VolumeId};

pub(crate) use crate::db::fence::StoreError;
use crate::db::fence::{Fence, Fenced};
use crate::db::group::{Group, MAX_GROUP};
use crate::db::mappings;
use crate::db::outbox;
use crate::mappings::MappingChange;
use crate::model::{Operation, Terminal};

/// What accepting a command found.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// A new operation, committed as `pending`.
    New(Box<Operation>),
    /// The same command id is already pending or executing: the operation as stored. The
    /// executor may already hold it (it ignores a second copy); after a lost commit
    /// acknowledgement it does not, and this is how it gets it.
    InFlight(Box<Operation>),
    /// The same command id already ended; its terminal event was queued again.
    Ended,
}

/// Access to the operations table for one active period. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub(crate) struct Store {
    pub(in crate::db) pool: MySqlPool,
    topology: Topology,
    pub(in crate::db) fence: Fence,
    /// Rung whenever a transaction that queued an outbox row commits: the relay waits on it.
    pub(in crate::db) bell: Arc<Notify>,
    /// Where `ossea_configs` is read (`OSSEA_CONFIGS_URL`), when not this database.
    pub(in crate::db) configs: Option<MySqlPool>,
    /// The writes of one operation's life that go to the database in groups.
    groups: Arc<Groups>,
}

/// The group-commit queues of the grouped writes (written in `db/grouped.rs`).
#[derive(Debug)]
struct Groups {
    executing: Group<CommandId, bool>,
    jobs: Group<(CommandId, Option<VolumeId>, JobId), ()>,
    endings: Group<Ending, ()>,
}

/// An operation to end, owned (groups are written by whichever caller has the turn).
#[derive(Debug, Clone)]
pub(crate) struct Ending {
    pub id: CommandId,
    pub reply_to: Option<String>,
    /// The operation's CloudStack job, written with the outcome (a job that ended before its
    /// first poll was not recorded on its own).
    pub job: Option<JobId>,
    pub terminal: Terminal,
}

impl Ending {
    pub(crate) fn of(op: &Operation, terminal: &Terminal) -> Self {
        Self {
            id: op.id().clone(),
            reply_to: op.command.reply_to.clone(),
            job: op.job_id.clone(),
            terminal: terminal.clone(),
        }
    }
}

/// The terminal columns of one operation, as the single and the grouped UPDATE write them.
pub(in crate::db) struct EndColumns {
    pub status: &'static str,
    pub job: Option<String>,
    pub volume_id: Option<String>,
    pub vm_id: Option<String>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<&'static str>,
    pub error_detail: Option<String>,
    pub event_id: String,
    pub event_payload: Option<String>,
    pub completed_at: chrono::DateTime<chrono::Utc>,
}

impl EndColumns {
    pub(in crate::db) fn of(terminal: &Terminal, job: Option<&JobId>) -> Self {
        let (event, error) = (&terminal.event, terminal.error.as_ref());
        Self {
            status: terminal.status().as_str(),
            job: job.map(|j| j.0.clone()),
            volume_id: event.data.volume_id.map(|v| v.to_string()),
            vm_id: event.data.vm_id.map(|v| v.to_string()),
            response: terminal.response.as_ref().map(|r| r.to_string()),
            error: error.map(|e| e.message.clone()),
            error_code: error.map(|e| e.code.as_str()),
            error_detail: error.and_then(|e| serde_json::to_string(e).ok()),
            event_id: event.id.to_string(),
            event_payload: serde_json::to_string(event).ok(),
            completed_at: event.data.completed_at,
        }
    }
}

/// Timestamps are stored with millisecond precision; keep the in-memory copy identical.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

impl Store {
    pub(crate) fn new(pool: MySqlPool, topology: Topology, fence: Fence) -> Self {
        Self {
            pool,
            topology,
            fence,
            bell: Arc::new(Notify::new()),
            configs: None,
            groups: Arc::new(Groups {
                executing: Group::new(MAX_GROUP),
                jobs: Group::new(MAX_GROUP),
                endings: Group::new(MAX_GROUP),
            }),
        }
    }

    /// Reads `ossea_configs` from `pool` (the platform's database) instead of this one.
    pub(crate) fn with_configs_from(mut self, pool: Option<MySqlPool>) -> Self {
        self.configs = pool;
        self
    }

    /// What the relay waits on: rung by every commit that queued an event.
    pub(crate) fn relay_bell(&self) -> Arc<Notify> {
        self.bell.clone()
    }

    /// Commits `tx`, which queued an event, fenced, and wakes the relay.
    async fn commit_queued(&self, tx: MySqlTransaction<'_>) -> Result<(), StoreError> {
        self.commit_fenced(tx).await?;
        self.bell.notify_one();
        Ok(())
    }

    /// Commits `tx` if the lease still has our epoch; otherwise rolls it back.
    pub(in crate::db) async fn commit_fenced(
        &self,
        tx: MySqlTransaction<'_>,
    ) -> Result<(), StoreError> {
        self.fence.commit(tx).await
    }

    /// Commits `command` as a `pending` operation (docs/wire.md (processing rule 1): only then is the message
    /// acknowledged). A command id seen before is not executed again (rule 2): if its operation
    /// ended, its terminal event is queued again with the same event id.
    pub(crate) async fn accept(&self, command: Command) -> Result<Accepted, StoreError> {
        let created_at = now();
        // One fenced autocommit statement: the row is inserted only while the lease has our
        // epoch and the command did not end long ago (its operation swept by retention, its
        // id kept in `ended_commands`); the SELECT yields no row otherwise.
        let inserted = sqlx::query(concat!(
            "INSERT INTO volume_operations \
             (id, type, status, volume_id, vm_id, correlation_id, reply_to, request, created_at, \
             traceparent, tracestate) \
             SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM DUAL WHERE \
             NOT EXISTS (SELECT 1 FROM ended_commands WHERE id = ?) AND ",
            fenced!()
        ))
        .bind(command.command_id.as_str())
        .bind(command.operation_type().as_str())
        .bind(OperationStatus::Pending.as_str())
        .bind(command.action.volume_id().map(|v| v.to_string()))
        .bind(command.action.vm_id().map(|v| v.to_string()))
        .bind(command.correlation_id.as_deref())
        .bind(command.reply_to.as_deref())
        .bind(command.to_body().to_string())
        .bind(created_at)
        .bind(command.trace.as_ref().map(|t| t.traceparent.as_str()))
        .bind(command.trace.as_ref().and_then(|t| t.tracestate.as_deref()))
        .bind(command.command_id.as_str())
        .bind(self.fence.name())
        .bind(self.fence.epoch())
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(done) if done.rows_affected() == 1 => {
                Ok(Accepted::New(Box::new(Operation::new(command, created_at))))
            }
            Ok(_) => match self.swept_duplicate(&command).await? {
                Some(ended) => Ok(ended),
                None => Err(self.refused().await),
            },
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                self.duplicate(&command).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A command id seen before. An ended operation's event is queued again, to the events
    /// exchange and to the duplicate's own `reply_to` (the first command's sender had its copy).
    async fn duplicate(&self, command: &Command) -> Result<Accepted, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT CAST(status AS CHAR) AS status, event_id, event_payload, ",
            operation_columns!(),
            " FROM volume_operations WHERE id = ?"
        ))
        .bind(command.command_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        let status: String = row.try_get("status")?;
        let event_id: Option<String> = row.try_get("event_id")?;
        let stored: Option<CloudEvent> = row
            .try_get::<Option<String>, _>("event_payload")?
            .and_then(|p| serde_json::from_str(&p).ok());
        match (OperationStatus::parse(&status), event_id, stored) {
            (Some(s), Some(_), Some(event)) if s.is_terminal() => {
                // The event as it was first published (its outbox row may be gone by now).
                self.requeue(&event, command.reply_to.as_deref()).await?;
                Ok(Accepted::Ended)
            }
            (Some(s), Some(event_id), None) if s.is_terminal() => {
                // Ended before event_payload was stored: copy its outbox row.
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO outbox (event_id, exchange, routing_key, payload, correlation_id, reply_to) \
                     SELECT event_id, exchange, routing_key, payload, correlation_id, ? \
                     FROM outbox WHERE event_id = ? ORDER BY id LIMIT 1",
                )
                .bind(command.reply_to.as_deref())
                .bind(event_id)
                .execute(&mut *tx)
                .await?;
                self.commit_queued(tx).await?;
                Ok(Accepted::Ended)
            }
            _ => match operation_from_row(&row)? {
                Some(op) => Ok(Accepted::InFlight(Box::new(op))),
                // A stored request that no longer parses was edited by hand: leave it be.
                None => Ok(Accepted::Ended),
            },
        }
    }

    /// Queues `event` again (same id) for the events exchange and `reply_to`, fenced.
    async fn requeue(&self, event: &CloudEvent, reply_to: Option<&str>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        outbox::insert(&mut tx, event, &self.topology.events_exchange(), reply_to).await?;
        self.commit_queued(tx).await
    }

    /// A command whose operation ended and was swept by retention: its event, kept in
    /// `ended_commands`, is queued again (same event id), to the events exchange and to this
    /// duplicate's `reply_to`. `None`: the command is not there.
    pub(in crate::db) async fn swept_duplicate(
        &self,
        command: &Command,
    ) -> Result<Option<Accepted>, StoreError> {
        let kept: Option<Option<String>> =
            sqlx::query_scalar("SELECT event_payload FROM ended_commands WHERE id = ?")
                .bind(command.command_id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let Some(payload) = kept else {
            return Ok(None);
        };
        match payload.and_then(|p| serde_json::from_str::<CloudEvent>(&p).ok()) {
            Some(event) => self.requeue(&event, command.reply_to.as_deref()).await?,
            None => {
                tracing::warn!(operation_id = %command.command_id, "a duplicate of a command that ended long ago, whose event was not kept: not executed, nothing published");
            }
        }
        Ok(Some(Accepted::Ended))
    }

    /// Queues the failed event of a message that was not a valid command, unless an operation
    /// with that command id exists (its own event must stay the only terminal one).
    pub(crate) async fn queue_rejection_event(
        &self,
        event: &CloudEvent,
        reply_to: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query(
            "SELECT 1 FROM volume_operations WHERE id = ? \
             UNION ALL SELECT 1 FROM ended_commands WHERE id = ?",
        )
        .bind(event.data.command_id.as_str())
        .bind(event.data.command_id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if exists {
            return Ok(tx.rollback().await?);
        }
        outbox::insert(&mut tx, event, &self.topology.events_exchange(), reply_to).await?;
        self.commit_queued(tx).await
    }

    /// Whether another create operation already owns `volume` (reconciliation must not take
    /// another command's volume).
    pub(crate) async fn volume_claimed_by_other(
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

    /// Marks the operation executing (one more attempt), in one fenced statement (shared with
    /// the operations marked at the same time). `false`: it is no longer pending or executing
    /// (it ended meanwhile): not ours to execute.
    pub(crate) async fn mark_executing(&self, id: &CommandId) -> Result<bool, StoreError> {
        (self.groups.executing)
            .submit(id.clone(), |ids| self.mark_executing_all(ids))
            .await
    }

    /// [`Store::mark_executing`] of one operation alone.
    pub(in crate::db) async fn mark_executing_one(
        &self,
        id: &CommandId,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(concat!(
            "UPDATE volume_operations SET status = ?, attempts = attempts + 1, \
             started_at = COALESCE(started_at, ?) WHERE id = ? AND ",
            unended!(),
            " AND ",
            fenced!()
        ))
        .bind(OperationStatus::Executing.as_str())
        .bind(now())
        .bind(id.as_str())
        .bind(self.fence.name())
        .bind(self.fence.epoch())
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            return Ok(true);
        }
        self.unless_fenced().await?;
        Ok(false)
    }

    /// Records the CloudStack job (and, for a create, the new volume), so a restart resumes
    /// from the job instead of starting a second one. One fenced statement (shared with the
    /// jobs recorded at the same time).
    pub(crate) async fn record_job(
        &self,
        id: &CommandId,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), StoreError> {
        (self.groups.jobs)
            .submit((id.clone(), volume, job.clone()), |jobs| {
                self.record_jobs(jobs)
            })
            .await
    }

    /// [`Store::record_job`] of one operation alone.
    pub(in crate::db) async fn record_job_one(
        &self,
        id: &CommandId,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query(concat!(
            "UPDATE volume_operations SET cloudstack_job_id = ?, volume_id = COALESCE(?, volume_id) \
             WHERE id = ? AND ",
            unended!(),
            " AND ",
            fenced!()
        ))
        .bind(&job.0)
        .bind(volume.map(|v| v.to_string()))
        .bind(id.as_str())
        .bind(self.fence.name())
        .bind(self.fence.epoch())
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            // Nothing changed: the same job again (a resume), an ended operation, or the fence.
            self.unless_fenced().await?;
        }
        Ok(())
    }

    /// After a fenced statement changed nothing: [`StoreError::Fenced`] when the lease has
    /// moved on (the write was refused), `Ok` when it had nothing to change.
    pub(in crate::db) async fn unless_fenced(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.fence.check(&mut conn).await
    }

    /// A fenced statement that had something to change changed nothing: the lease moved on.
    /// The error names the epoch it has now (or a database error reading it).
    pub(in crate::db) async fn refused(&self) -> StoreError {
        match self.unless_fenced().await {
            Err(e) => e,
            // The check passed after the statement found the lease moved: impossible, since
            // epochs only grow; refuse all the same.
            Ok(()) => StoreError::Fenced(Fenced {
                ours: self.fence.epoch(),
                current: None,
            }),
        }
    }

    /// Ends `op` as `terminal` says: the row's terminal state, the change to
    /// `device_mappings` and the outbox row of its event, in one transaction, fenced by its
    /// first statement (shared with the operations that end at the same time). An operation
    /// that already ended is left as it is.
    pub(crate) async fn finish(
        &self,
        op: &Operation,
        terminal: &Terminal,
    ) -> Result<(), StoreError> {
        (self.groups.endings)
            .submit(Ending::of(op, terminal), |endings| self.finish_all(endings))
            .await
    }

    /// [`Store::finish`] of one operation alone.
    pub(in crate::db) async fn finish_one(&self, ending: &Ending) -> Result<(), StoreError> {
        let (id, terminal) = (&ending.id, &ending.terminal);
        let mut tx = self.pool.begin().await?;
        if !self
            .end_row(&mut tx, id, ending.job.as_ref(), terminal)
            .await?
        {
            tx.rollback().await?;
            self.unless_fenced().await?;
            tracing::warn!(operation_id = %id, "operation had already ended; keeping its first outcome");
            return Ok(());
        }
        // The UPDATE's fence holds a shared lock on the lease row until this commits: a
        // takeover waits for it, so the rest of the transaction needs no check of its own.
        if let Some(change) = &terminal.mapping {
            mappings::apply(&mut tx, change).await?;
        }
        if let Some(change) = &terminal.snapshot {
            crate::db::snapshots::apply(&mut tx, change, terminal.event.data.completed_at).await?;
        }
        outbox::insert(
            &mut tx,
            &terminal.event,
            &self.topology.events_exchange(),
            ending.reply_to.as_deref(),
        )
        .await?;
        tx.commit().await?;
        self.bell.notify_one();
        Ok(())
    }

    /// The events exchange outbox rows go to.
    pub(in crate::db) fn events_exchange(&self) -> String {
        self.topology.events_exchange()
    }

    /// Writes the terminal columns of the unended operation `id`, fenced. `false`: it had
    /// ended already, or the fence refused (the caller tells which).
    pub(in crate::db) async fn end_row(
        &self,
        tx: &mut MySqlTransaction<'_>,
        id: &CommandId,
        job: Option<&JobId>,
        terminal: &Terminal,
    ) -> Result<bool, sqlx::Error> {
        let c = EndColumns::of(terminal, job);
        let updated = sqlx::query(concat!(
            "UPDATE volume_operations SET status = ?, \
             cloudstack_job_id = COALESCE(?, cloudstack_job_id), volume_id = COALESCE(?, volume_id), \
             vm_id = COALESCE(?, vm_id), response = ?, error = ?, error_code = ?, error_detail = ?, \
             event_id = ?, event_payload = ?, completed_at = ? WHERE id = ? AND ",
            unended!(),
            " AND ",
            fenced!()
        ))
        .bind(c.status)
        .bind(c.job)
        .bind(c.volume_id)
        .bind(c.vm_id)
        .bind(c.response)
        .bind(c.error)
        .bind(c.error_code)
        .bind(c.error_detail)
        .bind(c.event_id)
        .bind(c.event_payload)
        .bind(c.completed_at)
        .bind(id.as_str())
        .bind(self.fence.name())
        .bind(self.fence.epoch())
        .execute(&mut **tx)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Queues `op`'s terminal event in `tx` (to the events exchange and its `reply_to`).
    pub(in crate::db) async fn queue_event(
        &self,
        tx: &mut MySqlTransaction<'_>,
        op: &Operation,
        event: &CloudEvent,
    ) -> Result<(), sqlx::Error> {
        outbox::insert(
            tx,
            event,
            &self.topology.events_exchange(),
            op.command.reply_to.as_deref(),
        )
        .await
    }

    /// Applies one mapping change on its own (a reconcile's repair), fenced.
    pub(crate) async fn apply_mapping(&self, change: &MappingChange) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        mappings::apply(&mut tx, change).await?;
        self.commit_fenced(tx).await
    }

    /// Every `pending` and `executing` operation, oldest first, to resume at start.
    pub(crate) async fn resumable(&self) -> Result<Vec<Operation>, sqlx::Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            operation_columns!(),
            " FROM volume_operations WHERE ",
            unended!(),
            // The server's order of acceptance, not the daemon's clock.
            " ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut ops = Vec::with_capacity(rows.len());
        for row in rows {
            ops.extend(operation_from_row(&row)?);
        }
        Ok(ops)
    }
}

/// An unfinished operation as stored; `None` (logged) when its request no longer parses.
pub(in crate::db) fn operation_from_row(row: &MySqlRow) -> Result<Option<Operation>, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let request: String = row.try_get("request")?;
    let props = MessageProps {
        message_id: Some(id.clone()),
        correlation_id: row.try_get("correlation_id")?,
        reply_to: row.try_get("reply_to")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
    };
    let command = match Command::parse(request.as_bytes(), &props) {
        Ok(c) => c,
        Err(e) => {
            // Only valid commands are ever stored; a row that no longer parses was edited by
            // hand. Leave it for the operator rather than guess.
            tracing::error!(operation_id = %id, error = %e, "stored request does not parse; not resuming it");
            return Ok(None);
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
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;
    use schema::VolumeId;

    #[test]
    fn unended_names_exactly_the_statuses_that_are_not_terminal() {
        use OperationStatus::*;
        for status in [Pending, Executing, Completed, Failed, Cancelled] {
            let named = unended!().contains(&format!("'{}'", status.as_str()));
            assert_eq!(named, !status.is_terminal(), "{status:?}");
        }
    }

    #[tokio::test]
    async fn a_resumed_operation_sees_the_executions_started_before() {
        let db = TestDb::new().await;
        let store = db.store().await;
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

    /// Resumed operations come back in the order they were accepted, whatever the daemon's
    /// clock said when it accepted them (here stepped back 5 s between an attach and the
    /// detach of the same volume).
    #[tokio::test]
    async fn resumed_operations_keep_the_order_of_acceptance_across_a_clock_step() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let volume = VolumeId::new_random();
        let attach = Command::attach(volume, schema::VmId::new_random());
        let detach = Command::detach(volume);
        store.accept(attach.clone()).await.expect("attach");
        store.accept(detach.clone()).await.expect("detach");
        sqlx::query(
            "UPDATE volume_operations SET created_at = created_at - INTERVAL 5 SECOND WHERE id = ?",
        )
        .bind(detach.command_id.as_str())
        .execute(&db.pool)
        .await
        .expect("clock stepped back");
        let resumed: Vec<CommandId> = (store.resumable().await.expect("resumable").iter())
            .map(|op| op.id().clone())
            .collect();
        assert_eq!(resumed, vec![attach.command_id, detach.command_id]);
    }

    fn attach_command() -> (Command, VolumeId, schema::VmId) {
        let (volume, vm) = (VolumeId::new_random(), schema::VmId::new_random());
        (Command::attach(volume, vm), volume, vm)
    }

    fn attached(op: &Operation, volume: VolumeId, vm: schema::VmId) -> Terminal {
        use crate::operation::outcome::{AttachedVolume, Attachment, Completed};
        let done = Completed::Attached {
            volume: AttachedVolume {
                id: volume,
                virtualmachineid: Some(vm),
                deviceid: Some(1),
                state: "Ready".into(),
                size: None,
            },
            attachment: Attachment::Remote,
            mapping: Box::new(crate::db::testdb::remote_mapping(volume, vm)),
        };
        crate::operation::outcome::completed(op, &done, now())
    }

    async fn count(pool: &MySqlPool, sql: &'static str, id: &str) -> i64 {
        sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count")
    }

    async fn outbox_rows(pool: &MySqlPool) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(pool)
            .await
            .expect("count")
    }

    async fn finish_ok(store: &Store, op: &Operation, volume: VolumeId, vm: schema::VmId) {
        let done = attached(op, volume, vm);
        store.finish(op, &done).await.expect("finish");
    }

    /// Idempotency outlives retention: an ended operation swept with a cutoff 100 days ahead
    /// (a daemon clock stepped forward) leaves its id and event behind; a duplicate is not a
    /// new operation and re-queues the same event; an invalid message with that id adds no
    /// second terminal event.
    #[tokio::test]
    async fn a_duplicate_of_a_swept_command_is_answered_with_its_original_event() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let (command, volume, vm) = attach_command();
        let id = command.command_id.clone();
        let Accepted::New(op) = store.accept(command.clone()).await.expect("accept") else {
            panic!("a new operation")
        };
        finish_ok(&store, &op, volume, vm).await;
        let event_id: String =
            sqlx::query_scalar("SELECT event_id FROM volume_operations WHERE id = ?")
                .bind(id.as_str())
                .fetch_one(&db.pool)
                .await
                .expect("event id");
        let ahead = now() + chrono::TimeDelta::days(100);
        assert_eq!(
            store
                .delete_ended_operations(ahead, 500)
                .await
                .expect("sweep"),
            1
        );
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE id = ?",
                id.as_str()
            )
            .await,
            0,
            "swept"
        );
        let before = outbox_rows(&db.pool).await;

        let again = store.accept(command.clone()).await.expect("duplicate");
        assert!(matches!(again, Accepted::Ended), "{again:?}");
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE id = ?",
                id.as_str()
            )
            .await,
            0,
            "no new operation"
        );
        let queued: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("outbox");
        assert_eq!(queued.len() as i64, before + 1);
        assert_eq!(queued.last(), Some(&event_id), "the original event again");

        let rejected = crate::db::testdb::rejected_event(id.as_str());
        store
            .queue_rejection_event(&rejected, None)
            .await
            .expect("rejection");
        assert_eq!(
            outbox_rows(&db.pool).await,
            before + 1,
            "no second terminal event"
        );
    }

    /// Accepting is idempotent: the same id again is in flight (with the stored operation), and
    /// once ended, a duplicate re-queues the same event for its own reply queue.
    #[tokio::test]
    async fn accept_is_idempotent_and_an_ended_duplicate_queues_the_same_event() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let (command, volume, vm) = attach_command();
        let id = command.command_id.clone();
        let Accepted::New(op) = store.accept(command.clone()).await.expect("accept") else {
            panic!("a new operation")
        };
        let Accepted::InFlight(again) = store.accept(command.clone()).await.expect("again") else {
            panic!("in flight")
        };
        assert_eq!(again.id(), &id);
        assert_eq!(again.command, command, "the stored command");

        assert!(store.mark_executing(&id).await.expect("mark"));
        finish_ok(&store, &op, volume, vm).await;
        let duplicate = command.with_reply_to("amq.gen-dup");
        assert!(matches!(
            store.accept(duplicate).await.expect("dup"),
            Accepted::Ended
        ));

        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT event_id, reply_to FROM outbox ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .expect("outbox");
        assert_eq!(rows.len(), 2, "the event, then its replay");
        assert_eq!(rows[0].0, rows[1].0, "the same event id");
        assert_eq!(
            rows[1].1.as_deref(),
            Some("amq.gen-dup"),
            "to the duplicate's reply queue"
        );
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE id = ?",
                id.as_str()
            )
            .await,
            1
        );
    }

    /// Ending an operation writes its row, its mapping and its outbox row together; a second
    /// outcome changes nothing, and an ended operation is not marked executing again.
    #[tokio::test]
    async fn only_pending_or_executing_rows_end_and_each_ending_writes_row_mapping_and_event() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let (command, volume, vm) = attach_command();
        let id = command.command_id.clone();
        let Accepted::New(op) = store.accept(command).await.expect("accept") else {
            panic!("new")
        };
        assert!(store.mark_executing(&id).await.expect("mark"));
        finish_ok(&store, &op, volume, vm).await;

        let (status, vm_id): (String, Option<String>) = sqlx::query_as(
            "SELECT CAST(status AS CHAR), vm_id FROM volume_operations WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_one(&db.pool)
        .await
        .expect("row");
        assert_eq!(status, "completed");
        assert_eq!(vm_id, Some(vm.to_string()));
        let v = volume.to_string();
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM device_mappings WHERE volume_id = ?",
                &v
            )
            .await,
            1
        );
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM outbox WHERE routing_key = ?",
                "volume.attach.completed"
            )
            .await,
            1
        );

        // A second outcome (say, from a stale copy) is refused without error and writes nothing.
        let late = schema::EventError::new(schema::ErrorCode::Internal, "late");
        let failed = crate::operation::outcome::failed(&op, late, None, now());
        store.finish(&op, &failed).await.expect("no-op");
        assert_eq!(
            outbox_rows(&db.pool).await,
            1,
            "still only the first outcome's event"
        );
        assert!(
            !store.mark_executing(&id).await.expect("mark"),
            "ended: not ours to execute"
        );
    }

    /// A store of an epoch that was taken over changes nothing, and says so.
    #[tokio::test]
    async fn a_store_whose_lease_was_taken_over_writes_nothing() {
        let db = TestDb::new().await;
        let old = db.store().await;
        let (command, volume, vm) = attach_command();
        let id = command.command_id.clone();
        let Accepted::New(op) = old.accept(command).await.expect("accept") else {
            panic!("new")
        };
        let _new = db.take_over().await;

        let fenced = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Fenced(_)));
        assert!(matches!(
            old.mark_executing(&id).await,
            Err(StoreError::Fenced(_))
        ));
        assert!(fenced(
            old.record_job(&id, Some(volume), &JobId("j".into())).await
        ));
        assert!(fenced(old.finish(&op, &attached(&op, volume, vm)).await));
        assert!(matches!(
            old.accept(Command::detach(volume)).await,
            Err(StoreError::Fenced(_))
        ));

        let (status, job): (String, Option<String>) = sqlx::query_as(
            "SELECT CAST(status AS CHAR), cloudstack_job_id FROM volume_operations WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_one(&db.pool)
        .await
        .expect("row");
        assert_eq!(
            (status.as_str(), job),
            ("pending", None),
            "nothing of the old epoch committed"
        );
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE id <> ?",
                id.as_str()
            )
            .await,
            0
        );
        assert_eq!(outbox_rows(&db.pool).await, 0);
    }

    /// A single-statement fenced write (`fenced!`) waits for a takeover that holds the lease
    /// row, then finds the new epoch and changes nothing: the same guarantee as a fenced
    /// transaction's check before commit.
    #[tokio::test]
    async fn a_fenced_statement_waits_for_a_takeover_in_progress_and_is_then_refused() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let (command, _, _) = attach_command();
        let id = command.command_id.clone();
        store.accept(command).await.expect("accept");
        let mut takeover = db.pool.begin().await.expect("tx");
        sqlx::query("UPDATE execution_lease SET epoch = epoch + 1")
            .execute(&mut *takeover)
            .await
            .expect("the takeover's update");
        let write = {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { store.mark_executing(&id).await })
        };
        let (other, _, _) = attach_command();
        let other_id = other.command_id.clone();
        let accept = {
            let store = store.clone();
            tokio::spawn(async move { store.accept(other).await.map(|_| ()) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the write waits for the takeover");
        assert!(!accept.is_finished(), "so does an accept");
        takeover.commit().await.expect("commit the takeover");
        let refused = write.await.expect("task");
        assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
        let refused = accept.await.expect("task");
        assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE id = ?",
                other_id.as_str()
            )
            .await,
            0,
            "the refused accept inserted nothing"
        );
        let status: String =
            sqlx::query_scalar("SELECT CAST(status AS CHAR) FROM volume_operations WHERE id = ?")
                .bind(id.as_str())
                .fetch_one(&db.pool)
                .await
                .expect("row");
        assert_eq!(status, "pending");
    }

    /// The job id recorded before polling is what a resume starts from.
    #[tokio::test]
    async fn a_recorded_job_is_resumed_from() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let command = Command::create("c", "1GiB".parse().expect("size"));
        let id = command.command_id.clone();
        store.accept(command).await.expect("accept");
        store.mark_executing(&id).await.expect("mark");
        let volume = VolumeId::new_random();
        store
            .record_job(&id, Some(volume), &JobId("job-1".into()))
            .await
            .expect("record");

        let resumed = store.resumable().await.expect("resumable");
        assert_eq!(resumed[0].job_id, Some(JobId("job-1".into())));
        assert_eq!(
            resumed[0].volume_id,
            Some(volume),
            "a create learns its volume"
        );
    }

    /// An INVALID_COMMAND event is queued for an unknown id, never for one that names an
    /// operation (that operation's event stays its only terminal one).
    #[tokio::test]
    async fn a_rejection_event_is_never_queued_for_an_id_that_names_an_operation() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let (command, _, _) = attach_command();
        store.accept(command.clone()).await.expect("accept");
        let rejected = |id: &CommandId| {
            let data = schema::EventData::rejected(
                id.clone(),
                schema::OperationType::Attach.into(),
                None,
                schema::EventError::new(schema::ErrorCode::InvalidCommand, "bad"),
                now(),
            );
            CloudEvent::new(schema::EventId::new_random(), now(), data)
        };
        store
            .queue_rejection_event(&rejected(&command.command_id), None)
            .await
            .expect("queue");
        assert_eq!(outbox_rows(&db.pool).await, 0, "the id names an operation");
        let unknown = CommandId::parse("never-accepted").expect("id");
        store
            .queue_rejection_event(&rejected(&unknown), Some("amq.gen-x"))
            .await
            .expect("queue");
        assert_eq!(outbox_rows(&db.pool).await, 1);
    }
}
