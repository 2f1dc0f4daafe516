//! The persistence layer: the only module that runs SQL. The database is created when missing;
//! a fresh one is migrated at start, any other by the instance that holds the lease
//! ([`migrations`]; migrations are embedded from the workspace's `migrations/`).
//!
//! - [`store`]: `volume_operations` (accept, progress, finish with the outbox row), fenced.
//! - [`group`], [`grouped`]: group commit of the operations' writes (accept, executing, job,
//!   end) that arrive together.
//! - [`cancel`]: a pending operation ended `cancelled` by a `cancel`.
//! - [`retention`]: the sweep of ended operations and published outbox rows.
//! - [`snapshots`]: the volume snapshots the daemon took.
//! - [`legacy`]: the old Go daemon's tables, read for `import-legacy`, and what it writes.
//! - [`outbox`]: events waiting to be published.
//! - [`mappings`]: `device_mappings` changes.
//! - [`lease`]: the `execution_lease` row's SQL.
//! - [`fence`]: the fencing check every state write carries.
//! - [`configs`]: the active `ossea_configs` row.
//! - [`devices`]: the mapping sync's updates of host mappings.
//! - [`exports`]: `nbd_exports` and the persistent names of host mappings.
//! - [`read`]: the read API's queries.
//! - [`migrations`]: the schema's version and its migration (rolling upgrades).

// Defined before the modules, so each of them can use it.
/// The fence as part of one statement: `AND` this makes an UPDATE change nothing unless the
/// lease still has this instance's epoch (bind the lease name, then the epoch). Its subquery
/// is a locking read, so a takeover (an exclusive update of the lease row) waits until the
/// statement has committed, as it waits for a fenced transaction: one autocommit statement
/// instead of BEGIN, the write, the fence check and COMMIT.
macro_rules! fenced {
    () => {
        "(SELECT epoch FROM execution_lease WHERE name = ? LOCK IN SHARE MODE) = ?"
    };
}

/// The columns `store::operation_from_row` reads (a macro, so queries stay `&'static str`).
macro_rules! operation_columns {
    () => {
        "id, CAST(request AS CHAR) AS request, correlation_id, reply_to, cloudstack_job_id, \
         volume_id, created_at, attempts, traceparent, tracestate"
    };
}

/// The rows of operations that have not ended (`OperationStatus::Pending`, `Executing`): the
/// only ones a daemon may still change. Every status the daemon writes is bound from
/// [`OperationStatus`]; this is the one place its values appear in SQL.
macro_rules! unended {
    () => {
        "status IN ('pending', 'executing')"
    };
}

/// How many rows a statement over `n` rows names: the next power of two, but never 1,000 or
/// more for fewer rows ([`LONGEST_LIST`]). A statement's text depends on how many rows it names,
/// and the server and each connection prepare every text once: a few sizes serve every group
/// and batch instead of one text per size (a prepare, an eviction from the connection's cache
/// of 100 and a close each).
pub(in crate::db) fn bucket(n: usize) -> usize {
    let power = n.max(1).next_power_of_two();
    if n <= LONGEST_LIST && power > LONGEST_LIST {
        LONGEST_LIST
    } else {
        power
    }
}

/// The longest `IN` list a statement names when it can: MariaDB turns a list of 1,000 values
/// or more into a derived table (`in_predicate_conversion_threshold`), which made the relay's
/// read of 500 rows `NOT IN` 1,024 ids take 2.7 × as long as with 999 (measured on 10.11).
pub(in crate::db) const LONGEST_LIST: usize = 999;

/// `items` and then its last item again up to [`bucket`] in all (nothing when empty): for
/// where naming a row twice changes nothing, `IN` lists and `CASE` arms.
pub(in crate::db) fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let extra = bucket(items.len()) - items.len();
    let last = items
        .last()
        .into_iter()
        .flat_map(move |l| std::iter::repeat_n(l, extra));
    items.iter().chain(last)
}

pub(crate) mod appliance;
pub(crate) mod cancel;
pub(crate) mod configs;
pub(crate) mod devices;
pub(crate) mod exports;
pub(crate) mod fence;
pub(crate) mod group;
pub(crate) mod grouped;
pub(crate) mod lease;
pub(crate) mod legacy;
pub(crate) mod mappings;
pub(crate) mod migrations;
pub(crate) mod outbox;
pub(crate) mod read;
pub(crate) mod retention;
pub(crate) mod snapshots;
pub(crate) mod store;
#[cfg(test)]
pub(crate) mod testdb;

