//! Device monitor benchmark (not a test): run with
//! `cargo bench -p worker --bench device_monitor`.
//!
//! 1. CPU time of one scan of 64 devices (`Monitor::step`), from the thread's on-CPU
//!    nanoseconds in `/proc/thread-self/schedstat`. Target: ≤ 1 ms.
//! 2. Detection latency at the default period (250 ms): device created → `Added` event
//!    received, over many devices created at random phases. Target: p99 ≤ period + 50 ms.
//! 3. The same on real loop devices (`losetup` of sparse files; root needed), the monitor on
//!    the real `/sys` with a filter admitting only this run's devices, in both modes in one
//!    run: polling only, and kernel uevents (the periodic scan as the safety net). Measured
//!    from just before `losetup` starts to the `Added` event (so `losetup`'s own few
//!    milliseconds count in both). Target: uevent p99 ≤ 0.1 × polling p99.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use worker::devices::loops::Loops;
use worker::devices::uevents::UeventSocket;
use worker::devices::{DeviceChange, Monitor};

const DEVICES: usize = 64;
const SCANS: usize = 2000;
const LATENCY_SAMPLES: usize = 60;
const PERIOD: Duration = Duration::from_millis(250);
const LOOP_SAMPLES: usize = 40;

/// Nanoseconds this thread has spent on a CPU.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn tree() -> PathBuf {
    let root = std::env::temp_dir().join(format!("vd-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("block")).expect("tree");
    root
}

fn name(i: usize) -> String {
    let letters = |i: usize| {
        if i < 26 {
            ((b'a' + i as u8) as char).to_string()
        } else {
            format!(
                "{}{}",
                (b'a' + (i / 26 - 1) as u8) as char,
                (b'a' + (i % 26) as u8) as char
            )
        }
    };
    format!("vd{}", letters(i + 1))
}

fn populate(root: &Path, n: usize) {
    for i in 0..n {
        let serial = format!("{:020x}", i + 1);
        cloudstack_sim::sysfs::create_device(
            root,
            &cloudstack_sim::sysfs::Disk::virtio(&name(i), &serial, 10 << 30, 4 + i as u32),
        )
        .expect("device");
    }
}

fn scan_cpu() -> (f64, f64) {
    let root = tree();
    populate(&root, DEVICES);
    let mut monitor = Monitor::new(root.clone(), PERIOD);
    monitor.step(); // the first scan adds everything
    let cpu0 = thread_cpu_ns();
    let wall0 = Instant::now();
    for _ in 0..SCANS {
        let events = monitor.step();
        assert!(events.is_empty());
    }
    let cpu_per_scan_us = (thread_cpu_ns() - cpu0) as f64 / SCANS as f64 / 1000.0;
    let wall_per_scan_us = wall0.elapsed().as_secs_f64() * 1e6 / SCANS as f64;
    let _ = std::fs::remove_dir_all(&root);
    (cpu_per_scan_us, wall_per_scan_us)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn detection_latency() -> Vec<Duration> {
    let root = tree();
    populate(&root, DEVICES - 1);
    let monitor = Monitor::new(root.clone(), PERIOD);
    let mut events = monitor.events().subscribe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(monitor.run(stop.clone()));
    tokio::time::sleep(PERIOD * 2).await;
    while events.try_recv().is_ok() {}

    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        // A random phase against the scan period.
        let pause = rand::rng().random_range(0..PERIOD.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let dev = name(DEVICES - 1);
        let created = Instant::now();
        let serial = format!("{:020x}", 1000 + i);
        let disk = cloudstack_sim::sysfs::Disk::virtio(&dev, &serial, 1 << 30, 900);
        cloudstack_sim::sysfs::create_device(&root, &disk).expect("device");
        loop {
            let e = events.recv().await.expect("event");
            if e.device.name == dev && e.change == DeviceChange::Added {
                samples.push(created.elapsed());
                break;
            }
        }
        cloudstack_sim::sysfs::remove_device(&root, &dev).expect("remove");
        loop {
            let e = events.recv().await.expect("event");
            if e.device.name == dev && e.change == DeviceChange::Removed {
                break;
            }
        }
    }
    stop.cancel();
    let _ = task.await;
    let _ = std::fs::remove_dir_all(&root);
    samples.sort();
    samples
}

/// Detection latency of real loop devices, in uevent mode or polling only.
async fn loop_latency(uevents: bool) -> Vec<Duration> {
    let mut loops = Loops::new();
    let mut monitor = Monitor::new(PathBuf::from("/sys"), PERIOD).with_filter(loops.filter());
    if uevents {
        monitor = monitor.with_uevents(UeventSocket::open().expect("a uevent socket"));
    }
    let mut events = monitor.events().subscribe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(monitor.run(stop.clone()));
    tokio::time::sleep(PERIOD * 2).await;
    let mut samples = Vec::with_capacity(LOOP_SAMPLES);
    for _ in 0..LOOP_SAMPLES {
        let pause = rand::rng().random_range(0..PERIOD.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let started = Instant::now();
        let name = loops.attach(1).await.remove(0);
        loop {
            let e = events.recv().await.expect("event");
            if e.device.name == name && e.change == DeviceChange::Added {
                samples.push(e.seen.into_std().saturating_duration_since(started));
                break;
            }
        }
        loops.detach().await;
        loop {
            let e = events.recv().await.expect("event");
            if e.device.name == name && e.change == DeviceChange::Removed {
                break;
            }
        }
    }
    stop.cancel();
    let _ = task.await;
    samples.sort();
    samples
}

fn main() {
    println!(
        "device monitor benchmark: {DEVICES} devices, period {} ms",
        PERIOD.as_millis()
    );
    let (cpu_us, wall_us) = scan_cpu();
    println!(
        "scan of {DEVICES} devices ({SCANS} scans): {cpu_us:.1} µs CPU, {wall_us:.1} µs wall per scan  (target ≤ 1000 µs CPU)"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let samples = rt.block_on(detection_latency());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = percentile(&samples, 0.50);
    let p99 = percentile(&samples, 0.99);
    let max = samples[samples.len() - 1];
    println!(
        "detection latency ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms  (target p99 ≤ {} ms)",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(max),
        PERIOD.as_millis() + 50
    );
    let polling = rt.block_on(loop_latency(false));
    let uevents = rt.block_on(loop_latency(true));
    let line = |what: &str, s: &[Duration]| {
        println!(
            "loop devices, {what} ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.len(),
            ms(percentile(s, 0.5)),
            ms(percentile(s, 0.99)),
            ms(s[s.len() - 1])
        )
    };
    line("polling only", &polling);
    line("uevents", &uevents);
    let ratio = ms(percentile(&uevents, 0.99)) / ms(percentile(&polling, 0.99));
    println!("uevent p99 / polling p99 = {ratio:.3}  (target ≤ 0.100)");

    let ok_cpu = cpu_us <= 1000.0;
    let ok_latency = p99 <= PERIOD + Duration::from_millis(50)
        && percentile(&polling, 0.99) <= PERIOD + Duration::from_millis(50);
    let ok_uevents = ratio <= 0.1;
    println!(
        "result: scan CPU {}, detection p99 {}, uevents {}",
        if ok_cpu {
            "within target"
        } else {
            "OVER TARGET"
        },
        if ok_latency {
            "within target"
        } else {
            "OVER TARGET"
        },
        if ok_uevents {
            "within target"
        } else {
            "OVER TARGET"
        }
    );
}
