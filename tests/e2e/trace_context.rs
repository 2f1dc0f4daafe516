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
async fn a_commands_trace_comes_back_on_its_event_survives_a_sigkill_and_stays_on_duplicates() {
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
    let pending = client.publish(&command).await.expect("published");
    // Killed once the operation is under way: the next daemon must still know the trace.
    env.wait_for_operation(&id, WAIT, |r| r.status == "executing")
        .await;
    env.kill_daemon().await;
    env.start_daemon().await;
    let event = pending.wait(WAIT).await.expect("the event");
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