use std::time::Duration;

use schema::SecretUrl;
use schema::event::AttachMode;
use sqlx::MySql;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

/// The embedded migrations.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot reach the database at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create the database at {url}: {source}")]
    Create {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the database at {url} failed: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "the database at {url} is not volume-daemon's: it holds {} other table(s) ({}) and no record of this daemon's migrations; nothing was written to it. Give the daemon a database of its own (DATABASE_URL naming a new or empty database on the same server is fine), then bring an old daemon's installation over with `volume-daemon import-legacy --from <this URL>` (docs/configuration.md, section \"Taking over the old daemon's installation\")",
        tables.len(),
        tables.join(", ")
    )]
    Foreign { url: String, tables: Vec<String> },
}

impl DbError {
    /// Whether restarting cannot help: the database is another program's.
    pub fn is_foreign(&self) -> bool {
        matches!(self, Self::Foreign { .. })
    }
}

/// The daemon's first migration: a database whose `_sqlx_migrations` records it is the
/// daemon's, whatever later migrations (of a newer daemon) it holds.
const FIRST_MIGRATION: i64 = 20261122000001;

/// `Ok` when the database is the daemon's to migrate: it has no tables, or its
/// `_sqlx_migrations` records the daemon's first migration. Otherwise (the old Go daemon's
/// `migratekit_oma`, another program's database) the tables it holds, sorted. Reads only.
async fn check_ours(pool: &MySqlPool) -> Result<(), Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = DATABASE() ORDER BY table_name",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| vec![format!("(cannot list the tables: {e})")])?;
    if tables.is_empty() {
        return Ok(());
    }
    if tables.iter().any(|t| t == "_sqlx_migrations") {
        let first: Option<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE version = ?")
                .bind(FIRST_MIGRATION)
                .fetch_optional(pool)
                .await
                .ok()
                .flatten();
        if first.is_some() {
            return Ok(());
        }
    }
    Err(tables)
}

/// Session settings of the main pool's connections. `wait_timeout`: the server drops a
/// session after 5 s of silence. A daemon that vanished without closing its connections (a
/// silent partition, a frozen VM) would otherwise keep its sessions, their open transactions
/// and their row locks (on the lease row, on operation rows) for the server's default of
/// 8 hours, and the new active would wait behind them. A statement waits at most 10 s for a
/// row lock, and as long for a metadata lock (a migration or an `ALTER` by hand; the server's
/// default is a year), then fails and is retried.
const MAIN_SESSION: &str =
    "SET SESSION wait_timeout = 5, innodb_lock_wait_timeout = 10, lock_wait_timeout = 10";
/// The lease pool's: a lease query never waits long behind a lock (it tries again a second
/// later).
const LEASE_SESSION: &str =
    "SET SESSION wait_timeout = 5, innodb_lock_wait_timeout = 1, lock_wait_timeout = 2";
/// Our pools close idle connections before the server does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection idle this long is closed instead of being handed out. The pool's reaper runs
/// only every [`IDLE_TIMEOUT`] and the pool checks no idleness when it hands a connection out,
/// so without this a connection idle 5–6 s, which the server has dropped after `wait_timeout`,
/// would be handed out dead (MySQL 8 answers its next statement with error 4031). Costs no
/// round trip: the pool knows how long each connection sat idle.
const MAX_IDLE_HANDED_OUT: Duration = Duration::from_millis(2500);

/// The pools' `before_acquire`: only connections idle less than [`MAX_IDLE_HANDED_OUT`].
fn fresh_enough(
    _: &mut sqlx::MySqlConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move { Ok(meta.idle_for < MAX_IDLE_HANDED_OUT) })
}

async fn bound_session(
    conn: &mut sqlx::MySqlConnection,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, sql).await.map(|_| ())
}

/// `operation_mode`: how the daemon names an [`AttachMode`] in SQL (the one place).
pub(crate) const fn mode_column(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Host => "oma",
        AttachMode::Remote => "failover",
    }
}

/// `operation_mode` of host mappings.
pub(crate) const HOST_MODE: &str = mode_column(AttachMode::Host);

