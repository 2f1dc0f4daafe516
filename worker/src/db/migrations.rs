//! The schema's version and its migration (docs/upgrading.md). A fresh database is migrated at
//! start (nobody can be active on it yet); any other only by the instance that holds the
//! execution lease, so a standby of a newer build never changes the schema under a running
//! active of an older one. An older binary runs on a newer schema: migrations are additive
//! within a major version, and it ignores the ones it does not know (saying so).

use sqlx::MySqlPool;
use sqlx::migrate::Migrator;

use super::MIGRATOR;

/// The schema version this binary was built for: its highest migration.
pub(crate) fn binary_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// What a database holds, next to this binary's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaState {
    /// The highest migration applied; `None` for a database without migrations.
    pub database: Option<i64>,
    /// Migrations of this binary the database has not applied yet (it is older).
    pub pending: usize,
    /// Applied migrations this binary does not know (a newer binary applied them).
    pub unknown: Vec<i64>,
}

impl SchemaState {
    /// Logs where the database stands against this binary, when they differ.
    pub(crate) fn report(&self) {
        let binary = binary_version();
        let database = self.database.unwrap_or(0);
        if !self.unknown.is_empty() {
            tracing::warn!(
                database,
                binary,
                unknown = ?self.unknown,
                "the database's schema is newer than this binary's: running on it (migrations are additive within a major version: docs/upgrading.md); upgrade this instance"
            );
        } else if self.pending > 0 {
            tracing::info!(
                database,
                binary,
                pending = self.pending,
                "the database's schema is older than this binary's: it is migrated once this instance holds the execution lease"
            );
        }
    }
}

/// Where `pool`'s database stands. A database without `_sqlx_migrations` has applied none.
pub(crate) async fn state(pool: &MySqlPool) -> Result<SchemaState, sqlx::Error> {
    let has_table: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await?;
    let applied: Vec<i64> = if has_table == 0 {
        Vec::new()
    } else {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = 1")
            .fetch_all(pool)
            .await?
    };
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    Ok(SchemaState {
        database: applied.iter().copied().max(),
        pending: known.iter().filter(|v| !applied.contains(v)).count(),
        unknown: applied.into_iter().filter(|v| !known.contains(v)).collect(),
    })
}

/// The highest migration applied (`/ready`), `None` when it cannot be read.
pub(crate) async fn database_version(pool: &MySqlPool) -> Option<i64> {
    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
        .fetch_one(pool)
        .await
        .ok()
        .flatten()
}

/// Applies this binary's pending migrations, ignoring applied ones it does not know.
pub(crate) async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    let migrator = Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ignore_missing: true,
        locking: MIGRATOR.locking,
        no_tx: MIGRATOR.no_tx,
        table_name: MIGRATOR.table_name.clone(),
        create_schemas: MIGRATOR.create_schemas.clone(),
    };
    migrator.run(pool).await
}

/// Records in the lease row, while `epoch` still holds it, the schema version this instance
/// migrated to and its own version.
pub(crate) async fn record_in_lease(
    pool: &MySqlPool,
    name: &str,
    epoch: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE execution_lease SET schema_version = ?, holder_version = ? \
         WHERE name = ? AND epoch = ?",
    )
    .bind(binary_version())
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(name)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(())
}
