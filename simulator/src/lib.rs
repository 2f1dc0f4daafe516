//! `cloudstack-sim`: a CloudStack API simulator for volume-daemon's demo and tests.
//!
//! It serves the API subset the daemon uses at `/client/api`, verifying signatures exactly as
//! CloudStack does (shared/CLOUDSTACK.md §1), answering with CloudStack's JSON shapes, running
//! async jobs that finish after `job_latency`, and returning CloudStack's error codes.
//!
//! Beside the API, `/sim/calls` lists every API call received (command, parameters, time,
//! HTTP status), so tests can count side effects.
//!
//! # Layout
//! - [`api`]: the HTTP surface: parameter parsing, signature checks, dispatch.
//! - [`state`]: zones, disk offerings, volumes and jobs, held in memory.

pub mod api;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use schema::{DiskOfferingId, ZoneId};
use uuid::uuid;

pub use state::{CallRecord, Sim};

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
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: "sim-api-key".into(),
            secret_key: "sim-secret-key".into(),
            job_latency: Duration::from_millis(200),
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
