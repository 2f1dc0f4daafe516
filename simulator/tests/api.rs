//! The simulator checked from outside: real HTTP on a real port, signed by the project's client.

use std::net::SocketAddr;
use std::time::Duration;

use cloudstack::signing::{encode_value, sign};
use cloudstack::{Client, Credentials, JobPolling, RetryPolicy};
use cloudstack_sim::{CUSTOM_OFFERING_ID, RunningSim, SimConfig, ZONE_ID};

async fn start() -> RunningSim {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let config = SimConfig {
        job_latency: Duration::from_millis(50),
        ..SimConfig::default()
    };
    cloudstack_sim::spawn(addr, config)
        .await
        .expect("simulator starts")
}

fn client(sim: &RunningSim, secret: &str) -> Client {
    Client::new(
        Client::http().expect("http client"),
        Credentials {
            api_url: sim.api_url(),
            api_key: sim.sim.config.api_key.clone(),
            secret_key: secret.into(),
        },
        RetryPolicy::default(),
    )
}

/// Sends `pairs` (names as given) signed with `secret`; returns the HTTP status and body.
async fn send(sim: &RunningSim, pairs: &[(&str, &str)], secret: &str) -> (u16, serde_json::Value) {
    let signature = sign(secret, pairs.iter().copied());
    send_signed(sim, pairs, &signature).await
}

async fn send_signed(
    sim: &RunningSim,
    pairs: &[(&str, &str)],
    signature: &str,
) -> (u16, serde_json::Value) {
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode_value(v)))
        .chain([format!("signature={}", encode_value(signature))])
        .collect();
    let resp = cloudstack::Client::http()
        .expect("http")
        .get(format!("{}?{}", sim.api_url(), query.join("&")))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

fn expires_in(minutes: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::minutes(minutes))
        .format("%Y-%m-%dT%H:%M:%S+0000")
        .to_string()
}

#[tokio::test]
async fn create_volume_runs_an_async_job_that_reports_the_volume() {
    let sim = start().await;
    let cs = client(&sim, "sim-secret-key");

    let (id, job) = cs
        .create_volume("disk0", ZONE_ID, CUSTOM_OFFERING_ID, Some(2))
        .await
        .expect("createVolume");
    // The volume is listed at once (Allocated), before the job ends.
    let listed = cs
        .list_volumes(&[("id", id.to_string())])
        .await
        .expect("listVolumes");
    assert_eq!(listed.len(), 1);

    let vol = cs
        .wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("job succeeds");
    assert_eq!(vol.id, id);
    assert_eq!(vol.name, "disk0");
    assert_eq!(vol.size, Some(2 << 30));
    assert_eq!(vol.state, "Allocated");
    assert_eq!(sim.sim.call_count("createVolume"), 1);
    assert!(sim.sim.call_count("queryAsyncJobResult") >= 1);
}

#[tokio::test]
async fn rejects_a_request_in_which_any_one_parameter_changed() {
    let sim = start().await;
    let expires = expires_in(10);
    let pairs = [
        ("apikey", "sim-api-key"),
        ("command", "listVolumes"),
        ("response", "json"),
        ("name", "pvc-1 test~x*"),
        ("listall", "true"),
        ("signatureversion", "3"),
        ("expires", expires.as_str()),
    ];
    let signature = sign("sim-secret-key", pairs);
    let (status, _) = send_signed(&sim, &pairs, &signature).await;
    assert_eq!(status, 200, "the unchanged request is accepted");

    for i in 0..pairs.len() {
        let mut changed = pairs;
        let tampered = format!("{}x", pairs[i].1);
        changed[i].1 = &tampered;
        let (status, body) = send_signed(&sim, &changed, &signature).await;
        assert_eq!(status, 401, "changing {} must be rejected", pairs[i].0);
        let text = body.to_string();
        assert!(
            text.contains("unable to verify user credentials and/or request signature"),
            "{text}"
        );
    }
    // Adding a parameter, or dropping one, breaks the signature too.
    let mut extra = pairs.to_vec();
    extra.push(("zoneid", "z"));
    assert_eq!(send_signed(&sim, &extra, &signature).await.0, 401);
    assert_eq!(send_signed(&sim, &pairs[..6], &signature).await.0, 401);
}

