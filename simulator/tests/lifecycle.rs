//! The simulator's volume lifecycle rules (docs/cloudstack.md), fault injection and guest
//! devices, driven through the project's client over real HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use cloudstack::{Client, CloudStackError, Credentials, JobPolling, RetryPolicy};
use cloudstack_sim::{CUSTOM_OFFERING_ID, DEMO_VMS, Faults, RunningSim, SimConfig, ZONE_ID};
use schema::{VmId, VolumeId};

async fn start(config: SimConfig) -> RunningSim {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    cloudstack_sim::spawn(addr, config)
        .await
        .expect("simulator starts")
}

fn fast() -> SimConfig {
    SimConfig {
        job_latency: Duration::from_millis(20),
        ..SimConfig::default()
    }
}

fn client(sim: &RunningSim) -> Client {
    let (api_key, secret_key) = sim.sim.keys();
    Client::new(
        Client::http().expect("http"),
        Credentials {
            api_url: sim.api_url(),
            api_key,
            secret_key: secret_key.into(),
        },
        RetryPolicy {
            deadline: Duration::from_secs(2),
            ..RetryPolicy::default()
        },
    )
}

async fn new_volume(cs: &Client, name: &str) -> VolumeId {
    let (id, job) = cs
        .create_volume(name, ZONE_ID, CUSTOM_OFFERING_ID, Some(1))
        .await
        .expect("create");
    cs.wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("created");
    id
}

fn code(e: &CloudStackError) -> (Option<u16>, Option<u32>) {
    match e {
        CloudStackError::Api {
            code, cserrorcode, ..
        } => (Some(*code), *cserrorcode),
        _ => (None, None),
    }
}

#[tokio::test]
async fn attach_detach_delete_follow_cloudstack_rules() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let vm = DEMO_VMS[0];
    let vol = new_volume(&cs, "d1").await;

    let job = cs.attach_volume(vol, vm, None).await.expect("attach");
    let attached = cs
        .wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("attached");
    assert_eq!(attached.virtualmachineid, Some(vm));
    assert_eq!(attached.deviceid, Some(1));
    let listed = cs.get_volume(vol).await.expect("list").expect("exists");
    assert_eq!(
        (listed.virtualmachineid, listed.deviceid),
        (Some(vm), Some(1))
    );
    let on_vm = cs
        .list_volumes(&[("virtualmachineid", vm.to_string())])
        .await
        .expect("by vm");
    assert_eq!(
        on_vm
            .iter()
            .map(|v| (v.kind.as_deref(), v.deviceid))
            .collect::<std::collections::BTreeSet<_>>(),
        [(Some("DATADISK"), Some(1)), (Some("ROOT"), Some(0))].into(),
        "the data disk next to the VM's root disk"
    );
    assert_eq!(on_vm.len(), 2);

    // An attached volume can be neither attached again nor deleted.
    let again = cs
        .attach_volume(vol, DEMO_VMS[1], None)
        .await
        .expect_err("already attached");
    assert_eq!(code(&again).0, Some(431));
    let del = cs.delete_volume(vol).await.expect_err("attached");
    assert_eq!(code(&del), (Some(431), Some(4350)));
    assert!(
        del.to_string()
            .contains("Please specify a volume that is not attached to any VM."),
        "{del}"
    );

    let job = cs.detach_volume(vol).await.expect("detach");
    let detached = cs
        .wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("detached");
    assert_eq!((detached.virtualmachineid, detached.deviceid), (None, None));
    let twice = cs.detach_volume(vol).await.expect_err("not attached");
    assert_eq!(code(&twice).0, Some(431));

    cs.delete_volume(vol).await.expect("delete");
    assert_eq!(cs.get_volume(vol).await.expect("list"), None);
    assert_eq!(sim.sim.volume_count(), 0);
}

