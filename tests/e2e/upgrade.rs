//! Rolling upgrades (docs/upgrading.md): only the instance that holds the execution lease
//! migrates the schema, so a standby of a newer build started beside a running active of an
//! older one changes nothing; it migrates when it takes over, and records the schema version
//! in the lease row. An older binary runs on a newer (additive) schema and says so.

use std::path::PathBuf;
use std::time::Duration;

use cloudstack_sim::SimConfig;

use crate::helpers::{TestEnv, cmd, get_json};

/// The last commit before the schema-version change (migration 20261205000001): its build
/// is the old active of the rolling upgrade.
const BEFORE_SCHEMA_VERSION: &str = "34fc4bd03d877d1f3f23fd5f7e7117aadc86286b";
/// The migration the old build does not have.
const NEW_MIGRATION: i64 = 20261205000001;
const WAIT: Duration = Duration::from_secs(60);

/// The daemon as built at `commit` (`scripts/build-at`: once per machine, minutes).
fn build_at(commit: &str) -> PathBuf {
    let out =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-at"))
            .arg(commit)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("scripts/build-at runs");
    assert!(
        out.status.success(),
        "building volume-daemon at {commit} failed"
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("a path").trim())
}

fn create_name(i: usize) -> String {
    format!("rolling-{i}")
}

/// Publishes the creates `rolling-<i>` for `range`; what waits for their events.
async fn publish_creates(
    client: &publisher::VolumeClient,
    range: std::ops::Range<usize>,
) -> Vec<publisher::PendingCommand> {
    let mut pending = Vec::new();
    for name in range.map(create_name) {
        let command = cmd::create(&name, "1GiB");
        pending.push(client.publish(&command).await.expect("published"));
    }
    pending
}

async fn applied(env: &mut TestEnv) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&env.db().await)
        .await
        .expect("the migrations table")
}

async fn lease_columns(env: &mut TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND table_name = 'execution_lease'",
    )
    .fetch_all(&env.db().await)
    .await
    .expect("the lease table's columns")
}

/// Acceptance 3 of the field-operations issue: an active of the build before the schema
/// change keeps executing while a standby of this build starts beside it and leaves the schema
/// alone; this build takes over when the old one stops, migrates, and every command published
/// before, during and after ends exactly once (one createVolume, one event each).
#[tokio::test]
async fn a_newer_standby_leaves_the_schema_alone_and_migrates_when_it_takes_over() {
    let old = build_at(BEFORE_SCHEMA_VERSION);
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    env.daemon_binary = Some(old);
    env.start_daemon().await;
    let before = applied(&mut env).await;
    assert!(!before.contains(&NEW_MIGRATION), "{before:?}");

    env.daemon_binary = None;
    let standby = env.spawn_other().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let standby_ready = loop {
        let (code, body) = get_json(standby, "/ready").await;
        if code == 200 && body["role"] == "standby" {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new standby: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        standby_ready["schema"]["database"],
        serde_json::json!(before.iter().max()),
        "{standby_ready}"
    );
    assert_eq!(
        standby_ready["schema"]["binary"],
        serde_json::json!(NEW_MIGRATION)
    );

    let client = env.client().await;
    let mut pending = Vec::new();
    pending.extend(publish_creates(&client, 0..10).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        applied(&mut env).await,
        before,
        "the standby migrated under the old active"
    );
    assert!(
        !lease_columns(&mut env)
            .await
            .contains(&"schema_version".to_owned())
    );
    let log = env.daemon_log();
    assert!(
        log.contains("the database's schema is older than this binary's"),
        "the standby says it waits to migrate:\n{log}"
    );

    // More commands while the old one stops and the new one takes over.
    pending.extend(publish_creates(&client, 10..20).await);
    env.stop_daemon().await;
    env.promote_other(0, standby);
    env.wait_active(WAIT).await;
    pending.extend(publish_creates(&client, 20..30).await);
    for p in pending {
        let event = p.wait(WAIT).await.expect("every command's event");
        assert_eq!(event.event_type, "volume.create.completed", "{event:?}");
    }

    let after = applied(&mut env).await;
    assert!(
        after.contains(&NEW_MIGRATION),
        "the new active migrated: {after:?}"
    );
    let (schema_version, holder_version): (Option<i64>, Option<String>) =
        sqlx::query_as("SELECT schema_version, holder_version FROM execution_lease WHERE name = ?")
            .bind(format!("volume-daemon:{}", env.prefix))
            .fetch_one(&env.db().await)
            .await
            .expect("the lease row");
    assert_eq!(schema_version, Some(NEW_MIGRATION));
    assert_eq!(holder_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let (_, ready) = get_json(env.http_addr, "/ready").await;
    assert_eq!(
        ready["schema"]["database"], ready["schema"]["binary"],
        "{ready}"
    );

    // Nothing lost or doubled.
    let calls = env.sim.sim.calls();
    for name in (0..30).map(create_name) {
        let creates = calls
            .iter()
            .filter(|c| c.command == "createVolume" && c.params.get("name") == Some(&name))
            .count();
        assert_eq!(creates, 1, "createVolume calls for {name}");
    }
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM volume_operations WHERE type = 'create' AND status = 'completed'",
    )
    .fetch_one(&env.db().await)
    .await
    .expect("count");
    assert_eq!(ended, 30);
    env.stop_daemon().await;
}

/// An older binary on a newer schema (a migration it does not know, with its column): it
/// starts, says both versions, and executes.
#[tokio::test]
async fn an_older_binary_runs_on_a_newer_schema_and_says_so() {
    const FUTURE: i64 = 29991231000001;
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    env.stop_daemon().await;
    let pool = env.db().await;
    sqlx::query("ALTER TABLE volume_operations ADD COLUMN from_the_future INT NULL")
        .execute(&pool)
        .await
        .expect("a newer build's column");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (?, 'from a newer build', 1, X'00', 1)",
    )
    .bind(FUTURE)
    .execute(&pool)
    .await
    .expect("a newer build's migration");

    env.start_daemon().await;
    let done = env.execute(&cmd::create("on-a-newer-schema", "1GiB")).await;
    assert_eq!(done.data.status.as_str(), "completed", "{done:?}");
    let (_, ready) = get_json(env.http_addr, "/ready").await;
    assert_eq!(
        ready["schema"]["database"],
        serde_json::json!(FUTURE),
        "{ready}"
    );
    assert_eq!(ready["schema"]["binary"], serde_json::json!(NEW_MIGRATION));
    let log = env.daemon_log();
    assert!(
        log.contains("the database's schema is newer than this binary's")
            && log.contains(&FUTURE.to_string()),
        "the daemon names both versions:\n{log}"
    );
    env.stop_daemon().await;
}
