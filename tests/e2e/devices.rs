//! Attachments to the host VM: the guest device is found by its serial, never by guesswork;
//! remote attachments need no device; mappings record the truth.

use std::time::Duration;

use cloudstack_sim::{DEMO_VMS, DeviceBehaviour, SimConfig};
use schema::event::AttachMode;
use schema::{ErrorCode, OperationStatus};

use crate::helpers::{TestEnv, cmd};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn four_volumes_of_one_size_attached_at_once_each_get_the_device_with_their_serial() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    // Devices appear a little after each job, in random order.
    env.sim.sim.set_device_behaviour(DeviceBehaviour {
        delay: None,
        jitter: Duration::from_millis(600),
        missing: false,
        ..DeviceBehaviour::default()
    });
    env.start_daemon().await;
    let host = env.host_vm.expect("host vm");
    let volumes: Vec<_> = (0..4)
        .map(|i| env.sim.sim.seed_volume(&format!("same-size-{i}"), 10 << 30))
        .collect();
    let client = env.client().await;

    let mut pending = Vec::new();
    for v in &volumes {
        pending.push(
            client
                .publish(&cmd::attach(*v, host))
                .await
                .expect("published"),
        );
    }
    let mut events = Vec::new();
    for p in pending {
        events.push(p.wait(WAIT).await.expect("event"));
    }

    let mappings = env.mappings().await;
    let mut paths = Vec::new();
    for (v, e) in volumes.iter().zip(&events) {
        assert_eq!(
            e.event_type, "volume.attach.completed",
            "{:?}",
            e.data.error
        );
        assert_eq!(e.data.mode, Some(AttachMode::Host));
        let device = env
            .sim
            .sim
            .device_name(*v)
            .expect("the simulator made a device");
        let path = format!("/dev/{device}");
        assert_eq!(
            e.data.device_path.as_deref(),
            Some(path.as_str()),
            "volume {v} got another volume's device"
        );
        let serial = std::fs::read_to_string(env.sysfs.join("block").join(&device).join("serial"))
            .expect("serial");
        assert_eq!(serial.trim(), v.disk_serial());
        assert!(
            e.data
                .by_id_path
                .as_deref()
                .is_some_and(|p| p.ends_with(&format!("virtio-{}", v.disk_serial())))
        );
        let m = &mappings[&v.to_string()];
        assert_eq!(
            (
                m.mode.as_str(),
                m.device_path.as_deref(),
                m.linux_state.as_str()
            ),
            ("oma", Some(path.as_str()), "present")
        );
        paths.push(path);
    }
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 4, "four distinct devices");
}

#[tokio::test]
async fn a_device_that_appears_before_the_job_reports_success_is_still_matched() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    env.sim.sim.set_device_behaviour(DeviceBehaviour {
        delay: Some(Duration::from_millis(100)),
        ..DeviceBehaviour::default()
    });
    env.start_daemon().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("early-device", 1 << 30);

    let event = env.execute(&cmd::attach(volume, host)).await;

    assert_eq!(
        event.event_type, "volume.attach.completed",
        "{:?}",
        event.data.error
    );
    let device = env.sim.sim.device_name(volume).expect("device");
    assert_eq!(event.data.device_path, Some(format!("/dev/{device}")));
    assert!(
        event.data.duration_ms >= 1400,
        "the device was there long before the job ended"
    );
}

#[tokio::test]
async fn without_a_device_the_attach_fails_within_the_timeout_and_the_mapping_says_missing() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    env.sim.sim.set_device_behaviour(DeviceBehaviour {
        missing: true,
        ..DeviceBehaviour::default()
    });
    env.extra_env
        .push(("CORRELATION_TIMEOUT_S".into(), "2".into()));
    env.start_daemon().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("no-device", 1 << 30);
    // A device of someone else shows up meanwhile: it is named, not taken.
    let root = env.sysfs.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cloudstack_sim::sysfs::create_device(
            &root,
            &cloudstack_sim::sysfs::Disk::virtio("vdq", "ffffffffffffffffffff", 1 << 30, 99),
        )
        .expect("stranger");
    });

    let started = tokio::time::Instant::now();
    let event = env.execute(&cmd::attach(volume, host)).await;
    let took = started.elapsed();

    assert_eq!(event.data.status, OperationStatus::Failed);
    let error = event.data.error.expect("error");
    assert_eq!(error.code, ErrorCode::DeviceCorrelationTimeout);
    assert!(
        error.message.contains("vdq (serial ffffffffffffffffffff"),
        "names the candidates: {}",
        error.message
    );
    assert!(
        took < Duration::from_secs(3),
        "failed after {took:?}; the timeout is 2 s"
    );
    assert_eq!(event.data.device_path, None);
    let m = &env.mappings().await[&volume.to_string()];
    assert_eq!(
        (
            m.cloudstack_state.as_str(),
            m.linux_state.as_str(),
            m.device_path.as_deref()
        ),
        ("attached", "missing", None)
    );
}