#[tokio::test]
async fn accepts_parameter_names_in_other_casing() {
    let sim = start().await;
    let expires = expires_in(10);
    let pairs = [
        ("apiKey", "sim-api-key"),
        ("Command", "listZones"),
        ("RESPONSE", "json"),
        ("signatureVersion", "3"),
        ("Expires", expires.as_str()),
    ];
    let (status, body) = send(&sim, &pairs, "sim-secret-key").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["listzonesresponse"]["zone"][0]["id"],
        ZONE_ID.to_string()
    );
}

#[tokio::test]
async fn rejects_wrong_secret_missing_signature_expired_and_unknown_command() {
    let sim = start().await;
    let fresh = expires_in(10);
    let base = [
        ("apikey", "sim-api-key"),
        ("command", "listZones"),
        ("response", "json"),
    ];

    assert_eq!(send(&sim, &base, "wrong-secret").await.0, 401);

    let resp = cloudstack::Client::http()
        .expect("http")
        .get(format!(
            "{}?apikey=sim-api-key&command=listZones&response=json",
            sim.api_url()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 401, "no signature");

    let expired = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .format("%Y-%m-%dT%H:%M:%S+0000")
        .to_string();
    let mut old = base.to_vec();
    old.extend([("signatureversion", "3"), ("expires", expired.as_str())]);
    assert_eq!(send(&sim, &old, "sim-secret-key").await.0, 401, "expired");

    let unknown = [
        ("apikey", "sim-api-key"),
        ("command", "launchRockets"),
        ("response", "json"),
        ("signatureversion", "3"),
        ("expires", fresh.as_str()),
    ];
    assert_eq!(
        send(&sim, &unknown, "sim-secret-key").await.0,
        401,
        "unknown command"
    );

    let other_key = [
        ("apikey", "someone-else"),
        ("command", "listZones"),
        ("response", "json"),
    ];
    assert_eq!(
        send(&sim, &other_key, "sim-secret-key").await.0,
        401,
        "unknown api key"
    );

    // The client sees a typed, final error.
    let err = client(&sim, "wrong").list_zones().await.expect_err("401");
    assert_eq!(err.cloudstack_code(), Some(401));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn invalid_parameters_give_431_and_an_empty_list_is_an_empty_object() {
    let sim = start().await;
    let cs = client(&sim, "sim-secret-key");
    let bad_offering = schema::DiskOfferingId::new_random();
    let err = cs
        .create_volume("d", ZONE_ID, bad_offering, Some(1))
        .await
        .expect_err("431");
    assert_eq!(err.cloudstack_code(), Some(431));
    assert!(err.to_string().contains(&bad_offering.to_string()), "{err}");
    assert_eq!(
        sim.sim.call_count("createVolume"),
        1,
        "a 431 is not retried"
    );
    assert_eq!(sim.sim.volume_count(), 0);

    let expires = expires_in(10);
    let pairs = [
        ("apikey", "sim-api-key"),
        ("command", "listVolumes"),
        ("response", "json"),
        ("name", "nothing-here"),
        ("signatureversion", "3"),
        ("expires", expires.as_str()),
    ];
    let (status, body) = send(&sim, &pairs, "sim-secret-key").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"listvolumesresponse": {}}));
    assert!(
        cs.list_volumes(&[("name", "nothing-here".into())])
            .await
            .expect("list")
            .is_empty()
    );

    let offerings = cs
        .list_disk_offerings(Some(ZONE_ID))
        .await
        .expect("offerings");
    assert!(
        offerings
            .iter()
            .any(|o| o.iscustomized && o.id == CUSTOM_OFFERING_ID)
    );
}
