//! `volumectl status` and `volumectl exports` against running daemons: an active and its
//! standby, a stopped cloud, a dead-letter backlog; and `dead-letters discard` and the
//! confirmation before replaying or discarding everything.

use std::time::Duration;

use crate::helpers::{TcpProxy, TestEnv, cmd, run_volumectl};
use crate::rejections::publish_raw;

const WAIT: Duration = Duration::from_secs(20);

/// `volumectl status` with every instance given, as JSON and as text.
async fn status(env: &TestEnv, urls: &[String]) -> (i32, serde_json::Value, String) {
    let mut args = vec!["status".to_owned()];
    for u in urls {
        args.push("--api-url".into());
        args.push(u.clone());
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_volumectl(env, &[&arg_refs[..], &["--json"]].concat()).await;
    let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let (text_code, text, err) = run_volumectl(env, &arg_refs).await;
    assert_eq!(code, text_code, "{text}{err}");
    (code, json, text)
}

#[tokio::test]
async fn status_shows_the_active_and_the_standby_then_the_takeover_and_exit_5_when_none_answers() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let standby = env.spawn_other().await;
    let urls = [
        format!("http://{}", env.http_addr),
        format!("http://{standby}"),
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    let (code, json, text) = loop {
        let got = status(&env, &urls).await;
        if got.1["instances"][1]["ready"]["role"] == "standby" {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", got.2);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 0, "{text}");
    assert_eq!(json["instances"][0]["ready"]["role"], "active", "{json}");
    assert_eq!(json["instances"][1]["ready"]["role"], "standby", "{json}");
    assert_eq!(json["problems"], serde_json::json!([]), "{json}");
    assert_eq!(json["dead_letters"]["messages"], 0, "{json}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("INSTANCE") && lines[0].contains("ROLE"),
        "{text}"
    );
    assert!(
        lines[1].contains(&urls[0]) && lines[1].contains("active") && lines[1].contains("ready"),
        "{text}"
    );
    assert!(
        lines[2].contains(&urls[1]) && lines[2].contains("standby"),
        "{text}"
    );
    assert!(
        text.contains("operations: 0 pending, 0 executing"),
        "{text}"
    );
    assert!(text.contains("no problem found"), "{text}");

    // The active stops: the standby takes over, and status says so.
    env.stop_daemon().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, json, text) = status(&env, &urls).await;
        if json["instances"][1]["ready"]["role"] == "active" {
            assert_eq!(code, 0, "{text}");
            assert!(text.contains("UNREACHABLE"), "{text}");
            assert!(
                json["problems"][0]
                    .as_str()
                    .is_some_and(|p| p.contains(&urls[0])),
                "{json}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Only the stopped one given: nothing answers, exit 5.
    let (code, json, _) = status(&env, &urls[..1]).await;
    assert_eq!(code, 5, "{json}");
    assert_eq!(json["problems"][0], "no instance answers");
}

#[tokio::test]
async fn status_shows_a_stopped_cloud() {
    let mut env = TestEnv::new().await;
    let proxy = TcpProxy::start(env.sim.addr).await;
    env.extra_env.push((
        "CLOUDSTACK_API_URL".into(),
        format!("http://{}/client/api", proxy.addr),
    ));
    env.extra_env
        .push(("SELF_CHECK_INTERVAL_S".into(), "1".into()));
    env.start_daemon().await;
    let urls = [format!("http://{}", env.http_addr)];
    proxy.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, json, text) = status(&env, &urls).await;
        if json["instances"][0]["ready"]["components"]["cloudstack"] == "down" {
            assert_eq!(code, 0, "CloudStack is reported, not gating: {text}");
            assert!(
                text.contains(&format!("{}: cloudstack: down", urls[0])),
                "{text}"
            );
            assert!(text.contains("cloudstack down"), "{text}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn status_shows_a_dead_letter_backlog_and_the_last_failure_then_discard_empties_it() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    for i in 0..3 {
        publish_raw(
            &env.prefix,
            "volume.create",
            b"not json at all",
            Some(&format!("bad-{i}")),
        )
        .await;
    }
    // A failure: attaching a volume CloudStack does not know.
    let failed = env
        .execute(&cmd::attach(
            schema::VolumeId::parse(&uuid::Uuid::new_v4().to_string()).expect("id"),
            schema::VmId::parse(&uuid::Uuid::new_v4().to_string()).expect("id"),
        ))
        .await;
    assert_eq!(failed.data.status.as_str(), "failed", "{failed:?}");
    let urls = [format!("http://{}", env.http_addr)];
    let deadline = tokio::time::Instant::now() + WAIT;
    let (json, text) = loop {
        let (_, json, text) = status(&env, &urls).await;
        if json["dead_letters"]["messages"] == 3 {
            break (json, text);
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let queue = format!("{}.commands.dead", env.prefix);
    assert!(
        text.contains(&format!("dead letters: 3 in {queue}")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "3 message(s) in {queue}: volumectl dead-letters list"
        )),
        "a problem line: {text}"
    );
    assert_eq!(
        json["last_failures"][0]["id"],
        failed.data.operation_id.as_str(),
        "{json}"
    );
    assert!(
        text.contains("last failures:") && text.contains(failed.data.operation_id.as_str()),
        "{text}"
    );

    // Discard: one by id, then every other one; away from a terminal, all needs --yes.
    let (code, out, err) = run_volumectl(&env, &["dead-letters", "discard", "--id", "bad-0"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("discarded bad-0"), "{out}");
    let (code, _, err) = run_volumectl(&env, &["dead-letters", "discard", "--all"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("2 message(s)") && err.contains("--yes"),
        "{err}"
    );
    let (code, _, err) = run_volumectl(&env, &["dead-letters", "replay"]).await;
    assert_eq!(code, 2, "replaying everything asks too: {err}");
    let (code, out, err) =
        run_volumectl(&env, &["dead-letters", "discard", "--all", "--yes"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, _) = run_volumectl(&env, &["dead-letters", "discard", "--id", "bad-0"]).await;
    assert_eq!(code, 1, "no such dead letter any more: {out}");
    let (_, json, _) = status(&env, &urls).await;
    assert_eq!(json["dead_letters"]["messages"], 0, "{json}");
}