#[tokio::test]
async fn unknown_ids_give_431_with_cserrorcode_9999() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let ghost = VolumeId::new_random();
    assert_eq!(
        code(&cs.delete_volume(ghost).await.expect_err("unknown")),
        (Some(431), Some(9999))
    );
    assert_eq!(
        code(&cs.detach_volume(ghost).await.expect_err("unknown")),
        (Some(431), Some(9999))
    );
    let vol = new_volume(&cs, "d").await;
    let no_vm = cs
        .attach_volume(vol, VmId::new_random(), None)
        .await
        .expect_err("unknown vm");
    assert_eq!(code(&no_vm), (Some(431), Some(9999)));
    let cdrom = cs
        .attach_volume(vol, DEMO_VMS[0], Some(3))
        .await
        .expect_err("device 3");
    assert_eq!(code(&cdrom).0, Some(431));
}

#[tokio::test]
async fn a_vm_takes_at_most_six_data_disks() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let vm = DEMO_VMS[1];
    let mut devices = Vec::new();
    for i in 0..6 {
        let vol = new_volume(&cs, &format!("d{i}")).await;
        let job = cs.attach_volume(vol, vm, None).await.expect("attach");
        devices.push(
            cs.wait_for_volume_job(&job, JobPolling::default())
                .await
                .expect("attached")
                .deviceid,
        );
    }
    assert_eq!(devices, [1, 2, 4, 5, 6, 7].map(Some), "device ids skip 3");
    let seventh = new_volume(&cs, "d6").await;
    let err = cs
        .attach_volume(seventh, vm, None)
        .await
        .expect_err("limit");
    assert_eq!(code(&err).0, Some(431));
    assert!(
        err.to_string().contains("maximum number of data disks (6)"),
        "{err}"
    );
}

#[tokio::test]
async fn attaching_to_the_host_vm_creates_a_guest_device_and_detaching_removes_it() {
    let root =
        std::env::temp_dir().join(format!("sim-lifecycle-{}", uuid::Uuid::new_v4().simple()));
    let host = VmId::new_random();
    let sim = start(SimConfig {
        host_vm_id: Some(host),
        sysfs_root: Some(root.clone()),
        ..fast()
    })
    .await;
    let cs = client(&sim);
    let vol = new_volume(&cs, "host-disk").await;

    let job = cs.attach_volume(vol, host, None).await.expect("attach");
    cs.wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("attached");
    let mut name = None;
    for _ in 0..50 {
        name = sim.sim.device_name(vol);
        if name.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = name.expect("a device appeared");
    let dev = root.join("block").join(&name);
    assert_eq!(
        std::fs::read_to_string(dev.join("serial"))
            .expect("serial")
            .trim(),
        vol.disk_serial()
    );
    assert_eq!(
        std::fs::read_to_string(dev.join("size"))
            .expect("size")
            .trim(),
        "2097152"
    );

    let job = cs.detach_volume(vol).await.expect("detach");
    cs.wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("detached");
    assert!(!dev.exists(), "detach removes the device");
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test]
async fn injected_faults_errors_job_failures_and_dropped_connections() {
    let sim = start(fast()).await;
    let cs = client(&sim);

    // A certain 429 names its delay.
    let mut faults = Faults {
        retry_after_ms: 150,
        ..Faults::default()
    };
    faults.error_rates.insert(429, 1.0);
    sim.sim.set_faults(faults);
    let err = cs.request_once("listZones", &[]).await.expect_err("429");
    assert_eq!(err.retry_after(), Some(Duration::from_millis(150)));

    // A failed job carries its errortext.
    sim.sim.set_faults(Faults {
        job_failure_rate: 1.0,
        ..Faults::default()
    });
    let (_, job) = cs
        .create_volume("doomed", ZONE_ID, CUSTOM_OFFERING_ID, Some(1))
        .await
        .expect("accepted");
    let err = cs
        .wait_for_job(&job, JobPolling::default())
        .await
        .expect_err("job fails");
    assert!(
        matches!(&err, CloudStackError::JobFailed { code: Some(530), text, .. } if text.contains("injected job failure")),
        "{err:?}"
    );

    // A dropped answer: the call took effect but the client cannot tell.
    let mut faults = Faults::default();
    faults.drop_next.insert("createvolume".into(), 1);
    sim.sim.set_faults(faults);
    let before = sim.sim.volume_count();
    let err = cs
        .create_volume("dropped", ZONE_ID, CUSTOM_OFFERING_ID, Some(1))
        .await
        .expect_err("dropped");
    assert!(!err.was_answered(), "{err:?}");
    assert_eq!(
        sim.sim.volume_count(),
        before + 1,
        "the volume exists anyway"
    );
    assert_eq!(
        sim.sim.call_count("createVolume"),
        2,
        "a dropped mutating call is not retried blindly"
    );
    assert!(sim.sim.calls().iter().any(|c| c.dropped));
}

/// N19: a 429 that asks for a delay past the retry deadline (2 s here) ends the call at once
/// with that error instead of sleeping past the deadline.
#[tokio::test]
async fn a_429_asking_past_the_retry_deadline_is_not_waited_for() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let mut faults = Faults {
        retry_after_ms: 60_000,
        ..Faults::default()
    };
    faults.error_rates.insert(429, 1.0);
    sim.sim.set_faults(faults);
    let started = std::time::Instant::now();
    let err = cs.list_volumes(&[]).await.expect_err("429");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the call ended within the deadline: {:?}",
        started.elapsed()
    );
}

