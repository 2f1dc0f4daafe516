//! Taking over an old Go daemon's installation (docs/migrating.md): a database that is not the
//! daemon's is refused before anything is written to it, with exit status 78 (the unit's
//! `RestartPreventExitStatus=`) and a message naming its tables and the way forward; the old
//! daemon's variables are not silently ignored.

use std::process::Stdio;

use sqlx::mysql::MySqlPoolOptions;
use tokio::process::Command;

use crate::helpers::{MYSQL_SERVER, TestEnv};

/// A database of the test's own loaded with `fixture` (tests/e2e/fixtures), dropped on drop.
pub(crate) struct LegacyDb {
    pub name: String,
}

impl LegacyDb {
    pub(crate) async fn load(tag: &str, fixture: &str) -> Self {
        let name = format!("vd_legacy_{tag}");
        let admin = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(MYSQL_SERVER)
            .await
            .expect("MariaDB at 127.0.0.1:3306");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the legacy database");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/e2e/fixtures")
            .join(fixture);
        let sql = std::fs::read_to_string(&path).expect("fixture");
        let db = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{MYSQL_SERVER}/{name}"))
            .await
            .expect("the legacy database");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&db)
            .await
            .expect("the fixture loads");
        db.close().await;
        Self { name }
    }

    pub(crate) fn url(&self) -> String {
        format!("{MYSQL_SERVER}/{}", self.name)
    }

    /// `mysqldump` of the whole database, without its date line: equal dumps, equal data.
    pub(crate) async fn dump(&self) -> String {
        let out = Command::new("mysqldump")
            .args([
                "-uroot",
                "-h127.0.0.1",
                "--skip-dump-date",
                "--routines",
                "--triggers",
            ])
            .arg(&self.name)
            .output()
            .await
            .expect("mysqldump runs (the mariadb-client package)");
        assert!(out.status.success(), "mysqldump: {out:?}");
        String::from_utf8(out.stdout).expect("UTF-8 dump")
    }
}

impl Drop for LegacyDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("mysql")
            .args(["-uroot", "-h127.0.0.1", "-e"])
            .arg(format!("DROP DATABASE IF EXISTS {}", self.name))
            .status();
    }
}

/// Runs the daemon with `env`'s settings and `extra` on top; its exit code and stderr.
async fn run_daemon(env: &TestEnv, extra: &[(&str, String)]) -> (i32, String) {
    let (code, _, stderr) = run_task(env, extra, &[]).await;
    (code, stderr)
}

