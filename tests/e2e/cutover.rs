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
    pub(crate) name: String,
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
            assert!(
                stderr.contains("a database of its own") && stderr.contains("import-legacy"),
                "{stderr}"
            );
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
        stderr.contains("DATABASE_URL") && stderr.contains("import-legacy"),
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

/// The fixture's ids (tests/e2e/fixtures/legacy-production.sql).
pub(crate) const OLD_HOST_VM: &str = "8f3a1c2e-0b4d-4e6f-9a8b-7c6d5e4f3a2b";
pub(crate) const OLD_HOST_VOLUME: &str = "3106013a-e175-423e-a090-1f2c6b7d8e9f";
pub(crate) const OLD_REMOTE_VM: &str = "9a1c2b3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d";
pub(crate) const OLD_REMOTE_VOLUME: &str = "a0b1c2d3-e4f5-4a6b-8c7d-8e9f0a1b2c3d";

/// An appliance as the old daemon left it, seen from the new daemon's side: the simulator's
/// host VM is the fixture's, both fixture volumes attached (the host one with its guest
/// device), nbdkit serving the export directory, the daemon's settings for both (not started).
pub(crate) async fn old_installation() -> (TestEnv, crate::exports::NbdServer, std::path::PathBuf) {
    use std::time::Duration;
    let host_vm = schema::VmId::parse(OLD_HOST_VM).expect("id");
    let mut env = TestEnv::with_sim(cloudstack_sim::SimConfig {
        host_vm_id: Some(host_vm),
        job_latency: Duration::from_millis(100),
        ..cloudstack_sim::SimConfig::default()
    })
    .await;
    // CloudStack as the old daemon left it: both volumes attached.
    let sim = env.sim.sim.clone();
    let remote_vm = schema::VmId::parse(OLD_REMOTE_VM).expect("id");
    sim.add_vm(remote_vm, "db01");
    for (volume, vm, size) in [
        (OLD_HOST_VOLUME, OLD_HOST_VM, 10u64 << 30),
        (OLD_REMOTE_VOLUME, OLD_REMOTE_VM, 20 << 30),
    ] {
        let id = schema::VolumeId::parse(volume).expect("id");
        sim.seed_volume_as(id, volume, size);
        crate::helpers::attach_outside(&sim, volume, vm);
    }
    let exports = env.sysfs.join("exports");
    std::fs::create_dir_all(&exports).expect("export dir");
    let nbd = crate::exports::NbdServer::start(&exports).await;
    env.extra_env
        .push(("NBD_EXPORT_DIR".into(), exports.display().to_string()));
    env.extra_env.push(("NBD_URL".into(), nbd.url.clone()));
    // The imported credentials name the old cloud's zone; this cloud is the simulator.
    env.extra_env.push((
        "CLOUDSTACK_ZONE_ID".into(),
        cloudstack_sim::ZONE_ID.to_string(),
    ));

    // Until the host VM's guest device of the imported volume exists.
    let volume = schema::VolumeId::parse(OLD_HOST_VOLUME).expect("id");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.device_name(volume).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no guest device");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (env, nbd, exports)
}

