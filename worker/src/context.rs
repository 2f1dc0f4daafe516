//! What every operation needs, built once per active period and shared.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use cloudstack::response::JobId;
use schema::{CommandId, VmId, VolumeId};

use crate::cloud::{Cloud, Session};
use crate::db::store::{Store, StoreError};
use crate::devices::Devices;
use crate::host::HostFiles;
use crate::metrics::Metrics;
use crate::model::{Halt, Operation, Terminal};
use crate::retry::{self, GaveUp};

#[derive(Debug)]
pub(crate) struct Context {
    pub store: Store,
    pub cloud: Cloud,
    pub metrics: Arc<Metrics>,
    /// The device monitor's output, for attachments to the host VM.
    pub devices: Devices,
    /// How long an attach to the host VM waits for its device.
    pub correlation_timeout: Duration,
    /// How long a resumed create with no recorded job waits before it looks for its volume.
    pub create_resume_settle: Duration,
    /// Persistent names and NBD exports of host attachments.
    pub host: HostFiles,
    /// Fires on SIGTERM, and when this instance loses the execution lease.
    pub halt: CancellationToken,
    /// Cancelled by a write that found the lease taken over: the active period must fence
    /// itself at once, without waiting for its next renewal.
    pub fenced: CancellationToken,
    /// One attach or detach at a time per VM (docs/wire.md (processing rule 4)).
    pub vm_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Context {
    /// Runs a database call an operation cannot go on without, with the persistent retry
    /// policy ([`retry::persistent`]): retried while the database is unreachable. `Err` when
    /// shutdown comes first, when the write was fenced (another instance holds the lease; this
    /// period is then fenced at once), or on a permanent error: the operation's row is then
    /// still pending or executing, and whoever is active resumes it.
    pub(crate) async fn db<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Halt>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        retry::persistent(what, &self.halt, None, call)
            .await
            .map_err(|e| {
                let why = match e {
                    GaveUp::Stopped => format!("stopped before it could {what}"),
                    GaveUp::Fenced(_) => {
                        self.fenced.cancel();
                        format!("fenced before it could {what}")
                    }
                    GaveUp::Permanent(_) => format!("permanent database error: cannot {what}"),
                };
                Halt::Interrupted(why)
            })
    }

    /// The CloudStack access in force now. Reading `ossea_configs` has the persistent policy: a database that is down delays the operation (it never fails it with
    /// `INTERNAL`), and a shutdown interrupts it.
    pub(crate) async fn session(&self) -> Result<Session, Halt> {
        if !self.cloud.needs_config_row() {
            // The environment names the endpoint, keys, zone and host VM: nothing to read.
            return Ok(self.cloud.session(None)?);
        }
        let row = self
            .db("read ossea_configs", || async {
                Ok(self.store.active_config().await?)
            })
            .await?;
        Ok(self.cloud.session(row)?)
    }

    /// Stores the job id of `op` before it is polled, so a restart resumes the job instead of
    /// starting another.
    pub(crate) async fn record_job(
        &self,
        op: &mut Operation,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), Halt> {
        self.store_job(op.id(), volume, job).await?;
        op.job_id = Some(job.clone());
        op.volume_id = volume.or(op.volume_id);
        Ok(())
    }

    /// Commits `job` (and `volume`) as operation `id`'s, with the persistent retry policy.
    pub(crate) async fn store_job(
        &self,
        id: &CommandId,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), Halt> {
        self.db(&format!("record job {job}"), || {
            self.store.record_job(id, volume, job)
        })
        .await
    }

    /// Waits for `vm`'s attach/detach lock.
    /// Locks no longer held or awaited by anyone are dropped on the way, so the map holds only
    /// the VMs with an attach or detach in progress (not every VM id ever seen).
    pub(crate) async fn lock_vm(&self, vm: VmId) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(vm).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Takes `vm`'s attach/detach lock for `op` until its outcome is committed (once: a run
    /// after a refused key holds it already).
    pub(crate) async fn hold_vm(&self, op: &mut Operation, vm: VmId) {
        if !op.held.holds_vm(vm) {
            let guard = self.lock_vm(vm).await;
            op.held.hold_vm(vm, guard);
        }
    }

    /// Takes the host files' lock for `op` until its outcome is committed: before it changes a
    /// persistent name or an export.
    pub(crate) async fn hold_host_files(&self, op: &mut Operation) {
        if !op.held.holds_host_files() {
            let guard = self.host.lock().await;
            op.held.hold_host_files(guard);
        }
    }

    /// The device scan period.
    pub(crate) fn devices_period(&self) -> Duration {
        self.devices.period()
    }

    /// Runs `work` unless shutdown comes first. Waiting on CloudStack is interrupted this way
    /// once the job id is stored: that is a safe point to resume from.
    pub(crate) async fn until_shutdown<T>(
        &self,
        what: &str,
        work: impl Future<Output = T>,
    ) -> Result<T, Halt> {
        tokio::select! {
            () = self.halt.cancelled() => Err(Halt::Interrupted(format!("shut down while {what}"))),
            out = work => Ok(out),
        }
    }

    /// Commits the end of `op` (its row, mapping change and event), retrying while the
    /// database is down, then wakes the relay. When shutdown comes first nothing is lost: the
    /// row is still pending or executing and resumes later.
    pub(crate) async fn finish(&self, op: &Operation, terminal: Terminal) {
        let written = self
            .db("record the outcome", || self.store.finish(op, &terminal))
            .await;
        if written.is_err() {
            tracing::warn!("stopped before the outcome was recorded; it resumes later");
        }
    }
}