/// `volume-daemon <args>` with `env`'s settings and `extra` on top: exit code, stdout, stderr.
async fn run_task(env: &TestEnv, extra: &[(&str, String)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.daemon_env())
        .envs(extra.iter().map(|(k, v)| (*k, v.clone())))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("volume-daemon runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Acceptance 1: pointed at the old daemon's database (both table forms), the daemon refuses
/// twice in a row with exit status 78, names the tables and the way forward, and leaves the
/// database byte-identical (no `_sqlx_migrations`, no table, no row).
#[tokio::test]
async fn the_old_daemons_database_is_refused_and_left_byte_identical() {
    let env = TestEnv::new().await;
    for (fixture, tables) in [
        (
            "legacy-production.sql",
            &[
                "device_mappings",
                "nbd_exports",
                "ossea_configs",
                "schema_migrations",
                "volume_operations",
            ][..],
        ),
        (
            "legacy-documented.sql",
            &["device_mappings", "volume_operations"][..],
        ),
    ] {
        let tag = format!("{}{}", &env.db_name[8..], fixture.len());
        let legacy = LegacyDb::load(&tag, fixture).await;
        let before = legacy.dump().await;
        for attempt in 1..=2 {
            let (code, stderr) = run_daemon(&env, &[("DATABASE_URL", legacy.url())]).await;
            assert_eq!(code, 78, "{fixture}, start {attempt}: {stderr}");
            for table in tables {
                assert!(stderr.contains(table), "{fixture}: names {table}: {stderr}");
            }
            assert!(stderr.contains("a database of its own"), "{stderr}");
            assert!(stderr.contains("nothing was written"), "{stderr}");
            assert!(!stderr.contains("_sqlx_migrations ("), "{stderr}");
            assert_eq!(
                legacy.dump().await,
                before,
                "{fixture}: byte-identical after start {attempt}"
            );
        }
    }
}

/// The old daemon's variables: `DATABASE_DSN` is refused (exit 78) naming `DATABASE_URL` and
/// the import, before anything else; `LOG_LEVEL` is honoured when `RUST_LOG` is unset, with a
/// warning.
#[tokio::test]
async fn the_old_daemons_variables_are_refused_or_honoured_never_ignored() {
    let env = TestEnv::new().await;
    let dsn = (
        "DATABASE_DSN",
        "root@tcp(127.0.0.1:3306)/migratekit_oma?parseTime=true".to_owned(),
    );
    let (code, stderr) = run_daemon(&env, &[dsn]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("database of this daemon's own"),
        "{stderr}"
    );

    // Without RUST_LOG (the harness sets one): the daemon's own output for a few seconds.
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.daemon_env())
        .env("LOG_LEVEL", "WARN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("volume-daemon runs");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    daemon.start_kill().expect("kill");
    let out = daemon.wait_with_output().await.expect("output");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        log.contains("LOG_LEVEL is the old daemon's variable"),
        "{log}"
    );
    assert!(log.contains("honoured"), "{log}");
    assert!(
        !log.contains("\"level\":\"INFO\""),
        "LOG_LEVEL=WARN filters out info lines: {log}"
    );
}

/// Acceptance 5: a database set up with a wrong `HOST_VM_ID` is corrected without SQL:
/// `volume-daemon set-host-vm <id>` is refused while a daemon holds the lease, then records the
/// new id and logs the change; the daemon starts with it and its self-check says `ok`.
#[tokio::test]
async fn a_wrong_host_vm_id_is_corrected_with_set_host_vm_and_the_self_check_agrees() {
    let mut env = TestEnv::with_host_vm(cloudstack_sim::SimConfig::default()).await;
    let right = env.host_vm.expect("host vm").to_string();
    let wrong = cloudstack_sim::DEMO_VMS[0].to_string();
    env.extra_env.push(("HOST_VM_ID".into(), wrong.clone()));
    env.extra_env
        .push(("SELF_CHECK_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;

    let fixed = [("HOST_VM_ID", right.clone())];
    let (code, _, stderr) = run_task(&env, &fixed, &["set-host-vm", &right]).await;
    assert_eq!(code, 1, "refused while the daemon runs: {stderr}");
    assert!(stderr.contains("holds the execution lease"), "{stderr}");
    env.stop_daemon().await;
    // The right id alone is refused: the database says it is another appliance's.
    let (code, stderr) = run_daemon(&env, &fixed).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("another appliance"), "{stderr}");

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let out = loop {
        let (code, out, stderr) = run_task(&env, &fixed, &["set-host-vm", &right]).await;
        if code == 0 {
            break out;
        }
        assert!(
            stderr.contains("holds the execution lease") && tokio::time::Instant::now() < deadline,
            "{stderr}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let line = out
        .lines()
        .find(|l| l.contains("host VM was changed"))
        .unwrap_or_else(|| panic!("the change is logged: {out}"));
    assert!(line.contains(&wrong) && line.contains(&right), "{line}");

    env.extra_env.retain(|(k, _)| k != "HOST_VM_ID");
    env.start_daemon().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, ready) = env.get_json("/ready").await;
        if ready["components"]["host_vm"] == "ok" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Acceptance 4: with `OSSEA_CONFIGS_URL` the CloudStack settings come from the platform's
/// `ossea_configs` (the table its GUI edits, here in the old daemon's database, never written):
/// a key rotated there applies to the next operation without a restart.
#[tokio::test]
async fn a_key_rotated_in_the_platforms_ossea_configs_applies_to_the_next_operation() {
    let mut env = TestEnv::new().await;
    let tag = format!("{}cfg", &env.db_name[8..]);
    let platform = LegacyDb::load(&tag, "legacy-production.sql").await;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&platform.url())
        .await
        .expect("the platform's database");
    let (key, secret) = env.sim.sim.keys();
    sqlx::query("UPDATE ossea_configs SET api_url = ?, api_key = ?, secret_key = ?, zone = ? WHERE name = 'production'")
        .bind(env.sim.api_url())
        .bind(&key)
        .bind(&secret)
        .bind(cloudstack_sim::ZONE_ID.to_string())
        .execute(&pool)
        .await
        .expect("point the platform's row at the simulator");
    env.cloudstack_from_db = true;
    env.extra_env
        .push(("OSSEA_CONFIGS_URL".into(), platform.url()));
    env.start_daemon().await;
    let create = |name: &str| crate::helpers::cmd::create(name, "1GiB");
    let first = env.execute(&create("before-rotation")).await;
    assert_eq!(
        first.event_type, "volume.create.completed",
        "{:?}",
        first.data.error
    );

    env.sim.sim.set_keys("rotated-key", "rotated-secret");
    let refused = env.execute(&create("old-keys")).await;
    assert_eq!(
        refused.data.error.map(|e| e.code),
        Some(schema::ErrorCode::CloudstackUnauthorized)
    );
    sqlx::query("UPDATE ossea_configs SET api_key = 'rotated-key', secret_key = 'rotated-secret' WHERE name = 'production'")
        .execute(&pool)
        .await
        .expect("the GUI rotates the key");
    let after = env.execute(&create("after-rotation")).await;
    assert_eq!(
        after.event_type, "volume.create.completed",
        "{:?}",
        after.data.error
    );
    // The daemon's own database has no ossea_configs row: the platform's was read.
    let own: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ossea_configs")
        .fetch_one(&env.db().await)
        .await
        .expect("count");
    assert_eq!(own, 0);
}

/// Text logs carry no ANSI colour codes when stdout is not a terminal (journald, a file).
#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let env = TestEnv::new().await;
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.daemon_env())
        .env("LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("volume-daemon runs");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    daemon.start_kill().expect("kill");
    let out = daemon.wait_with_output().await.expect("output");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("volume-daemon running"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}