#[tokio::test]
async fn three_volumes_on_one_remote_vm_coexist() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let vm = DEMO_VMS[1];
    let volumes: Vec<_> = (0..3)
        .map(|i| env.sim.sim.seed_volume(&format!("remote-{i}"), 1 << 30))
        .collect();

    for v in &volumes {
        let e = env.execute(&cmd::attach(*v, vm)).await;
        assert_eq!(
            e.event_type, "volume.attach.completed",
            "{:?}",
            e.data.error
        );
        assert_eq!(
            (e.data.mode, e.data.device_path.clone()),
            (Some(AttachMode::Remote), None)
        );
    }

    let mappings = env.mappings().await;
    assert_eq!(mappings.len(), 3);
    for v in &volumes {
        let m = &mappings[&v.to_string()];
        assert_eq!(
            (m.vm_id.as_str(), m.mode.as_str(), m.device_path.as_deref()),
            (vm.to_string().as_str(), "failover", None)
        );
    }
}

#[tokio::test]
async fn the_monitor_keeps_mappings_true_when_a_device_vanishes_and_returns() {
    let mut env = TestEnv::with_host_vm(SimConfig {
        job_latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    env.extra_env
        .push(("DEVICE_POLL_INTERVAL_MS".into(), "50".into()));
    env.start_daemon().await;
    let host = env.host_vm.expect("host vm");
    let volume = env.sim.sim.seed_volume("flaky", 1 << 30);
    let e = env.execute(&cmd::attach(volume, host)).await;
    let path = e.data.device_path.expect("device");
    let name = path.trim_start_matches("/dev/").to_owned();
    let key = volume.to_string();

    cloudstack_sim::sysfs::remove_device(&env.sysfs, &name).expect("vanish");
    let m = wait_mapping(&mut env, &key, |m| m.linux_state == "missing").await;
    assert_eq!(m.device_path, None);

    cloudstack_sim::sysfs::create_device(
        &env.sysfs,
        &cloudstack_sim::sysfs::Disk::virtio("vdx", &volume.disk_serial(), 1 << 30, 42),
    )
    .expect("return");
    let m = wait_mapping(&mut env, &key, |m| m.linux_state == "present").await;
    assert_eq!(m.device_path.as_deref(), Some("/dev/vdx"));

    let metrics = crate::helpers::get_text(env.http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"volume_daemon_device_events_total{result="removed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"volume_daemon_correlation_latency_seconds_count 1"#),
        "{metrics}"
    );

    // Detach removes the mapping.
    let e = env.execute(&cmd::detach(volume)).await;
    assert_eq!(e.event_type, "volume.detach.completed");
    assert!(env.mappings().await.is_empty());
}

async fn wait_mapping(
    env: &mut TestEnv,
    volume: &str,
    check: impl Fn(&crate::helpers::MappingRow) -> bool,
) -> crate::helpers::MappingRow {
    for _ in 0..100 {
        if let Some(m) = env.mappings().await.get(volume)
            && check(m)
        {
            return m.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "mapping of {volume} never reached the expected state: {:?}",
        env.mappings().await.get(volume)
    );
}

/// `/ready`'s `device_monitor_mode`: on the kernel's `/sys` the monitor listens to uevents;
/// switched off (`DEVICE_UEVENTS=off`), or on a test's own sysfs tree (where no uevents come),
/// it polls.
#[tokio::test]
async fn ready_says_uevents_on_the_kernels_sysfs_and_polling_when_switched_off_or_on_a_fake_tree() {
    let mode = |body: &serde_json::Value| body["components"]["device_monitor_mode"].clone();
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let (_, body) = env.get_json("/ready").await;
    assert_eq!(mode(&body), "polling", "a fake tree: {body}");
    env.stop_daemon().await;

    env.extra_env.push(("SYSFS_ROOT".into(), "/sys".into()));
    env.start_daemon().await;
    let (status, body) = env.get_json("/ready").await;
    assert_eq!((status, mode(&body)), (200, "uevents".into()), "{body}");
    env.stop_daemon().await;

    env.extra_env.push(("DEVICE_UEVENTS".into(), "off".into()));
    env.start_daemon().await;
    let (status, body) = env.get_json("/ready").await;
    assert_eq!((status, mode(&body)), (200, "polling".into()), "{body}");
}

/// L10: a sysfs read that never returns (a FIFO as a device's `size`, as a hung device would
/// behave) holds one blocking thread, not the daemon: `/health` answers within a second all
/// along, a create completes, and SIGTERM still ends the process in time.
#[tokio::test]
async fn a_hung_sysfs_read_stalls_neither_the_daemon_nor_its_exit() {
    let mut env = TestEnv::new().await;
    env.start_daemon().await;
    let hung = env.sysfs.join("block").join("vdz");
    std::fs::create_dir_all(&hung).expect("device dir");
    let made = std::process::Command::new("mkfifo")
        .arg(hung.join("size"))
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo");
    // A few scan periods: the next scan is stuck reading the FIFO.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    for _ in 0..20 {
        let health = http
            .get(format!("http://{}/health", env.http_addr))
            .send()
            .await
            .expect("/health answers within a second");
        assert!(health.status().is_success(), "{health:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = env
        .execute(&cmd::create("beside-a-hung-read", "1GiB"))
        .await;
    assert_eq!(event.data.status, OperationStatus::Completed, "{event:?}");

    let took = env.stop_daemon().await;
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
}