/// Acceptance 2 and 7: an old installation (production form) imported: a dry run changes
/// nothing, the import writes each row once (a second one writes nothing), the daemon then
/// serves the imported mapping and export (nbdkit lists the old export name), a detach of the
/// imported host volume removes its export, and after all that (and a create and delete) the
/// old database is byte-identical to its dump from before the import. An old database with an
/// unfinished operation is refused.
#[tokio::test]
async fn an_old_installation_is_imported_served_as_before_and_never_written() {
    use std::time::Duration;
    let host_vm = schema::VmId::parse(OLD_HOST_VM).expect("id");
    let (mut env, nbd, _exports) = old_installation().await;
    let tag = format!("{}imp", &env.db_name[8..]);
    let old = LegacyDb::load(&tag, "legacy-production.sql").await;
    let before = old.dump().await;
    let from = old.url();
    let (code, out, err) =
        run_task(&env, &[], &["import-legacy", "--from", &from, "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("production form; would import 2 mapping(s), 1 export(s), 3 operation(s)"),
        "{out}"
    );
    let ours_exists: Option<String> = sqlx::query_scalar(
        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(&env.db_name)
    .fetch_optional(
        &MySqlPoolOptions::new()
            .max_connections(1)
            .connect(MYSQL_SERVER)
            .await
            .expect("server"),
    )
    .await
    .expect("query");
    assert_eq!(
        ours_exists, None,
        "a dry run writes nothing, not even a database"
    );

    let (code, out, err) = run_task(&env, &[], &["import-legacy", "--from", &from]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("rows written: 2 mapping(s), 1 export(s), 3 operation(s), 1 credentials"),
        "{out}"
    );
    let (code, out, err) = run_task(&env, &[], &["import-legacy", "--from", &from]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("rows written: 0 mapping(s), 0 export(s), 0 operation(s), 0 credentials"),
        "a second import writes nothing: {out}"
    );

    env.start_daemon().await;
    let (code, shown, err) =
        crate::helpers::run_volumectl(&env, &["volume", OLD_HOST_VOLUME, "--json"]).await;
    assert_eq!(code, 0, "{shown}{err}");
    let view: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
    assert_eq!(view["mapping"]["vm_id"], OLD_HOST_VM, "{view}");
    assert_eq!(view["mapping"]["mode"], "oma", "{view}");
    assert_eq!(
        view["nbd_export"]["name"],
        format!("migration-vol-{OLD_HOST_VOLUME}"),
        "{view}"
    );
    let (_, remote, _) =
        crate::helpers::run_volumectl(&env, &["volume", OLD_REMOTE_VOLUME, "--json"]).await;
    let remote: serde_json::Value = serde_json::from_str(&remote).expect("JSON");
    assert_eq!(
        remote["mapping"]["device_path"],
        serde_json::Value::Null,
        "no made-up path: {remote}"
    );
    let export = format!("migration-vol-{OLD_HOST_VOLUME}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while nbd.list().await != vec![export.clone()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nbdkit never served {export}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The old operations: history, and the ended create/attach/detach/delete ones operations of
    // this daemon whose duplicates are answered with their stored event, not executed.
    let (_, op) = env.get_json("/api/v1/operations/op-attach-1").await;
    assert_eq!(
        (op["imported"].clone(), op["status"].clone()),
        (serde_json::json!(true), serde_json::json!("completed")),
        "{op}"
    );
    let (status, _) = env.get_json("/api/v1/operations/op-cleanup-1").await;
    assert_eq!(status, 404, "a cleanup operation is history only");
    let attaches = env.sim.sim.call_count("attachVolume");
    let duplicate = crate::helpers::cmd::attach(
        schema::VolumeId::parse(OLD_HOST_VOLUME).expect("id"),
        host_vm,
    )
    .with_command_id(schema::CommandId::parse("op-attach-1").expect("id"));
    let answered = env.execute(&duplicate).await;
    assert_eq!(answered.data.command_id.as_str(), "op-attach-1");
    assert_eq!(answered.data.status, schema::OperationStatus::Completed);
    assert_eq!(
        env.execute(&duplicate).await.id,
        answered.id,
        "the same event each time"
    );
    assert_eq!(
        env.sim.sim.call_count("attachVolume"),
        attaches,
        "not executed again"
    );

    let volume = schema::VolumeId::parse(OLD_HOST_VOLUME).expect("id");
    let detached = env.execute(&crate::helpers::cmd::detach(volume)).await;
    assert_eq!(
        detached.event_type, "volume.detach.completed",
        "{:?}",
        detached.data.error
    );
    assert!(nbd.list().await.is_empty(), "the detach removed the export");
    // A full lifecycle on the new daemon: create, host attach, detach, delete.
    let created = env
        .execute(&crate::helpers::cmd::create("after-cutover", "1GiB"))
        .await;
    let new = created
        .data
        .volume_id
        .unwrap_or_else(|| panic!("{:?}", created.data.error));
    for command in [
        crate::helpers::cmd::attach(new, host_vm),
        crate::helpers::cmd::detach(new),
        crate::helpers::cmd::delete(new),
    ] {
        let event = env.execute(&command).await;
        assert_eq!(
            event.data.status,
            schema::OperationStatus::Completed,
            "{:?}",
            event.data.error
        );
    }
    assert_eq!(
        old.dump().await,
        before,
        "the old database was never written"
    );

    // An old database with an unfinished operation is refused, and left as it was.
    let pending = LegacyDb::load(&format!("{tag}p"), "legacy-documented.sql").await;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&pending.url())
        .await
        .expect("db");
    sqlx::query("INSERT INTO volume_operations (id, type, status, volume_id, request) VALUES ('op-running', 'attach', 'executing', ?, '{}')")
        .bind(OLD_HOST_VOLUME)
        .execute(&pool)
        .await
        .expect("a running operation");
    pool.close().await;
    let (code, _, err) = run_task(&env, &[], &["import-legacy", "--from", &pending.url()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("op-running") && err.contains("unfinished"),
        "{err}"
    );
}

/// The old documentation's table form is read too: its mapping (a host one: a `/dev/` path)
/// and its operation are imported, and a row that cannot be mapped gets a report line.
#[tokio::test]
async fn the_documented_table_form_is_imported_and_unmappable_rows_are_reported() {
    let env = TestEnv::new().await;
    let tag = format!("{}doc", &env.db_name[8..]);
    let old = LegacyDb::load(&tag, "legacy-documented.sql").await;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&old.url())
        .await
        .expect("db");
    sqlx::query("INSERT INTO device_mappings (id, volume_id, vm_id, device_path, cloudstack_state, linux_state) VALUES ('m2', 'not-a-uuid', 'x', '/dev/vdc', 'attached', 'detected')")
        .execute(&pool)
        .await
        .expect("a broken row");
    pool.close().await;
    let (code, out, err) = run_task(&env, &[], &["import-legacy", "--from", &old.url()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("documented form; imported 1 mapping(s), 0 export(s), 1 operation(s)"),
        "{out}"
    );
    assert!(
        out.contains("not imported: mapping of \"not-a-uuid\": not a volume id"),
        "{out}"
    );
    let own = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&env.database_url())
        .await
        .expect("the daemon's database");
    let (mode, path, name): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT CAST(operation_mode AS CHAR), device_path, persistent_device_name FROM device_mappings WHERE volume_id = ?",
    )
    .bind(OLD_HOST_VOLUME)
    .fetch_one(&own)
    .await
    .expect("the imported mapping");
    assert_eq!((mode.as_str(), path.as_deref()), ("oma", Some("/dev/vdb")));
    assert_eq!(
        name.as_deref(),
        Some("vol3106013a"),
        "a persistent name of the daemon's form"
    );
    let history: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM legacy_operations WHERE id = 'op-create-1'")
            .fetch_one(&own)
            .await
            .expect("history");
    assert_eq!(history, 1);
    own.close().await;
}

/// Acceptance 3: the old callers' flow, unchanged, against the compatibility listener
/// (`LEGACY_HTTP_ADDR`): create, poll the operation every 2 s until completed, attach to the host
/// VM, read `/volumes/{id}/device`, detach, delete; each step reaches CloudStack exactly once,
/// through the broker and the daemon. A failed operation's `error` is a string, as before; a
/// route with nothing behind it answers 501 naming what to use.
#[tokio::test]
async fn the_old_callers_flow_runs_unchanged_against_the_compatibility_listener() {
    use serde_json::{Value, json};
    use std::time::Duration;
    let mut env = TestEnv::with_host_vm(cloudstack_sim::SimConfig::default()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    env.extra_env
        .push(("LEGACY_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.start_daemon().await;
    let base = format!("http://127.0.0.1:{port}/api/v1");
    let http = crate::helpers::http();
    let host = env.host_vm.expect("host vm").to_string();

    // What an old caller does: send, then poll every 2 s until the operation ends.
    let step = |method: reqwest::Method, path: String, body: Option<Value>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut request = http.request(method, format!("{base}{path}"));
            if let Some(body) = body {
                request = request.json(&body);
            }
            let answer = request.send().await.expect("the listener answers");
            assert_eq!(answer.status().as_u16(), 201, "{path}");
            let op: Value = answer.json().await.expect("JSON");
            assert_eq!(op["status"], "pending", "{op}");
            let id = op["id"].as_str().expect("an operation id").to_owned();
            loop {
                let polled: Value = http
                    .get(format!("{base}/operations/{id}"))
                    .send()
                    .await
                    .expect("poll")
                    .json()
                    .await
                    .expect("JSON");
                if matches!(polled["status"].as_str(), Some("completed" | "failed")) {
                    return polled;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let created = step(
        reqwest::Method::POST,
        "/volumes".into(),
        Some(json!({"name": "old-caller", "size": 2147483648u64, "disk_offering_id": "", "zone_id": ""})),
    )
    .await;
    assert_eq!(created["status"], "completed", "{created}");
    let volume = created["volume_id"]
        .as_str()
        .expect("the new volume")
        .to_owned();
    let attached = step(
        reqwest::Method::POST,
        format!("/volumes/{volume}/attach"),
        Some(json!({"volume_id": volume, "vm_id": host})),
    )
    .await;
    assert_eq!(attached["status"], "completed", "{attached}");
    let device: Value = http
        .get(format!("{base}/volumes/{volume}/device"))
        .send()
        .await
        .expect("device")
        .json()
        .await
        .expect("JSON");
    let id = schema::VolumeId::parse(&volume).expect("id");
    let name = env.sim.sim.device_name(id).expect("a guest device");
    assert_eq!(device["device_path"], format!("/dev/{name}"), "{device}");
    assert_eq!(device["volume_uuid"], volume.as_str(), "{device}");
    let detached = step(
        reqwest::Method::POST,
        format!("/volumes/{volume}/detach"),
        None,
    )
    .await;
    assert_eq!(detached["status"], "completed", "{detached}");
    let deleted = step(reqwest::Method::DELETE, format!("/volumes/{volume}"), None).await;
    assert_eq!(deleted["status"], "completed", "{deleted}");
    for call in [
        "createVolume",
        "attachVolume",
        "detachVolume",
        "deleteVolume",
    ] {
        assert_eq!(env.sim.sim.call_count(call), 1, "{call} exactly once");
    }

    // A failure keeps the old shape: `error` a string.
    let missing = schema::VolumeId::new_random();
    let failed = step(
        reqwest::Method::POST,
        format!("/volumes/{missing}/attach"),
        Some(json!({"volume_id": missing, "vm_id": host})),
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].is_string(), "{failed}");
    let unserved = http
        .post(format!("{base}/cleanup/test-failover"))
        .json(&json!({}))
        .send()
        .await
        .expect("answer");
    assert_eq!(unserved.status().as_u16(), 501);
    let body: Value = unserved.json().await.expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("docs/failover.md")),
        "{body}"
    );
}
