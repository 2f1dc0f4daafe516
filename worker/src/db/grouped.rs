//! The grouped forms of an operation's writes ([`super::group`]): accepting commands, marking
//! operations executing, recording their jobs and ending them, each for many operations in
//! one statement (ending: one transaction). Each keeps its single form's fence and answers
//! exactly what the single form would have; when the database refuses a group as a whole, or
//! the group changed fewer rows than it names, every item is answered by its single form (or
//! by reading what the group did), never guessed.

use sqlx::{AssertSqlSafe, Row};

use schema::{Command, CommandId, OperationStatus, VolumeId};

use cloudstack::response::JobId;

use crate::db::fence::StoreError;
use crate::db::store::{Accepted, EndColumns, Ending, Store, now};
use crate::db::{bucket, mappings, outbox, padded, snapshots};
use crate::model::Operation;

/// `?, ?, …` for the [`bucket`] of `n` bound values (only placeholders go into the SQL text).
fn placeholders(n: usize) -> String {
    vec!["?"; bucket(n)].join(", ")
}

/// `CASE id WHEN ? THEN ? … END` for the [`bucket`] of `n` operations: each row's own value,
/// bound as (id, value) pairs in the order of the group, [`padded`].
fn case_by_id(n: usize) -> String {
    format!("CASE id {} END", vec!["WHEN ? THEN ?"; bucket(n)].join(" "))
}

/// What each of `n` items of a group gets when the check after it failed with `e`: the
/// fence's refusal as it is; any other error (not `Clone`) as `Abandoned`, which is transient,
/// so each caller writes its item again and meets the error itself.
fn all_refused<T>(n: usize, e: &StoreError) -> Vec<Result<T, StoreError>> {
    (0..n)
        .map(|_| match e {
            StoreError::Fenced(f) => Err(StoreError::Fenced(f.clone())),
            _ => Err(StoreError::Abandoned),
        })
        .collect()
}

impl Store {
    /// Accepts `commands` as [`Store::accept`] would, one at a time, in one fenced statement
    /// when they are new (the usual case): one result per command, in order. Their rows get
    /// their `seq` in this order.
    pub(crate) async fn accept_all(
        &self,
        commands: Vec<Command>,
    ) -> Vec<Result<Accepted, StoreError>> {
        if commands.len() > 1 {
            match self.insert_all(&commands).await {
                Ok(Some(accepted)) => return accepted,
                Ok(None) => {}
                // A duplicate among them (the whole statement failed and inserted nothing), or
                // anything else: each on its own.
                Err(e) => {
                    tracing::debug!(error = %e, "a group of commands was refused as a whole; accepting them one at a time")
                }
            }
        }
        let mut results = Vec::with_capacity(commands.len());
        for command in commands {
            results.push(self.accept(command).await);
        }
        results
    }

    /// One `INSERT … SELECT … UNION ALL …`, each row under [`Store::accept`]'s conditions.
    /// `None`: the statement failed in a way the single form explains better.
    async fn insert_all(
        &self,
        commands: &[Command],
    ) -> Result<Option<Vec<Result<Accepted, StoreError>>>, sqlx::Error> {
        let created_at = now();
        let query = self.insert_query(commands, created_at);
        let inserted = match query.execute(&self.pool).await {
            Ok(done) => done.rows_affected(),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
            Err(e) => return Err(e),
        };
        let new = |c: &Command| {
            Ok(Accepted::New(Box::new(Operation::new(
                c.clone(),
                created_at,
            ))))
        };
        if inserted == commands.len() as u64 {
            return Ok(Some(commands.iter().map(new).collect()));
        }
        // Fewer rows: the fence refused them all, or some ended long ago (swept by retention,
        // kept in `ended_commands`): exactly those were not inserted.
        if let Err(e) = self.unless_fenced().await {
            return Ok(Some(all_refused(commands.len(), &e)));
        }
        let mut results = Vec::with_capacity(commands.len());
        for c in commands {
            results.push(match self.swept_duplicate(c).await {
                Ok(Some(ended)) => Ok(ended),
                Ok(None) => new(c),
                Err(e) => Err(e),
            });
        }
        Ok(Some(results))
    }

