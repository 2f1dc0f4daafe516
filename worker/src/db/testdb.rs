//! A database of its own for one unit test, on the local MySQL/MariaDB server (the one
//! `scripts/test` starts), migrated like the daemon's and dropped when the test ends, even when
//! it panics. A test that needs it fails loudly when the server is missing.

use sqlx::mysql::MySqlPool;
use sqlx::{Connection, MySqlConnection};

/// The server the tests use (`TEST_MYSQL_SERVER` overrides it).
fn server() -> String {
    std::env::var("TEST_MYSQL_SERVER").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A failed event of `command_id` (a rejected message): what outbox and relay tests store.
pub(crate) fn rejected_event(command_id: &str) -> schema::CloudEvent {
    let data = schema::EventData::rejected(
        schema::CommandId::parse(command_id).expect("a command id"),
        schema::OperationType::Create.into(),
        None,
        schema::EventError::new(schema::ErrorCode::InvalidCommand, "x"),
        chrono::Utc::now(),
    );
    schema::CloudEvent::new(schema::EventId::new_random(), chrono::Utc::now(), data)
}

/// A migrated database named `vd_unit_<random>`.
pub(crate) struct TestDb {
    pub pool: MySqlPool,
    pub url: String,
    name: String,
}

impl TestDb {
    pub(crate) async fn new() -> Self {
        let name = format!(
            "vd_unit_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let url = format!("{}/{name}", server());
        let pool = crate::db::connect_and_migrate(&url.as_str().into(), 4)
            .await
            .unwrap_or_else(|e| {
                panic!("unit tests of the persistence layer need MySQL/MariaDB (scripts/test starts it): {e}")
            });
        Self { pool, url, name }
    }

    /// A user of this database only, with a password; its URL. Dropped with the database.
    pub(crate) async fn user_with_password(&self, tag: &str) -> String {
        let user = format!("{}_{tag}", self.name);
        let password = format!("pw-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        for sql in [
            format!("CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'"),
            format!(
                "GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'127.0.0.1'",
                self.name
            ),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .expect("create the test user");
        }
        format!("mysql://{user}:{password}@127.0.0.1:3306/{}", self.name)
    }

    /// The execution lease of this database (prefix `unit`), held by this test.
    pub(crate) async fn lease(&self) -> crate::lease::Lease {
        let stop = tokio_util::sync::CancellationToken::new();
        crate::lease::Lease::acquire(&self.pool, "unit", "unit-test", &stop)
            .await
            .expect("the lease of a fresh database")
    }

    /// Another instance takes the lease over (expired first): every store of an earlier
    /// holding is fenced from now on. The new holding is returned (keep it).
    pub(crate) async fn take_over(&self) -> crate::lease::Lease {
        crate::db::lease::expire(&self.pool, &crate::lease::lease_name("unit"))
            .await
            .expect("expire");
        let stop = tokio_util::sync::CancellationToken::new();
        crate::lease::Lease::acquire(&self.pool, "unit", "the-new-holder", &stop)
            .await
            .expect("taken over")
    }

    /// A store fenced by a lease this test holds (prefix `unit`).
    pub(crate) async fn store(&self) -> crate::db::store::Store {
        let lease = self.lease().await;
        crate::db::store::Store::new(
            self.pool.clone(),
            schema::Topology::new("unit"),
            lease.fence(),
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async: drop the database from a thread with its own runtime.
        let (server, name) = (server(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = MySqlConnection::connect(&server).await.ok()?;
                // The test's own pool may still hold a transaction (its runtime is blocked in
                // this drop): end those sessions, or DROP waits for their metadata locks.
                let sessions: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()",
                )
                .bind(&name)
                .fetch_all(&mut conn)
                .await
                .ok()?;
                for id in sessions {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}")))
                        .execute(&mut conn)
                        .await;
                }
                let users: Vec<String> = sqlx::query_scalar(
                    "SELECT CAST(user AS CHAR) FROM mysql.user WHERE user LIKE CONCAT(?, '\\_%')",
                )
                .bind(&name)
                .fetch_all(&mut conn)
                .await
                .unwrap_or_default();
                for user in users {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP USER IF EXISTS '{user}'@'127.0.0.1'"
                    )))
                    .execute(&mut conn)
                    .await;
                }
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS `{name}`"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// The mapping of `volume` attached to `vm`, a remote VM, in slot 1.
pub(crate) fn remote_mapping(
    volume: schema::VolumeId,
    vm: schema::VmId,
) -> crate::mappings::DeviceMapping {
    use crate::mappings::{CloudStackState, LinuxState};
    crate::mappings::DeviceMapping {
        volume_id: volume,
        vm_id: vm,
        mode: schema::event::AttachMode::Remote,
        device_path: None,
        by_id_path: None,
        serial: None,
        cloudstack_device_id: Some(1),
        cloudstack_state: CloudStackState::Attached,
        linux_state: LinuxState::Remote,
        size: None,
        last_sync: crate::db::store::now(),
        host: None,
    }
}
