//! The database: created when missing, migrated at start (migrations are embedded from the
//! workspace's `migrations/`).

use std::time::Duration;

use sqlx::MySql;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

/// The embedded migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

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
}

/// Session settings of the main pool's connections. `wait_timeout`: the server drops a
/// session after 5 s of silence. A daemon that vanished without closing its connections (a
/// silent partition, a frozen VM) would otherwise keep its sessions, their open transactions
/// and their row locks (on the lease row, on operation rows) for the server's default of
/// 8 hours, and the new active would wait behind them. A statement waits at most 10 s for a
/// row lock, then fails and is retried.
const MAIN_SESSION: &str = "SET SESSION wait_timeout = 5, innodb_lock_wait_timeout = 10";
/// The lease pool's: a lease query never waits long behind a lock (it tries again a second
/// later).
const LEASE_SESSION: &str = "SET SESSION wait_timeout = 5, innodb_lock_wait_timeout = 1";
/// Our pools close idle connections before the server does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

async fn bound_session(
    conn: &mut sqlx::MySqlConnection,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, sql).await.map(|_| ())
}

/// Connects to `url`, creating the database if it does not exist, and applies migrations.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<MySqlPool, DbError> {
    let shown = publisher::redact_url(url);
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
    let pool = MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(IDLE_TIMEOUT)
        .after_connect(|conn, _| Box::pin(bound_session(conn, MAIN_SESSION)))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect {
            url: shown.clone(),
            source,
        })?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| DbError::Migrate { url: shown, source })?;
    Ok(pool)
}

/// The execution lease's own pool: two connections, quick to give up, connected lazily (a
/// standby outlives database outages).
pub fn lease_pool(url: &str) -> Result<MySqlPool, DbError> {
    MySqlPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .idle_timeout(IDLE_TIMEOUT)
        .after_connect(|conn, _| Box::pin(bound_session(conn, LEASE_SESSION)))
        .connect_lazy(url)
        .map_err(|source| DbError::Connect {
            url: publisher::redact_url(url),
            source,
        })
}