    /// The `INSERT … SELECT … UNION ALL …` of [`Store::insert_all`], bound.
    fn insert_query<'q>(
        &'q self,
        commands: &'q [Command],
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
        // The first `?` of a row says whether it is one of the group's or padding.
        let row = concat!(
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM DUAL WHERE ? AND \
             NOT EXISTS (SELECT 1 FROM ended_commands WHERE id = ?) AND ",
            fenced!()
        );
        let sql = format!(
            "INSERT INTO volume_operations \
             (id, type, status, volume_id, vm_id, correlation_id, reply_to, request, created_at, \
             traceparent, tracestate) {}",
            vec![row; bucket(commands.len())].join(" UNION ALL ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (i, c) in padded(commands).enumerate() {
            query = query
                .bind(c.command_id.as_str())
                .bind(c.operation_type().as_str())
                .bind(OperationStatus::Pending.as_str())
                .bind(c.action.volume_id().map(|v| v.to_string()))
                .bind(c.action.vm_id().map(|v| v.to_string()))
                .bind(c.correlation_id.as_deref())
                .bind(c.reply_to.as_deref())
                .bind(c.to_body().to_string())
                .bind(created_at)
                .bind(c.trace.as_ref().map(|t| t.traceparent.as_str()))
                .bind(c.trace.as_ref().and_then(|t| t.tracestate.as_deref()))
                .bind(i < commands.len())
                .bind(c.command_id.as_str())
                .bind(self.fence.name())
                .bind(self.fence.epoch());
        }
        query
    }

