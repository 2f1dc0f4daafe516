//! The self-checks `/ready` reports, not gating readiness (docs/http.md): can the daemon reach
//! CloudStack with its keys (`cloudstack`), and is `HOST_VM_ID` really the VM it runs on
//! (`host_vm`: the host VM's root disk serial, from `listVolumes`, must be among the local
//! devices; the old daemon's worst bug was a wrong host VM id turning every host attach into a
//! silent remote one). Run in both roles, every `SELF_CHECK_INTERVAL_S`; each result is
//! published on a watch channel that the HTTP handler reads. Only `listZones` and
//! `listVolumes` are called.

use std::time::Duration;

use sqlx::MySqlPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use schema::{ErrorCode, VmId};

use crate::cloud::{Cloud, Session, classify};
use crate::db::configs;
use crate::devices::Devices;
use crate::metrics::Metrics;

/// `cloudstack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloudState {
    Up,
    Down,
    Unauthorized,
}

/// `host_vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostVmState {
    Ok,
    Mismatch,
    /// No host VM configured, or CloudStack unreachable.
    Unknown,
}

/// The last results (before the first check: CloudStack down, host VM unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checks {
    pub cloudstack: CloudState,
    pub host_vm: HostVmState,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            cloudstack: CloudState::Down,
            host_vm: HostVmState::Unknown,
        }
    }
}

impl CloudState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Unauthorized => "unauthorized",
        }
    }
}

impl HostVmState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Mismatch => "mismatch",
            Self::Unknown => "unknown",
        }
    }
}

/// What the checker needs.
#[derive(Debug, Clone)]
pub(crate) struct Checker {
    pub cloud: Cloud,
    pub pool: MySqlPool,
    pub devices: Devices,
    pub metrics: std::sync::Arc<Metrics>,
    pub period: Duration,
}

/// How long reading `ossea_configs` may take in a check.
const CONFIG_READ_LIMIT: Duration = Duration::from_secs(3);

impl Checker {
    /// Checks every period until `stop`; the first check runs at once.
    pub(crate) async fn run(self, out: watch::Sender<Checks>, stop: CancellationToken) {
        let mut last: Option<Checks> = None;
        loop {
            let checks = tokio::select! {
                () = stop.cancelled() => return,
                c = self.check() => c,
            };
            if last != Some(checks) {
                tracing::info!(
                    cloudstack = checks.cloudstack.as_str(),
                    host_vm = checks.host_vm.as_str(),
                    "self-check"
                );
            }
            self.metrics
                .set_self_checks(checks.cloudstack.as_str(), checks.host_vm.as_str());
            last = Some(checks);
            out.send_replace(checks);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.period) => {}
            }
        }
    }

    async fn check(&self) -> Checks {
        // An unreadable database leaves only the environment's credentials to check with.
        let row = match tokio::time::timeout(CONFIG_READ_LIMIT, configs::active(&self.pool)).await {
            Ok(Ok(row)) => row,
            _ => None,
        };
        let session = match self.cloud.probe_session(row) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e.message, "self-check: no usable CloudStack configuration");
                return Checks::default();
            }
        };
        let cloudstack = match session.client.list_zones().await {
            Ok(_) => CloudState::Up,
            Err(e) if classify(&e).code == ErrorCode::CloudstackUnauthorized => {
                tracing::warn!(error = %e, "self-check: CloudStack refuses the daemon's keys");
                CloudState::Unauthorized
            }
            Err(e) => {
                tracing::warn!(error = %e, "self-check: CloudStack is unreachable");
                CloudState::Down
            }
        };
        let host_vm = match (cloudstack, session.host_vm) {
            (CloudState::Up, Some(vm)) => self.host_vm(&session, vm).await,
            _ => HostVmState::Unknown,
        };
        Checks {
            cloudstack,
            host_vm,
        }
    }

    /// Whether the root disk CloudStack lists for `vm` is a local device.
    async fn host_vm(&self, session: &Session, vm: VmId) -> HostVmState {
        let listed = session
            .client
            .list_volumes(&[
                ("virtualmachineid", vm.to_string()),
                ("type", "ROOT".into()),
            ])
            .await;
        let volumes = match listed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, host_vm = %vm, "self-check: cannot list the host VM's volumes");
                return HostVmState::Unknown;
            }
        };
        let Some(root) = volumes
            .iter()
            .find(|v| v.is_root() && v.virtualmachineid == Some(vm))
        else {
            tracing::error!(host_vm = %vm, "HOST_VM_ID names a VM for which CloudStack lists no root disk: it is not the VM this daemon runs on, and every attach to the real host VM would be mistaken for a remote one");
            return HostVmState::Mismatch;
        };
        let serial = root.id.disk_serial();
        let table = self.devices.table();
        let local: Vec<&str> = table
            .devices
            .values()
            .filter_map(|p| p.device.serial.as_deref())
            .collect();
        if local.contains(&serial.as_str()) {
            HostVmState::Ok
        } else {
            tracing::error!(
                host_vm = %vm,
                root_volume = %root.id,
                expected_serial = serial,
                local_serials = ?local,
                "host VM mismatch: the root disk of HOST_VM_ID {vm} (volume {}) is not among this machine's devices; HOST_VM_ID is probably wrong, and every attach to the real host VM would be mistaken for a remote one",
                root.id
            );
            HostVmState::Mismatch
        }
    }
}
