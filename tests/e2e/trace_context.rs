//! One trace from the producer's command to its event (docs/wire.md, "Trace context"): the
//! command's W3C `traceparent`/`tracestate` headers are kept with the operation (a SIGKILL and a
//! restart do not lose them) and come back on its event, as CloudEvents extension attributes
//! and AMQP headers: the same trace id, the daemon's operation span as parent, `tracestate`
//! verbatim; a duplicate's event carries the original's.

use std::time::Duration;

use lapin::types::AMQPValue;

use cloudstack_sim::SimConfig;
use schema::trace::TraceContext;

use crate::helpers::{EventTap, TestEnv, cmd, volumectl};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WAIT: Duration = Duration::from_secs(30);

fn header(props: &lapin::BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn a_commands_trace_comes_back_on_its_event_survives_a_takeover_and_stays_on_duplicates() {
    let mut env = TestEnv::with_sim(SimConfig {
        job_latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    env.start_daemon().await;
    let mut tap = EventTap::new(&env.prefix).await;
    let trace = TraceContext::parse(PARENT, Some("congo=t61rcWkgMzE")).expect("trace");
    let command = cmd::create("traced", "1GiB").with_trace(trace.clone());
    let id = command.command_id.as_str().to_owned();
    let client = env.client().await;
    let standby = env.spawn_other().await;
    let pending = client.publish(&command).await.expect("published");
    // Killed once the operation is under way: the standby that takes over must still know
    // the trace.
    env.wait_for_operation(&id, WAIT, |r| r.status == "executing")
        .await;
    env.kill_daemon().await;
    env.promote_other(0, standby);
    let event = pending.wait(WAIT).await.expect("the event");
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT traceparent, tracestate FROM volume_operations WHERE id = ?")
            .bind(&id)
            .fetch_one(&env.db().await)
            .await
            .expect("the operation row");
    assert_eq!(
        stored,
        (
            Some(PARENT.to_owned()),
            Some("congo=t61rcWkgMzE".to_owned())
        ),
        "the operation row keeps the command's trace context"
    );
    // Every JSON log line of this operation, from the killed daemon and from the standby that
    // finished it, carries the trace id on the operation's span.
    let log = env.daemon_log();
    let per_daemon: Vec<Vec<serde_json::Value>> = log
        .split("=== ")
        .skip(1)
        .map(|file| {
            file.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["span"]["operation_id"] == id.as_str())
                .collect()
        })
        .collect();
    assert_eq!(per_daemon.len(), 2, "two daemons ran");
    for (daemon, lines) in per_daemon.iter().enumerate() {
        assert!(
            !lines.is_empty(),
            "daemon {daemon} logged operation {id}:\n{log}"
        );
        for line in lines {
            assert_eq!(line["span"]["trace_id"], trace.trace_id(), "{line}");
        }
    }
    assert_eq!(
        event.event_type, "volume.create.completed",
        "{:?}",
        event.data.error
    );
    let parent = event.traceparent.clone().expect("the event's traceparent");
    let child = TraceContext::parse(&parent, None).expect("a valid traceparent");
    assert_eq!(child.trace_id(), trace.trace_id(), "the same trace");
    assert_ne!(parent, PARENT, "the daemon's span is the parent");
    assert_eq!(event.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    let (props, _) = tap.expect("the event on the exchange", WAIT).await;
    assert_eq!(
        header(&props, "traceparent").as_deref(),
        Some(parent.as_str())
    );
    assert_eq!(
        header(&props, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );

    let again = env.execute(&command).await;
    assert_eq!(
        (again.id, again.traceparent.clone()),
        (event.id, Some(parent)),
        "a duplicate carries the original's"
    );

    // volumectl takes the trace from TRACEPARENT / TRACESTATE.
    let out = tokio::process::Command::new(volumectl())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AMQP_URL", &env.client_amqp_url)
        .env("AMQP_PREFIX", &env.prefix)
        .env("TRACEPARENT", PARENT)
        .args(["create", "--size", "1GiB", "--wait", "--json"])
        .output()
        .await
        .expect("volumectl runs");
    assert!(out.status.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON event");
    let parent = printed["traceparent"].as_str().expect("traced");
    assert!(parent.contains(trace.trace_id()), "{printed}");
    let bad = tokio::process::Command::new(volumectl())
        .env_clear()
        .env("AMQP_URL", &env.client_amqp_url)
        .env("AMQP_PREFIX", &env.prefix)
        .env("TRACEPARENT", "garbage")
        .args(["create", "--size", "1GiB"])
        .output()
        .await
        .expect("volumectl runs");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a malformed TRACEPARENT is a usage error"
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("TRACEPARENT"));
}

/// Issue 29, OTLP export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a receiver built on the
/// official protobuf definitions (`otlp_receiver.py`) gets one `operation` span per operation,
/// in the command's trace with the producer's span as parent, whose span id is the parent id the
/// event carries; under it one `cloudstack.request` span per request the simulator received
/// for that operation (the self-checks are held off, operations run one at a time), the job
/// waits, the device correlation and the export step of a host attach.
#[tokio::test]
async fn exported_spans_follow_each_operation_inside_the_commands_trace() {
    use std::io::BufRead as _;
    let spans_file = std::env::temp_dir().join(format!("otlp-{}.jsonl", uuid::Uuid::new_v4()));
    let mut receiver = KillOnDrop(
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/e2e/otlp_receiver.py"
            ))
            .arg(&spans_file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the receiver (scripts/test installs opentelemetry-proto)"),
    );
    let mut port = String::new();
    std::io::BufReader::new(receiver.0.stdout.take().expect("stdout"))
        .read_line(&mut port)
        .expect("the receiver prints its port");
    let endpoint = format!("http://127.0.0.1:{}", port.trim());
    let (mut env, _nbd, _exports) = crate::exports::exporting_env_with(|env| {
        env.extra_env
            .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
        env.extra_env
            .push(("SELF_CHECK_INTERVAL_S".into(), "3600".into()));
    })
    .await;
    let host = env.host_vm.expect("host vm");
    tokio::time::sleep(Duration::from_secs(1)).await; // the start-up self-check
    let calls = |env: &TestEnv| env.sim.sim.calls().len();

    let traces = [
        TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("vendor=a"),
        )
        .expect("trace"),
        TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .expect("trace"),
    ];
    let before = calls(&env);
    let created = env
        .execute(&cmd::create("exported", "1GiB").with_trace(traces[0].clone()))
        .await;
    let volume = created.data.volume_id.expect("volume");
    let middle = calls(&env);
    let attached = env
        .execute(&cmd::attach(volume, host).with_trace(traces[1].clone()))
        .await;
    assert_eq!(attached.data.status.as_str(), "completed", "{attached:?}");
    let after = calls(&env);
    env.stop_daemon().await; // flushes the exporter
    drop(receiver);
    let spans: Vec<serde_json::Value> = std::fs::read_to_string(&spans_file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let _ = std::fs::remove_file(&spans_file);

    for (trace, event, requests) in [
        (&traces[0], &created, middle - before),
        (&traces[1], &attached, after - middle),
    ] {
        let operations: Vec<&serde_json::Value> = spans
            .iter()
            .filter(|s| s["name"] == "operation" && s["trace_id"] == trace.trace_id())
            .collect();
        assert_eq!(
            operations.len(),
            1,
            "one operation span in {}: {spans:#?}",
            trace.trace_id()
        );
        let op = operations[0];
        assert_eq!(
            op["parent_span_id"],
            trace.parent_id(),
            "the producer's span is the parent"
        );
        assert_eq!(op["service"], "volume-daemon");
        assert_eq!(op["path"], "/v1/traces");
        let event_parent =
            event.traceparent.as_deref().expect("the event is traced")[36..52].to_owned();
        assert_eq!(
            op["span_id"], event_parent,
            "the event's parent is the exported span"
        );
        let below = descendants(&spans, op["span_id"].as_str().expect("span id"));
        let count = |name: &str| below.iter().filter(|s| s["name"] == name).count();
        assert_eq!(
            count("cloudstack.request"),
            requests,
            "one span per CloudStack request of {} ({} received by the simulator)",
            event.data.op_type,
            requests
        );
        assert!(count("cloudstack.job") >= 1, "the job wait");
        if event.data.op_type.as_str() == "attach" {
            assert_eq!(count("device.correlate"), 1, "the device correlation");
            assert_eq!(count("nbd.export"), 1, "the export step");
        }
        println!(
            "{}: {} spans under the operation, {requests} CloudStack requests",
            event.data.op_type,
            below.len()
        );
    }
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every span below `root` (children, their children, ...).
fn descendants<'a>(spans: &'a [serde_json::Value], root: &str) -> Vec<&'a serde_json::Value> {
    let mut found = Vec::new();
    let mut parents = vec![root.to_owned()];
    while let Some(parent) = parents.pop() {
        for s in spans
            .iter()
            .filter(|s| s["parent_span_id"] == parent.as_str())
        {
            parents.push(s["span_id"].as_str().unwrap_or_default().to_owned());
            found.push(s);
        }
    }
    found
}

/// Export never holds the daemon up: with a collector that accepts connections and never
/// answers, operations complete and a SIGTERM still stops the daemon promptly (the last
/// export is abandoned after 5 s; the helper allows 20).
#[tokio::test]
async fn a_collector_that_never_answers_holds_up_neither_operations_nor_the_stop() {
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let endpoint = format!("http://{}", frozen.local_addr().expect("address"));
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    env.start_daemon().await;
    for i in 0..3 {
        let done = env
            .execute(&cmd::create(&format!("frozen-{i}"), "1GiB"))
            .await;
        assert_eq!(done.data.status.as_str(), "completed", "{done:?}");
    }
    let took = env.stop_daemon().await;
    assert!(
        took < Duration::from_secs(12),
        "the stop took {took:?} with a frozen collector"
    );
    drop(frozen);
}