/// Whether a database error will come back however often the write is tried: the server
/// refused the statement itself. Lost connections, killed sessions, lock waits, deadlocks and
/// connection limits are transient.
pub(crate) fn is_permanent(e: &sqlx::Error) -> bool {
    /// MySQL/MariaDB error numbers worth retrying: lock wait timeout, deadlock, too many
    /// connections, shutdown in progress, query interrupted, server gone, lost connection,
    /// connection killed, and MySQL 8's "disconnected by the server because of inactivity"
    /// (4031, sent on the next statement of a session past `wait_timeout`).
    const TRANSIENT: [u16; 9] = [1205, 1213, 1040, 1053, 1317, 2006, 2013, 1927, 4031];
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|m| !TRANSIENT.contains(&m.number())),
        sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_) => true,
        _ => false,
    }
}

/// Connects to `url`, creating the database if it does not exist, and applies every pending
/// migration (`import-legacy` and tests: no daemon runs on that database).
pub(crate) async fn connect_and_migrate(
    url: &SecretUrl,
    max_connections: u32,
) -> Result<MySqlPool, DbError> {
    let (pool, _) = connect(url, max_connections).await?;
    migrations::migrate(&pool)
        .await
        .map_err(|source| DbError::Migrate {
            url: url.redacted().to_owned(),
            source,
        })?;
    Ok(pool)
}

/// Connects to `url`, creating the database if it does not exist; migrates it only when it is
/// fresh (no migration applied: nobody can be active on it). Any other is migrated by the
/// instance that holds the lease ([`migrations::migrate`]). Refuses another program's database.
pub(crate) async fn connect(
    url: &SecretUrl,
    max_connections: u32,
) -> Result<(MySqlPool, migrations::SchemaState), DbError> {
    let shown = url.redacted().to_owned();
    let pool = open(url, max_connections).await?;
    // Before anything is written: sqlx would create `_sqlx_migrations` and fail half-way on a
    // table of the same name, leaving a database that refuses every later start.
    if let Err(tables) = check_ours(&pool).await {
        pool.close().await;
        return Err(DbError::Foreign { url: shown, tables });
    }
    let read_state = || async {
        migrations::state(&pool)
            .await
            .map_err(|source| DbError::Connect {
                url: shown.clone(),
                source,
            })
    };
    let mut state = read_state().await?;
    if state.database.is_none() {
        // Two instances starting on a fresh database at once: sqlx's migration lock makes
        // one wait for the other, which then finds nothing to do.
        migrations::migrate(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                url: shown.clone(),
                source,
            })?;
        state = read_state().await?;
    }
    Ok((pool, state))
}

/// The main pool on `url`, the database created first when missing.
async fn open(url: &SecretUrl, max_connections: u32) -> Result<MySqlPool, DbError> {
    let shown = url.redacted().to_owned();
    let url = url.expose();
    let exists = MySql::database_exists(url)
        .await
        .map_err(|source| DbError::Connect {
            url: shown.clone(),
            source,
        })?;
    if !exists {
        tracing::info!(url = %shown, "creating the database");
        if let Err(source) = MySql::create_database(url).await {
            // Another instance may have created it meanwhile.
            if !MySql::database_exists(url).await.unwrap_or(false) {
                return Err(DbError::Create { url: shown, source });
            }
        }
    }
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        // No ping before each use (a round trip per statement or transaction): a connection
        // the server dropped fails its statement with a transient error, which every caller
        // retries, and the pool discards it.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(IDLE_TIMEOUT)
        .before_acquire(fresh_enough)
        .after_connect(|conn, _| Box::pin(bound_session(conn, MAIN_SESSION)))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect { url: shown, source })
}

/// The execution lease's own pool: two connections, quick to give up, connected lazily (a
/// standby outlives database outages).
pub(crate) fn lease_pool(url: &SecretUrl) -> Result<MySqlPool, DbError> {
    side_pool(url, 2, LEASE_SESSION)
}

/// The HTTP server's own pool (the read API, `/ready`, `/metrics`): a flood of read requests
/// waits for these few connections and never for the operations' or the lease's.
pub(crate) fn http_pool(url: &SecretUrl) -> Result<MySqlPool, DbError> {
    side_pool(url, 4, MAIN_SESSION)
}

/// The platform's database of `OSSEA_CONFIGS_URL`: read only, two connections, lazily.
pub(crate) fn configs_pool(url: &SecretUrl) -> Result<MySqlPool, DbError> {
    side_pool(url, 2, MAIN_SESSION)
}

