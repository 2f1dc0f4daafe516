//! `cloudstack-sim`: serve the CloudStack API simulator on a port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cloudstack_sim::faults::parse_rate;
use cloudstack_sim::{Faults, SimConfig};
use schema::VmId;

/// A CloudStack API simulator: signed requests, async jobs, CloudStack's JSON shapes and
/// errors, fault injection, and guest devices for the host VM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API key clients must send.
    #[arg(long, env = "SIM_API_KEY", default_value = "sim-api-key")]
    api_key: String,
    /// Secret key requests are signed with.
    #[arg(
        long,
        env = "SIM_SECRET_KEY",
        default_value = "sim-secret-key",
        hide_env_values = true
    )]
    secret_key: String,
    /// How long async jobs stay in progress, in milliseconds.
    #[arg(long, env = "SIM_JOB_LATENCY_MS", default_value_t = 200)]
    job_latency_ms: u64,
    /// The VM the daemon runs on: attaching to it creates `block/vdX` under --sysfs-root.
    #[arg(long, env = "SIM_HOST_VM_ID")]
    host_vm_id: Option<VmId>,
    /// Where guest devices of the host VM appear.
    #[arg(long, env = "SIM_SYSFS_ROOT")]
    sysfs_root: Option<PathBuf>,
    /// Where the host VM's by-id links appear, each to a sparse backing file under
    /// <sysfs-root>/backing (give the daemon the same DEVICE_BY_ID_DIR).
    #[arg(long, env = "SIM_BY_ID_DIR")]
    by_id_dir: Option<PathBuf>,
    /// Another VM that exists (repeatable; default: two demo VMs).
    #[arg(long = "vm")]
    vms: Vec<VmId>,
    /// Data disks a VM may have (CloudStack's per-hypervisor limit).
    #[arg(long, default_value_t = cloudstack_sim::state::MAX_DATA_DISKS)]
    max_data_disks: usize,
    /// CloudStack's `kvm.snapshot.enabled`: on, a volume of a running VM can be snapshotted.
    #[arg(long, env = "SIM_KVM_SNAPSHOT_ENABLED")]
    kvm_snapshot_enabled: bool,
    /// Latency added to every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// CODE=RATE: answer this error code to that share of calls (repeatable), e.g. 429=0.3.
    #[arg(long = "error-rate", value_parser = parse_rate)]
    error_rates: Vec<(u16, f64)>,
    /// The delay a 429 asks for, in milliseconds.
    #[arg(long, default_value_t = 100)]
    retry_after_ms: u64,
    /// Share of async jobs that fail.
    #[arg(long, default_value_t = 0.0)]
    job_failure_rate: f64,
    /// Share of mutating calls whose connection drops after they were processed.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = SimConfig {
        api_key: args.api_key,
        secret_key: args.secret_key,
        job_latency: Duration::from_millis(args.job_latency_ms),
        host_vm_id: args.host_vm_id,
        sysfs_root: args.sysfs_root,
        by_id_dir: args.by_id_dir,
        vms: if args.vms.is_empty() {
            cloudstack_sim::DEMO_VMS.to_vec()
        } else {
            args.vms
        },
        max_data_disks: args.max_data_disks,
        kvm_snapshot_enabled: args.kvm_snapshot_enabled,
        faults: Faults {
            latency_ms: args.latency_ms,
            error_rates: args.error_rates.into_iter().collect(),
            retry_after_ms: args.retry_after_ms,
            job_failure_rate: args.job_failure_rate,
            drop_after_processing_rate: args.drop_rate,
            ..Faults::default()
        },
    };
    let vms = config.vms.clone();
    let running = cloudstack_sim::spawn(args.listen, config).await?;
    println!("cloudstack-sim listening on {}", running.api_url());
    println!(
        "zone {}  custom disk offering {}",
        cloudstack_sim::ZONE_ID,
        cloudstack_sim::CUSTOM_OFFERING_ID
    );
    for vm in vms {
        println!("vm {vm}");
    }
    shutdown().await;
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
