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
        .connect_lazy(url)
        .map_err(|source| DbError::Connect {
            url: publisher::redact_url(url),
            source,
        })
}
