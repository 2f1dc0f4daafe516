//! The walking skeleton's path: a create command through the broker, CloudStack (simulated),
//! MySQL and the outbox, back out as one event.

use std::time::Duration;

use schema::command::Action;
use schema::{ErrorCode, OperationStatus};

use crate::helpers::cmd::create;
use crate::helpers::{EventTap, TestEnv};

const WAIT: Duration = Duration::from_secs(20);

/// docs/wire.md: `data.correlation_id` is never null and always equals the AMQP property: the
/// command's correlation id, else its command id. Both a completed and a failed event.
#[tokio::test]
async fn without_a_correlation_id_events_carry_the_command_id_in_data_and_properties() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut tap = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let ok = create("no-corr", "1GiB");
    let mut bad = create("no-corr-bad", "1GiB");
    if let Action::Create(c) = &mut bad.action {
        c.disk_offering_id =
            Some(schema::DiskOfferingId::parse(&uuid::Uuid::new_v4().to_string()).expect("id"));
    }
    assert!(ok.correlation_id.is_none() && bad.correlation_id.is_none());

    for cmd in [&ok, &bad] {
        client.publish_only(cmd).await.expect("published");
        let (props, raw) = tap.next_raw(WAIT).await.expect("an event");
        let json: serde_json::Value = serde_json::from_slice(&raw).expect("event JSON");
        let id = cmd.command_id.as_str();
        assert_eq!(json["data"]["command_id"], id);
        assert_eq!(
            json["data"]["correlation_id"], id,
            "data.correlation_id falls back to the command id: {json}"
        );
        assert_eq!(
            props.correlation_id().as_ref().map(|s| s.as_str()),
            Some(id),
            "the AMQP property carries the same value"
        );
    }
}

#[tokio::test]
async fn one_create_yields_exactly_one_completed_event_with_the_new_volume() {
    // Arrange
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut tap = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let mut cmd = create("migration-vm1-disk0", "10GiB");
    cmd.correlation_id = Some("corr-42".into());
    cmd.metadata.insert("purpose".into(), "migration".into());
    let id = cmd.command_id.to_string();

    // Act
    client.publish_only(&cmd).await.expect("published");
    let (props, event) = tap.expect("volume.create.completed", WAIT).await;

    // Assert: the event
    assert_eq!(event.event_type, "volume.create.completed");
    assert_eq!(event.specversion, "1.0");
    assert_eq!(event.source, "volume-daemon");
    assert_eq!(event.data.command_id.as_str(), id);
    assert_eq!(event.data.operation_id.as_str(), id);
    assert_eq!(event.data.status, OperationStatus::Completed);
    assert_eq!(event.data.correlation_id, "corr-42");
    assert_eq!(
        event.data.metadata.get("purpose").map(String::as_str),
        Some("migration")
    );
    assert!(event.data.error.is_none());
    let volume = event
        .data
        .volume
        .clone()
        .expect("create events carry the volume");
    let sim_volumes = env.sim.sim.volumes();
    assert_eq!(sim_volumes.len(), 1, "exactly one volume was created");
    assert_eq!(
        volume.id, sim_volumes[0].0,
        "the event carries the simulator's new volume id"
    );
    assert_eq!(event.data.volume_id, Some(volume.id));
    assert_eq!(
        event.subject.as_deref(),
        Some(volume.id.to_string().as_str())
    );
    assert_eq!(volume.name, "migration-vm1-disk0");
    assert_eq!(volume.size, 10 << 30);
    assert_eq!(volume.zone_id, cloudstack_sim::ZONE_ID);
    assert!(event.data.completed_at >= event.data.created_at);

    // Assert: AMQP properties of docs/wire.md
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(event.id.to_string().as_str())
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-42")
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        props.kind().as_ref().map(|s| s.as_str()),
        Some("volume.create.completed")
    );
    assert_eq!(*props.delivery_mode(), Some(2));

    // Assert: the operation row and its outbox row
    let row = env
        .wait_for_operation(&id, WAIT, |r| r.status == "completed")
        .await;
    assert_eq!(
        row.volume_id.as_deref(),
        Some(volume.id.to_string().as_str())
    );
    assert_eq!(
        row.request.as_ref().and_then(|r| r["name"].as_str()),
        Some("migration-vm1-disk0")
    );
    assert_eq!(
        row.request.as_ref().and_then(|r| r["size"].as_u64()),
        Some(10 << 30)
    );
    assert_eq!(
        row.response
            .as_ref()
            .and_then(|r| r["volume"]["id"].as_str()),
        Some(volume.id.to_string().as_str())
    );
    assert!(row.cloudstack_job_id.is_some(), "the job id was stored");
    assert_eq!(row.event_id.as_deref(), Some(event.id.to_string().as_str()));
    let outbox = env.outbox_once_published(WAIT).await;
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    assert_eq!(outbox[0].0, event.id.to_string());
    assert!(outbox[0].2, "the outbox row is marked published");

    // Exactly one event, one createVolume.
    assert!(
        tap.next(Duration::from_secs(1)).await.is_none(),
        "a second event arrived"
    );
    assert_eq!(env.sim.sim.call_count("createVolume"), 1);
}