    /// [`Store::mark_executing`] of several operations, one fenced statement.
    pub(in crate::db) async fn mark_executing_all(
        &self,
        ids: Vec<CommandId>,
    ) -> Vec<Result<bool, StoreError>> {
        if ids.len() == 1 {
            return vec![self.mark_executing_one(&ids[0]).await];
        }
        let sql = format!(
            concat!(
                "UPDATE volume_operations SET status = ?, attempts = attempts + 1, \
                 started_at = COALESCE(started_at, ?) WHERE id IN ({}) AND ",
                unended!(),
                " AND ",
                fenced!()
            ),
            placeholders(ids.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(OperationStatus::Executing.as_str())
            .bind(now());
        for id in padded(&ids) {
            query = query.bind(id.as_str());
        }
        let query = query.bind(self.fence.name()).bind(self.fence.epoch());
        match query.execute(&self.pool).await {
            Ok(done) if done.rows_affected() == ids.len() as u64 => {
                ids.iter().map(|_| Ok(true)).collect()
            }
            // Every unended one was marked: the others had ended (or the fence refused all).
            Ok(_) => self.which_executing(&ids).await,
            Err(e) => {
                tracing::debug!(error = %e, "marking a group executing failed; one at a time");
                let mut results = Vec::with_capacity(ids.len());
                for id in &ids {
                    results.push(self.mark_executing_one(id).await);
                }
                results
            }
        }
    }

    /// After a grouped mark changed fewer rows than it named: `true` for the rows it marked
    /// (now executing), `false` for those that had ended; all fenced if the lease moved on.
    async fn which_executing(&self, ids: &[CommandId]) -> Vec<Result<bool, StoreError>> {
        if let Err(e) = self.unless_fenced().await {
            return all_refused(ids.len(), &e);
        }
        let sql = format!(
            concat!(
                "SELECT id FROM volume_operations WHERE id IN ({}) AND ",
                unended!()
            ),
            placeholders(ids.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in padded(ids) {
            query = query.bind(id.as_str());
        }
        match query.fetch_all(&self.pool).await {
            Ok(rows) => {
                let marked: std::collections::HashSet<String> = rows
                    .iter()
                    .filter_map(|r| r.try_get::<String, _>("id").ok())
                    .collect();
                ids.iter()
                    .map(|id| Ok(marked.contains(id.as_str())))
                    .collect()
            }
            Err(e) => all_refused(ids.len(), &StoreError::Db(e)),
        }
    }

    /// [`Store::record_job`] of several operations, one fenced statement.
    pub(in crate::db) async fn record_jobs(
        &self,
        jobs: Vec<(CommandId, Option<VolumeId>, JobId)>,
    ) -> Vec<Result<(), StoreError>> {
        if jobs.len() == 1 {
            let (id, volume, job) = &jobs[0];
            return vec![self.record_job_one(id, *volume, job).await];
        }
        let n = jobs.len();
        let sql = format!(
            concat!(
                "UPDATE volume_operations SET cloudstack_job_id = {}, \
                 volume_id = COALESCE({}, volume_id) WHERE id IN ({}) AND ",
                unended!(),
                " AND ",
                fenced!()
            ),
            case_by_id(n),
            case_by_id(n),
            placeholders(n)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (id, _, job) in padded(&jobs) {
            query = query.bind(id.as_str()).bind(&job.0);
        }
        for (id, volume, _) in padded(&jobs) {
            query = query.bind(id.as_str()).bind(volume.map(|v| v.to_string()));
        }
        for (id, _, _) in padded(&jobs) {
            query = query.bind(id.as_str());
        }
        let query = query.bind(self.fence.name()).bind(self.fence.epoch());
        match query.execute(&self.pool).await {
            Ok(done) if done.rows_affected() == n as u64 => jobs.iter().map(|_| Ok(())).collect(),
            // As the single form: fewer rows changed is fine unless the fence refused.
            Ok(_) => match self.unless_fenced().await {
                Ok(()) => jobs.iter().map(|_| Ok(())).collect(),
                Err(e) => all_refused(n, &e),
            },
            Err(e) => {
                tracing::debug!(error = %e, "recording a group of jobs failed; one at a time");
                let mut results = Vec::with_capacity(n);
                for (id, volume, job) in &jobs {
                    results.push(self.record_job_one(id, *volume, job).await);
                }
                results
            }
        }
    }

    /// [`Store::finish`] of several operations: one transaction whose first statement ends
    /// every row, fenced, then their mapping and snapshot changes and one INSERT of all their
    /// outbox rows. When it cannot end every row it names (one had ended already) or the
    /// database refuses it, it is rolled back and each is ended on its own.
    pub(in crate::db) async fn finish_all(
        &self,
        endings: Vec<Ending>,
    ) -> Vec<Result<(), StoreError>> {
        if endings.len() > 1 {
            match self.end_all(&endings).await {
                Ok(true) => {
                    self.bell.notify_one();
                    return endings.iter().map(|_| Ok(())).collect();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "ending a group of operations failed; one at a time")
                }
            }
        }
        let mut results = Vec::with_capacity(endings.len());
        for ending in &endings {
            results.push(self.finish_one(ending).await);
        }
        results
    }

    /// The transaction of [`Store::finish_all`]; `false` (rolled back): not every row was
    /// unended.
    async fn end_all(&self, endings: &[Ending]) -> Result<bool, sqlx::Error> {
        let n = endings.len();
        let columns: Vec<(&CommandId, EndColumns)> = endings
            .iter()
            .map(|e| (&e.id, EndColumns::of(&e.terminal, e.job.as_ref())))
            .collect();
        let query = self.end_query(&columns);
        let mut tx = self.pool.begin().await?;
        if query.execute(&mut *tx).await?.rows_affected() != n as u64 {
            tx.rollback().await?;
            return Ok(false);
        }
        // The UPDATE's fence holds a shared lock on the lease row until this commits.
        for ending in endings {
            let terminal = &ending.terminal;
            if let Some(change) = &terminal.mapping {
                mappings::apply(&mut tx, change).await?;
            }
            if let Some(change) = &terminal.snapshot {
                snapshots::apply(&mut tx, change, terminal.event.data.completed_at).await?;
            }
        }
        let exchange = self.events_exchange();
        // The event's JSON as the UPDATE stored it: serialized once.
        let rows = (endings.iter().zip(&columns))
            .map(|(e, (_, c))| {
                let payload = c.event_payload.as_deref().ok_or_else(|| {
                    sqlx::Error::Encode(format!("event {} does not serialize", c.event_id).into())
                })?;
                Ok(outbox::NewRow {
                    event: &e.terminal.event,
                    payload,
                    exchange: &exchange,
                    reply_to: e.reply_to.as_deref(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        outbox::insert_all(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The UPDATE of [`Store::end_all`]: every row's terminal columns by `CASE id`, fenced.
    fn end_query<'q>(
        &'q self,
        columns: &'q [(&'q CommandId, EndColumns)],
    ) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
        let n = columns.len();
        let case = case_by_id(n);
        let sql = format!(
            concat!(
                "UPDATE volume_operations SET status = {c}, \
                 cloudstack_job_id = COALESCE({c}, cloudstack_job_id), volume_id = COALESCE({c}, volume_id), \
                 vm_id = COALESCE({c}, vm_id), response = {c}, error = {c}, error_code = {c}, \
                 error_detail = {c}, event_id = {c}, event_payload = {c}, completed_at = {c} \
                 WHERE id IN ({ids}) AND ",
                unended!(),
                " AND ",
                fenced!()
            ),
            c = case,
            ids = placeholders(n)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        macro_rules! arms {
            ($field:ident) => {
                for (id, c) in padded(columns) {
                    query = query.bind(id.as_str()).bind(c.$field.clone());
                }
            };
        }
        arms!(status);
        arms!(job);
        arms!(volume_id);
        arms!(vm_id);
        arms!(response);
        arms!(error);
        arms!(error_code);
        arms!(error_detail);
        arms!(event_id);
        arms!(event_payload);
        arms!(completed_at);
        for (id, _) in padded(columns) {
            query = query.bind(id.as_str());
        }
        query.bind(self.fence.name()).bind(self.fence.epoch())
    }
}

#[cfg(test)]
mod tests {
    use schema::{ErrorCode, EventError, VmId};

    use super::*;
    use crate::db::testdb::TestDb;
    use crate::mappings::MappingChange;

    fn detaches(n: usize) -> Vec<Command> {
        (0..n)
            .map(|_| Command::detach(VolumeId::new_random()))
            .collect()
    }

    /// `n` detaches accepted by `store` in one group, each new: their operations.
    async fn accepted_detaches(store: &Store, n: usize) -> Vec<Operation> {
        (store.accept_all(detaches(n)).await.into_iter())
            .map(|a| match a {
                Ok(Accepted::New(op)) => *op,
                other => panic!("new: {other:?}"),
            })
            .collect()
    }

    async fn column(pool: &sqlx::MySqlPool, sql: &'static str, id: &CommandId) -> Option<String> {
        sqlx::query_scalar(sql)
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
            .expect("read")
            .flatten()
    }

    async fn count(pool: &sqlx::MySqlPool, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await
            .expect("count")
    }

    /// A group of new commands is one statement and keeps their order; a group with a
    /// command in flight among them is refused as a whole and accepted one at a time: each
    /// answer is the single form's.
    #[tokio::test]
    async fn a_group_of_commands_is_accepted_in_order_and_a_duplicate_among_them_is_answered_as_one()
     {
        let db = TestDb::new().await;
        let store = db.store().await;
        let commands = detaches(5);
        let accepted = store.accept_all(commands.clone()).await;
        assert!(
            accepted.iter().all(|a| matches!(a, Ok(Accepted::New(_)))),
            "{accepted:?}"
        );
        let order: Vec<String> =
            sqlx::query_scalar("SELECT id FROM volume_operations ORDER BY seq")
                .fetch_all(&db.pool)
                .await
                .expect("order");
        let ids: Vec<String> = commands.iter().map(|c| c.command_id.to_string()).collect();
        assert_eq!(order, ids, "seq in the order of the group");

        let mut mixed = detaches(2);
        mixed.insert(1, commands[2].clone());
        let answers = store.accept_all(mixed.clone()).await;
        assert!(matches!(answers[0], Ok(Accepted::New(_))), "{answers:?}");
        assert!(
            matches!(answers[1], Ok(Accepted::InFlight(_))),
            "{answers:?}"
        );
        assert!(matches!(answers[2], Ok(Accepted::New(_))), "{answers:?}");
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM volume_operations").await,
            7
        );
    }

    /// A command that ended long ago (kept in `ended_commands` only) in a group: exactly it is
    /// not inserted and its event is queued again; the others of the group are new.
    #[tokio::test]
    async fn a_swept_command_in_a_group_is_answered_with_its_event_and_the_rest_are_new() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let old = Command::detach(VolumeId::new_random());
        let Ok(Accepted::New(op)) = store.accept(old.clone()).await else {
            panic!("new")
        };
        let failed = crate::operation::outcome::failed(
            &op,
            EventError::new(ErrorCode::Internal, "x"),
            None,
            now(),
        );
        store.finish(&op, &failed).await.expect("finish");
        let ahead = now() + chrono::TimeDelta::days(100);
        store
            .delete_ended_operations(ahead, 500)
            .await
            .expect("sweep");
        let outbox_before = count(&db.pool, "SELECT COUNT(*) FROM outbox").await;

        let mut group = detaches(2);
        group.insert(1, old);
        let answers = store.accept_all(group).await;
        assert!(matches!(answers[0], Ok(Accepted::New(_))), "{answers:?}");
        assert!(matches!(answers[1], Ok(Accepted::Ended)), "{answers:?}");
        assert!(matches!(answers[2], Ok(Accepted::New(_))), "{answers:?}");
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM volume_operations").await,
            2
        );
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM outbox").await,
            outbox_before + 1,
            "the old event again"
        );
    }

    /// Marking a group executing: the one that ended meanwhile is `false`, every other is
    /// marked once (one attempt each, not two).
    #[tokio::test]
    async fn a_group_marked_executing_counts_one_attempt_each_and_skips_the_ended() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let commands = detaches(4);
        let mut ops = Vec::new();
        for a in store.accept_all(commands.clone()).await {
            let Ok(Accepted::New(op)) = a else {
                panic!("new")
            };
            ops.push(*op);
        }
        let failed = crate::operation::outcome::failed(
            &ops[1],
            EventError::new(ErrorCode::Internal, "x"),
            None,
            now(),
        );
        store.finish(&ops[1], &failed).await.expect("ended");
        let ids: Vec<CommandId> = ops.iter().map(|o| o.id().clone()).collect();
        let marked: Vec<bool> = (store.mark_executing_all(ids.clone()).await.into_iter())
            .map(|r| r.expect("marked"))
            .collect();
        assert_eq!(marked, vec![true, false, true, true]);
        for (i, id) in ids.iter().enumerate() {
            let attempts = column(
                &db.pool,
                "SELECT CAST(attempts AS CHAR) FROM volume_operations WHERE id = ?",
                id,
            )
            .await;
            let want = if i == 1 { "0" } else { "1" };
            assert_eq!(attempts.as_deref(), Some(want), "operation {i}");
        }
    }

    /// A group of three (its statements name four rows) with one ended among them: the
    /// read after the shortfall names the same padded rows as the mark.
    #[tokio::test]
    async fn a_group_of_three_with_an_ended_one_is_answered_row_by_row() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let ops = accepted_detaches(&store, 3).await;
        let error = EventError::new(ErrorCode::Internal, "x");
        let failed = crate::operation::outcome::failed(&ops[2], error, None, now());
        store.finish(&ops[2], &failed).await.expect("ended");
        let ids: Vec<CommandId> = ops.iter().map(|o| o.id().clone()).collect();
        let marked: Vec<bool> = (store.mark_executing_all(ids).await.into_iter())
            .map(|r| r.expect("marked"))
            .collect();
        assert_eq!(marked, vec![true, true, false]);
    }

    fn mapping_of(volume: VolumeId, vm: VmId) -> MappingChange {
        MappingChange::Upsert(crate::db::testdb::remote_mapping(volume, vm))
    }

    /// A group's jobs and endings: each row gets its own job, volume, status, event and
    /// mapping; the outbox one row per event, each to its own reply queue.
    #[tokio::test]
    async fn a_group_records_each_operations_own_job_and_outcome() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let mut commands = detaches(3);
        commands[1] = commands[1].clone().with_reply_to("amq.gen-one");
        let mut ops = Vec::new();
        for a in store.accept_all(commands.clone()).await {
            let Ok(Accepted::New(op)) = a else {
                panic!("new")
            };
            ops.push(*op);
        }
        let ids: Vec<CommandId> = ops.iter().map(|o| o.id().clone()).collect();
        let volumes: Vec<VolumeId> = ops.iter().map(|_| VolumeId::new_random()).collect();
        let jobs = (ids.iter().zip(&volumes).enumerate())
            .map(|(i, (id, v))| (id.clone(), Some(*v), JobId(format!("job-{i}"))))
            .collect();
        for r in store.record_jobs(jobs).await {
            r.expect("recorded");
        }
        let endings: Vec<Ending> = (ops.iter().enumerate())
            .map(|(i, op)| {
                let mapping = (i == 2).then(|| mapping_of(volumes[i], VmId::new_random()));
                let error = EventError::new(ErrorCode::Internal, format!("failure {i}"));
                Ending::of(
                    op,
                    &crate::operation::outcome::failed(op, error, mapping, now()),
                )
            })
            .collect();
        for r in store.finish_all(endings).await {
            r.expect("ended");
        }
        for (i, id) in ids.iter().enumerate() {
            let job = column(
                &db.pool,
                "SELECT cloudstack_job_id FROM volume_operations WHERE id = ?",
                id,
            )
            .await;
            assert_eq!(job, Some(format!("job-{i}")));
            let error = column(
                &db.pool,
                "SELECT error FROM volume_operations WHERE id = ?",
                id,
            )
            .await;
            assert_eq!(error, Some(format!("failure {i}")));
            let status = column(
                &db.pool,
                "SELECT CAST(status AS CHAR) FROM volume_operations WHERE id = ?",
                id,
            )
            .await;
            assert_eq!(status.as_deref(), Some("failed"));
            let event = column(
                &db.pool,
                "SELECT event_id FROM volume_operations WHERE id = ?",
                id,
            )
            .await;
            let queued = column(
                &db.pool,
                "SELECT event_id FROM outbox WHERE payload LIKE CONCAT('%', ?, '%')",
                id,
            )
            .await;
            assert_eq!(queued, event, "its own event in the outbox");
        }
        let reply: Vec<Option<String>> =
            sqlx::query_scalar("SELECT reply_to FROM outbox ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .expect("outbox");
        assert_eq!(reply, vec![None, Some("amq.gen-one".to_owned()), None]);
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM device_mappings").await,
            1
        );
    }

    /// A group naming an operation that already ended is rolled back and ended one at a time:
    /// the ended one keeps its first outcome (one event), the others end.
    #[tokio::test]
    async fn a_group_with_an_ended_operation_ends_the_others_and_keeps_the_first_outcome() {
        let db = TestDb::new().await;
        let store = db.store().await;
        let ops = accepted_detaches(&store, 3).await;
        let fail = |op: &Operation, why: &str| {
            crate::operation::outcome::failed(
                op,
                EventError::new(ErrorCode::Internal, why),
                None,
                now(),
            )
        };
        store
            .finish(&ops[0], &fail(&ops[0], "first"))
            .await
            .expect("first outcome");
        let endings = ops
            .iter()
            .map(|op| Ending::of(op, &fail(op, "group")))
            .collect();
        for r in store.finish_all(endings).await {
            r.expect("no error");
        }
        let first = column(
            &db.pool,
            "SELECT error FROM volume_operations WHERE id = ?",
            ops[0].id(),
        )
        .await;
        assert_eq!(first.as_deref(), Some("first"));
        assert_eq!(count(&db.pool, "SELECT COUNT(*) FROM outbox").await, 3);
        assert_eq!(
            count(
                &db.pool,
                "SELECT COUNT(*) FROM volume_operations WHERE error = 'group'"
            )
            .await,
            2
        );
    }

    /// After a takeover every grouped write of the old epoch is refused, and nothing of it
    /// is committed.
    #[tokio::test]
    async fn every_grouped_write_of_a_taken_over_epoch_is_refused() {
        let db = TestDb::new().await;
        let old = db.store().await;
        let ops = accepted_detaches(&old, 2).await;
        let _new = db.take_over().await;
        fn fenced<T>(r: &Result<T, StoreError>) -> bool {
            matches!(r, Err(StoreError::Fenced(_)))
        }
        assert!(old.accept_all(detaches(3)).await.iter().all(fenced::<_>));
        let ids: Vec<CommandId> = ops.iter().map(|o| o.id().clone()).collect();
        assert!(
            old.mark_executing_all(ids.clone())
                .await
                .iter()
                .all(fenced::<_>)
        );
        let jobs = ids
            .iter()
            .map(|id| (id.clone(), None, JobId("j".into())))
            .collect();
        assert!(old.record_jobs(jobs).await.iter().all(fenced::<_>));
        let endings = (ops.iter())
            .map(|op| {
                let e = EventError::new(ErrorCode::Internal, "late");
                Ending::of(op, &crate::operation::outcome::failed(op, e, None, now()))
            })
            .collect();
        assert!(old.finish_all(endings).await.iter().all(fenced::<_>));
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM volume_operations").await,
            2
        );
        assert_eq!(
            count(&db.pool, "SELECT COUNT(*) FROM volume_operations WHERE status = 'pending' AND cloudstack_job_id IS NULL").await,
            2
        );
        assert_eq!(count(&db.pool, "SELECT COUNT(*) FROM outbox").await, 0);
    }
}