/// N20: only a 431 that says the volume does not exist reads as absent; another 431 (a
/// permission refused, say) is an error, not "no such volume".
#[tokio::test]
async fn only_a_not_found_431_means_absent() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let unknown = VolumeId::new_random();
    assert_eq!(cs.get_volume(unknown).await.expect("answer"), None);
    let refused = CloudStackError::Api {
        command: "listVolumes".into(),
        code: 431,
        cserrorcode: Some(4350),
        text: "The caller does not have permission to access the volume".into(),
    };
    assert!(!refused.is_not_found());
    let unknown_id = CloudStackError::Api {
        command: "listVolumes".into(),
        code: 431,
        cserrorcode: Some(9999),
        text: "Unable to find volume by id x".into(),
    };
    assert!(unknown_id.is_not_found());
}

/// L11: a signed request (key and signature in its URL) never follows a redirect: an endpoint
/// that answers 302 towards the real API gets no second request, and the call is an error.
#[tokio::test]
async fn a_redirect_is_not_followed() {
    let sim = start(fast()).await;
    let target = sim.api_url();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(move || {
        let target = target.clone();
        async move {
            (
                axum::http::StatusCode::FOUND,
                [(axum::http::header::LOCATION, target)],
                "moved",
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (api_key, secret_key) = sim.sim.keys();
    let cs = Client::new(
        Client::http().expect("http"),
        Credentials {
            api_url: format!("http://{addr}/client/api"),
            api_key,
            secret_key: secret_key.into(),
        },
        RetryPolicy {
            deadline: Duration::from_secs(1),
            ..RetryPolicy::default()
        },
    );
    let err = cs.list_volumes(&[]).await.expect_err("a 302 is an error");
    assert_eq!(err.cloudstack_code(), Some(302), "{err:?}");
    assert_eq!(
        sim.sim.call_count("listVolumes"),
        0,
        "nothing reached the API"
    );
}

/// L11: the api key and the signature (valid until `expires`) never travel in a URL, where
/// proxies and access logs keep them: every request of a lifecycle is a POST whose signed
/// parameters are its form body, and the simulator, which verifies signatures over the body
/// exactly as over a query string, admits them all.
#[tokio::test]
async fn no_request_carries_its_key_or_signature_in_the_url() {
    let sim = start(fast()).await;
    let cs = client(&sim);
    let vol = new_volume(&cs, "in-the-body").await;
    let job = cs
        .attach_volume(vol, DEMO_VMS[0], None)
        .await
        .expect("attach");
    cs.wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("attached");
    let job = cs.detach_volume(vol).await.expect("detach");
    cs.wait_for_volume_job(&job, JobPolling::default())
        .await
        .expect("detached");
    cs.delete_volume(vol).await.expect("delete");
    let calls = sim.sim.calls();
    assert!(
        calls.len() >= 7,
        "a whole lifecycle was recorded: {calls:?}"
    );
    for call in &calls {
        assert_eq!(call.status, 200, "admitted: {call:?}");
        assert!(
            call.in_url.is_empty(),
            "{} carried {:?} in its URL",
            call.command,
            call.in_url
        );
        assert!(call.params.contains_key("apikey"), "signed: {call:?}");
    }
}