#[tokio::test]
async fn a_command_published_while_the_daemon_is_down_runs_when_it_starts() {
    let mut env = TestEnv::new().await;
    let client = env.client().await;
    let pending = client
        .publish(&create("queued-before-start", "1GiB"))
        .await
        .expect("published");

    env.start_daemon().await;
    let event = pending
        .wait(WAIT)
        .await
        .expect("event once the daemon runs");

    assert_eq!(event.event_type, "volume.create.completed");
    assert_eq!(env.sim.sim.volume_count(), 1);
}

#[tokio::test]
async fn a_bad_disk_offering_fails_with_cloudstack_invalid_parameter_after_one_call() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut cmd = create("bad-offering", "1GiB");
    let bogus = schema::DiskOfferingId::new_random();
    if let Action::Create(c) = &mut cmd.action {
        c.disk_offering_id = Some(bogus);
    }

    let event = env.execute(&cmd).await;

    assert_eq!(event.event_type, "volume.create.failed");
    let error = event.data.error.expect("failed events carry an error");
    assert_eq!(error.code, ErrorCode::CloudstackInvalidParameter);
    assert_eq!(error.cloudstack_error_code, Some(431));
    assert!(!error.retryable);
    assert!(
        error.message.contains(&bogus.to_string()),
        "{}",
        error.message
    );
    assert!(!error.hint.is_empty());
    assert_eq!(env.sim.sim.call_count("createVolume"), 1, "a 431 is final");
    let row = env
        .wait_for_operation(cmd.command_id.as_str(), WAIT, |r| r.status == "failed")
        .await;
    assert_eq!(
        row.error_code.as_deref(),
        Some("CLOUDSTACK_INVALID_PARAMETER")
    );
}

#[tokio::test]
async fn a_duplicate_of_a_completed_command_republishes_the_same_event() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let mut tap = EventTap::new(&env.prefix).await;
    let client = env.client().await;
    let cmd = create("dup", "1GiB");

    client.publish_only(&cmd).await.expect("published");
    let (_, first) = tap.expect("the first event", WAIT).await;
    client.publish_only(&cmd).await.expect("published again");
    let (_, second) = tap.expect("the re-published event", WAIT).await;

    assert_eq!(first.id, second.id, "same event id");
    assert_eq!(first, second);
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        1,
        "no second execution"
    );
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    env.execute(&create("m", "1GiB")).await;

    let (status, health) = env.get_json("/health").await;
    assert_eq!(
        (status, health),
        (
            200,
            serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
        )
    );
    let (status, ready) = env.get_json("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["role"], "active");
    assert_eq!(ready["components"]["database"], "up");
    assert_eq!(ready["outbox"]["backlog"], 0);
    assert_eq!(ready["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ready["operations"]["pending"], 0, "{ready}");
    assert_eq!(ready["operations"]["executing"], 0, "{ready}");
    assert_eq!(
        ready["schema"]["database"], ready["schema"]["binary"],
        "{ready}"
    );

    let metrics = crate::helpers::http()
        .get(format!("http://{}/metrics", env.http_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"volume_daemon_operations_total{type="create",outcome="completed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("volume_daemon_operation_duration_seconds_bucket"),
        "{metrics}"
    );
}

/// The parser a Prometheus-compatible scraper would use, chosen by the served Content-Type
/// (Python `prometheus_client`: the OpenMetrics parser for `application/openmetrics-text`,
/// the classic text parser otherwise). Prints `name type` per family; fails on parse errors.
const PARSE_METRICS_PY: &str = r#"
import sys
content_type, body = sys.argv[1], sys.stdin.read()
if content_type.startswith("application/openmetrics-text"):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
elif content_type.startswith("text/plain"):
    from prometheus_client.parser import text_string_to_metric_families
else:
    sys.exit("unexpected Content-Type " + content_type)
for family in text_string_to_metric_families(body):
    print(family.name, family.type)
"#;

/// docs/http.md: the Content-Type matches the body, so an independent parser picked by it reads
/// every family with its type (with a mismatched header the counters come out untyped).
#[tokio::test]
async fn metrics_parse_with_the_parser_their_content_type_names_and_no_family_is_untyped() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    env.execute(&create("m", "1GiB")).await;
    let response = crate::helpers::http()
        .get(format!("http://{}/metrics", env.http_addr))
        .send()
        .await
        .expect("metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .expect("a Content-Type")
        .to_owned();
    let body = response.text().await.expect("text");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "prometheus-client encodes OpenMetrics: {content_type}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics body");

    let mut python = tokio::process::Command::new("python3")
        .args(["-c", PARSE_METRICS_PY, &content_type])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs prometheus_client)");
    use tokio::io::AsyncWriteExt;
    let mut stdin = python.stdin.take().expect("stdin");
    stdin.write_all(body.as_bytes()).await.expect("write");
    drop(stdin);
    let out = python.wait_with_output().await.expect("parser ends");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the parser rejected the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<(&str, &str)> = printed.lines().filter_map(|l| l.split_once(' ')).collect();
    let untyped: Vec<_> = families
        .iter()
        .filter(|(_, t)| matches!(*t, "unknown" | "untyped"))
        .collect();
    assert!(untyped.is_empty(), "untyped families: {untyped:?}\n{body}");
    for (name, kind) in [
        ("volume_daemon_operations", "counter"),
        ("volume_daemon_operation_duration_seconds", "histogram"),
    ] {
        assert!(
            families.contains(&(name, kind)),
            "{name} as a {kind}: {families:?}"
        );
    }
}

#[tokio::test]
async fn sigterm_stops_the_daemon_promptly_and_an_interrupted_create_finishes_after_restart() {
    let config = cloudstack_sim::SimConfig {
        job_latency: Duration::from_secs(3),
        ..Default::default()
    };
    let mut env = TestEnv::with_sim(config).await;
    env.start_daemon().await;
    let client = env.client().await;
    let cmd = create("interrupted", "1GiB");
    let pending = client.publish(&cmd).await.expect("published");
    let id = cmd.command_id.to_string();
    env.wait_for_operation(&id, WAIT, |r| r.cloudstack_job_id.is_some())
        .await;

    let took = env.stop_daemon().await;
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    let row = env.operation(&id).await.expect("row");
    assert_eq!(
        row.status, "executing",
        "left at a safe point: job id stored, not ended"
    );

    env.start_daemon().await;
    let event = pending.wait(WAIT).await.expect("event after restart");
    assert_eq!(event.event_type, "volume.create.completed");
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        1,
        "resumed from the stored job, not re-created"
    );
    let row = env.operation(&id).await.expect("row");
    assert_eq!(row.attempts, 2, "one attempt before the restart, one after");
}

