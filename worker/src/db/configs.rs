//! The active row of `ossea_configs`: CloudStack settings kept in the database, read again for
//! every operation (so rotated keys apply without a restart).

use schema::SecretString;
use sqlx::MySqlPool;

/// One `ossea_configs` row as stored (its user validates the values).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ConfigRow {
    pub name: String,
    pub api_url: String,
    pub api_key: String,
    #[sqlx(try_from = "String")]
    pub secret_key: SecretString,
    pub zone: Option<String>,
    pub oma_vm_id: Option<String>,
}

/// The active row (the most recently updated one if several are marked active).
pub(crate) async fn active(pool: &MySqlPool) -> Result<Option<ConfigRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, api_url, api_key, secret_key, zone, oma_vm_id FROM ossea_configs \
         WHERE is_active = TRUE ORDER BY updated_at DESC, id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}

impl crate::db::store::Store {
    /// The active `ossea_configs` row, if any: of the platform's database when
    /// `OSSEA_CONFIGS_URL` names one, else of this one.
    pub(crate) async fn active_config(&self) -> Result<Option<ConfigRow>, sqlx::Error> {
        active(self.configs.as_ref().unwrap_or(&self.pool)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    /// The newest active row wins; inactive rows are never read; the secret stays out of
    /// `Debug`.
    #[tokio::test]
    async fn the_newest_active_row_is_read_and_its_secret_is_not_printed() {
        let db = TestDb::new().await;
        assert!(
            active(&db.pool).await.expect("read").is_none(),
            "no row yet"
        );
        for (name, active_, at) in [
            ("old", true, "2026-01-01 00:00:00"),
            ("new", true, "2026-06-01 00:00:00"),
            ("off", false, "2026-12-01 00:00:00"),
        ] {
            sqlx::query(
                "INSERT INTO ossea_configs (name, api_url, api_key, secret_key, is_active, updated_at) \
                 VALUES (?, 'http://cs/client/api', 'key', 'hush-hush', ?, ?)",
            )
            .bind(name)
            .bind(active_)
            .bind(at)
            .execute(&db.pool)
            .await
            .expect("insert");
        }
        let row = active(&db.pool).await.expect("read").expect("a row");
        assert_eq!(row.name, "new");
        assert!(!format!("{row:?}").contains("hush-hush"));
    }
}
