//! `cloudstack-sim`: a CloudStack API simulator for volume-daemon's demo and tests.
//!
//! It serves the API subset the daemon uses at `/client/api`, verifying signatures exactly as
//! CloudStack does (docs/cloudstack.md), answering with CloudStack's JSON shapes, running
//! async jobs that finish after `job_latency`, and returning CloudStack's error codes.
//!
//! Beside the API, `/sim/*` serves the test controls: `GET /sim/calls` lists every API call
//! received (command, parameters, times, status), `GET|POST /sim/faults` reads or replaces the
//! fault injection, `POST /sim/keys` rotates the keys, `POST /sim/vms` adds a VM.
//!
//! # Layout
//! - [`api`]: the HTTP surface: parameter parsing, signature checks, faults, dispatch.
//! - [`state`]: zones, disk offerings, VMs, volumes and jobs, held in memory.
//! - [`faults`]: injected latency, errors, job failures and dropped connections.
//! - [`sysfs`]: the guest devices of volumes attached to the host VM.

pub mod api;
pub mod faults;
pub mod state;
pub mod sysfs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use schema::{DiskOfferingId, VmId, ZoneId};
use uuid::uuid;

pub use faults::{Faults, SlowCall};
pub use state::{ByIdLinks, CallRecord, DeviceBehaviour, Sim};

/// The zone every simulator serves.
pub const ZONE_ID: ZoneId = ZoneId::from_uuid(uuid!("5f0a3c1e-7d2b-4e8a-9c61-2b7f4d9e0a11"));
/// A customized disk offering (any size).
pub const CUSTOM_OFFERING_ID: DiskOfferingId =
    DiskOfferingId::from_uuid(uuid!("a1b2c3d4-0000-4000-8000-00000000c0de"));
/// A fixed 5 GiB disk offering.
pub const FIXED_OFFERING_ID: DiskOfferingId =
    DiskOfferingId::from_uuid(uuid!("a1b2c3d4-0000-4000-8000-000000000005"));

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub api_key: String,
    pub secret_key: String,
    /// How long an async job stays in progress.
    pub job_latency: Duration,
    /// The VM the daemon runs on: attaching to it creates a guest device under `sysfs_root`.
    pub host_vm_id: Option<VmId>,
    /// Where guest devices of the host VM appear (`block/vdX`).
    pub sysfs_root: Option<PathBuf>,
    /// With a sysfs root: where the host VM's by-id links appear (`virtio-<serial>`), each to
    /// a sparse backing file of the volume's size (`<sysfs_root>/backing/<volume_id>.img`), so
    /// a client can write through the whole chain. The file stays across detaches (it is the
    /// volume's content) and goes with the volume.
    pub by_id_dir: Option<PathBuf>,
    /// Other VMs that exist.
    pub vms: Vec<VmId>,
    /// Faults in force at start.
    pub faults: Faults,
    /// Data disks a VM may have: CloudStack's `max_data_volumes_limit` of the hypervisor
    /// (6 for the oldest ones, which is the default here).
    pub max_data_disks: usize,
    /// CloudStack's global setting `kvm.snapshot.enabled` (off by default, as in CloudStack):
    /// off, a snapshot of a volume whose VM is running fails (errorcode 530).
    pub kvm_snapshot_enabled: bool,
}

/// Two VMs every simulator knows unless told otherwise, so the demo can attach something.
pub const DEMO_VMS: [VmId; 2] = [
    VmId::from_uuid(uuid!("7e3f0c52-1a4b-4c8d-9e2f-000000000001")),
    VmId::from_uuid(uuid!("7e3f0c52-1a4b-4c8d-9e2f-000000000002")),
];

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: "sim-api-key".into(),
            secret_key: "sim-secret-key".into(),
            job_latency: Duration::from_millis(200),
            host_vm_id: None,
            sysfs_root: None,
            by_id_dir: None,
            vms: DEMO_VMS.to_vec(),
            faults: Faults::default(),
            max_data_disks: state::MAX_DATA_DISKS,
            kvm_snapshot_enabled: false,
        }
    }
}

/// A simulator serving on a real port.
#[derive(Debug)]
pub struct RunningSim {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningSim {
    /// The API endpoint, as `CLOUDSTACK_API_URL` takes it.
    pub fn api_url(&self) -> String {
        format!("http://{}/client/api", self.addr)
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` (port 0 picks a free one) and serves until the returned value is dropped.
pub async fn spawn(addr: SocketAddr, config: SimConfig) -> std::io::Result<RunningSim> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let sim = Arc::new(Sim::new(config));
    let app = api::router(sim.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "simulator server stopped");
        }
    });
    Ok(RunningSim { addr, sim, task })
}