/// A small pool beside the main one, connected lazily, with the main pool's idle rules.
fn side_pool(url: &SecretUrl, max: u32, session: &'static str) -> Result<MySqlPool, DbError> {
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(2))
        .idle_timeout(IDLE_TIMEOUT)
        .before_acquire(fresh_enough)
        .after_connect(move |conn, _| Box::pin(bound_session(conn, session)))
        .connect_lazy(url.expose())
        .map_err(|source| DbError::Connect {
            url: url.redacted().to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    #[test]
    fn statements_name_a_power_of_two_of_rows_the_last_repeated() {
        assert_eq!(bucket(0), 1);
        assert_eq!(bucket(5), 8);
        assert_eq!(bucket(32), 32);
        assert_eq!(
            bucket(960),
            LONGEST_LIST,
            "under MariaDB's IN-list conversion"
        );
        assert_eq!(bucket(LONGEST_LIST), LONGEST_LIST);
        assert_eq!(bucket(1000), 1024);
        let five: Vec<u32> = padded(&[1, 2, 3, 4, 5]).copied().collect();
        assert_eq!(five, vec![1, 2, 3, 4, 5, 5, 5, 5]);
        assert_eq!(padded(&[7]).count(), 1);
        assert_eq!(padded::<u32>(&[]).count(), 0);
    }

    /// A connection that sat idle longer than [`MAX_IDLE_HANDED_OUT`] is never handed out (the
    /// server may have dropped it: MySQL 8 answers with error 4031): the next acquire gets a
    /// new session, before the pool's reaper would have closed the old one.
    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_handed_out_again() {
        let db = TestDb::new().await;
        let url: SecretUrl = db.url.as_str().into();
        let pool = connect_and_migrate(&url, 1).await.expect("pool");
        let session = || async {
            sqlx::query_scalar::<_, u64>("SELECT CONNECTION_ID()")
                .fetch_one(&pool)
                .await
                .expect("connection id")
        };
        let first = session().await;
        assert_eq!(session().await, first, "a fresh idle connection is reused");
        tokio::time::sleep(MAX_IDLE_HANDED_OUT + Duration::from_millis(200)).await;
        assert!(MAX_IDLE_HANDED_OUT + Duration::from_millis(200) < IDLE_TIMEOUT);
        assert_ne!(session().await, first, "idle too long: a new session");
    }

    /// A user with a password (not the tests' passwordless root) connects again after its pool
    /// was dropped and rebuilt. (MariaDB has no `caching_sha2_password`: with MySQL 8, the
    /// full authentication after a server restart is what the `mysql-rsa` feature makes work;
    /// it cannot be exercised here.)
    #[tokio::test]
    async fn a_password_user_reconnects_after_its_pool_is_rebuilt() {
        let db = TestDb::new().await;
        let url = db.user_with_password("pw").await;
        assert!(url.contains(":pw-"), "the URL carries a password");
        for round in 0..2 {
            let pool = connect_and_migrate(&url.as_str().into(), 2)
                .await
                .expect("connect with the password");
            let one: i64 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&pool)
                .await
                .expect("query");
            assert_eq!(one, 1, "round {round}");
            pool.close().await;
        }
    }

    /// TLS is used when asked for, never skipped: with `ssl-mode=REQUIRED` against a server
    /// without TLS, connecting fails instead of falling back to plaintext.
    #[tokio::test]
    async fn required_tls_to_a_server_without_it_is_an_error_not_plaintext() {
        let db = TestDb::new().await;
        let url = format!("{}?ssl-mode=REQUIRED", db.url);
        let err = connect_and_migrate(&url.as_str().into(), 1)
            .await
            .expect_err("the local server has TLS disabled");
        let text = err.to_string();
        assert!(text.contains("cannot reach the database"), "{text}");
        assert!(!text.contains("pw-"), "no secret in the error: {text}");
    }

    /// A statement the server refuses is permanent; a killed session or a lock wait is not.
    #[tokio::test]
    async fn the_servers_refusals_are_permanent_and_lost_sessions_are_not() {
        let db = TestDb::new().await;
        let refused = sqlx::query("INSERT INTO no_such_table VALUES (1)")
            .execute(&db.pool)
            .await
            .expect_err("no such table");
        assert!(is_permanent(&refused), "{refused}");

        let mut victim = db.pool.acquire().await.expect("connection");
        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut *victim)
            .await
            .expect("id");
        sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
            .execute(&db.pool)
            .await
            .expect("kill");
        let killed = sqlx::query("SELECT 1")
            .execute(&mut *victim)
            .await
            .expect_err("the session was killed");
        assert!(!is_permanent(&killed), "{killed}");
    }
}