/// A first execution of a create has nothing to find, so it calls createVolume without asking
/// listVolumes first. A create whose earlier execution died between createVolume and
/// recording its job (left `executing`, one attempt, no job id) finds that volume by name
/// after the restart and does not create a second one.
#[tokio::test]
async fn only_a_create_executed_before_looks_for_the_volume_it_may_have_made() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let event = env.execute(&create("first-time", "1GiB")).await;
    assert_eq!(event.event_type, "volume.create.completed");
    assert_eq!(
        env.sim.sim.call_count("listVolumes"),
        0,
        "a first execution lists nothing"
    );
    env.stop_daemon().await;

    // What a daemon killed right after CloudStack took its createVolume leaves behind.
    let orphan = create("orphan", "1GiB");
    let id = orphan.command_id.to_string();
    let accepted = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    let pool = env.db().await;
    sqlx::query(
        "INSERT INTO volume_operations (id, type, status, request, created_at, started_at, attempts) \
         VALUES (?, 'create', 'executing', ?, ?, ?, 1)",
    )
    .bind(&id)
    .bind(orphan.to_body().to_string())
    .bind(accepted)
    .bind(accepted)
    .execute(&pool)
    .await
    .expect("the interrupted operation's row");
    let params: std::collections::HashMap<String, String> = [
        ("name", "orphan".to_owned()),
        ("zoneid", cloudstack_sim::ZONE_ID.to_string()),
        (
            "diskofferingid",
            cloudstack_sim::CUSTOM_OFFERING_ID.to_string(),
        ),
        ("size", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let made = env
        .sim
        .sim
        .create_volume(&params)
        .expect("the orphan volume");
    let made = made["id"].as_str().expect("volume id").to_owned();

    env.start_daemon().await;
    let row = env
        .wait_for_operation(&id, WAIT, |r| r.status == "completed")
        .await;
    assert_eq!(
        row.volume_id.as_deref(),
        Some(made.as_str()),
        "its own volume"
    );
    assert_eq!(
        env.sim.sim.call_count("createVolume"),
        1,
        "only the first command called createVolume"
    );
    assert_eq!(env.sim.sim.volume_count(), 2);
    assert!(env.sim.sim.call_count("listVolumes") > 0);
}
