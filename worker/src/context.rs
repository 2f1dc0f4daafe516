//! What every operation needs, built once per active period and shared.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use cloudstack::response::JobId;
use schema::{VmId, VolumeId};

use crate::cloud::{Cloud, Session};
use crate::db::configs;
use crate::db::is_permanent;
use crate::db::store::{Store, StoreError};
use crate::devices::Devices;
use crate::host::HostFiles;
use crate::mappings::MappingChange;
use crate::metrics::Metrics;
use crate::model::{Halt, Operation, Outcome};

#[derive(Debug)]
pub struct Context {
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
    /// Wakes the relay when an outbox row was committed.
    pub relay_wakeup: Arc<Notify>,
    /// Fires on SIGTERM, and when this instance loses the execution lease.
    pub shutdown: CancellationToken,
    /// Cancelled by a write that found the lease taken over: the active period must fence
    /// itself at once, without waiting for its next renewal.
    pub fenced: CancellationToken,
    /// One attach or detach at a time per VM (docs/wire.md (processing rule 4)).
    pub vm_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A permanent database error is tried this many times in a row, then given up.
const PERMANENT_ATTEMPTS: u32 = 3;

/// How long to wait between attempts to write to an unreachable database.
const DB_RETRY: Duration = Duration::from_millis(500);

impl Context {
    /// Runs a database write until it succeeds, waiting between attempts while the database
    /// is unreachable. `Err` when shutdown comes first, or when the write was fenced (another
    /// instance holds the lease): the operation's row is then still pending or executing, and
    /// whoever is active resumes it.
    pub async fn write<T, F, Fut>(&self, what: &str, write: F) -> Result<T, Halt>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut permanent = 0;
        loop {
            match write().await {
                Ok(done) => return Ok(done),
                Err(StoreError::Db(e))
                    if is_permanent(&e) && permanent + 1 >= PERMANENT_ATTEMPTS =>
                {
                    // Retrying cannot help (a schema mismatch, a value the column refuses): stop
                    // here; the row keeps its state and the operation resumes at the next start.
                    tracing::error!(error = %e, attempts = PERMANENT_ATTEMPTS, "cannot {what}: permanent database error; giving up until the next start");
                    return Err(Halt::Interrupted(format!(
                        "permanent database error: cannot {what}"
                    )));
                }
                Err(StoreError::Fenced(f)) => {
                    tracing::error!(error = %f, "write refused: cannot {what}; fencing this instance");
                    self.fenced.cancel();
                    return Err(Halt::Interrupted(format!("fenced before it could {what}")));
                }
                Err(StoreError::Db(e)) => {
                    permanent = if is_permanent(&e) { permanent + 1 } else { 0 };
                    tracing::warn!(error = %e, "cannot {what}; retrying");
                    tokio::select! {
                        () = self.shutdown.cancelled() => {
                            return Err(Halt::Interrupted(format!("stopped before it could {what}")));
                        }
                        () = tokio::time::sleep(DB_RETRY) => {}
                    }
                }
            }
        }
    }

    /// A read an operation cannot go on without: the policy of [`Context::write`].
    pub async fn read<T, F, Fut>(&self, what: &str, read: F) -> Result<T, Halt>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.write(what, read).await
    }

    /// The CloudStack access in force now. Reading `ossea_configs` has the policy of the
    /// writes: a database that is down delays the operation (it never fails it with
    /// `INTERNAL`), and a shutdown interrupts it.
    pub async fn session(&self) -> Result<Session, Halt> {
        if !self.cloud.needs_config_row() {
            // The environment names the endpoint, keys, zone and host VM: nothing to read.
            return Ok(self.cloud.session(None)?);
        }
        let row = self
            .read("read ossea_configs", || async {
                Ok(configs::active(self.store.pool()).await?)
            })
            .await?;
        Ok(self.cloud.session(row)?)
    }

    /// Stores the job id of `op` before it is polled, so a restart resumes the job instead of
    /// starting another.
    pub async fn record_job(
        &self,
        op: &mut Operation,
        volume: Option<VolumeId>,
        job: &JobId,
    ) -> Result<(), Halt> {
        let id = op.id().clone();
        self.write(&format!("record job {job}"), || {
            self.store.record_job(&id, volume, job)
        })
        .await?;
        op.job_id = Some(job.clone());
        op.volume_id = volume.or(op.volume_id);
        Ok(())
    }

    /// Waits for `vm`'s attach/detach lock.
    /// Locks no longer held or awaited by anyone are dropped on the way, so the map holds only
    /// the VMs with an attach or detach in progress (not every VM id ever seen).
    pub async fn lock_vm(&self, vm: VmId) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(vm).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Takes `vm`'s attach/detach lock for `op` until its outcome is committed (once: a run
    /// after a refused key holds it already).
    pub async fn hold_vm(&self, op: &mut Operation, vm: VmId) {
        if !op.held.holds_vm(vm) {
            let guard = self.lock_vm(vm).await;
            op.held.hold_vm(vm, guard);
        }
    }

    /// Takes the host files' lock for `op` until its outcome is committed: before it changes a
    /// persistent name or an export.
    pub async fn hold_host_files(&self, op: &mut Operation) {
        if !op.held.holds_host_files() {
            let guard = self.host.lock().await;
            op.held.hold_host_files(guard);
        }
    }

    /// The device scan period.
    pub fn devices_period(&self) -> Duration {
        self.devices.period()
    }

    /// Runs `work` unless shutdown comes first. Waiting on CloudStack is interrupted this way
    /// once the job id is stored: that is a safe point to resume from.
    pub async fn until_shutdown<T>(
        &self,
        what: &str,
        work: impl Future<Output = T>,
    ) -> Result<T, Halt> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(Halt::Interrupted(format!("shut down while {what}"))),
            out = work => Ok(out),
        }
    }

    /// Commits the outcome of `op`, its mapping change and its event, retrying while the
    /// database is down, then wakes the relay. When shutdown comes first nothing is lost: the
    /// row is still pending or executing and resumes later.
    pub async fn finish(&self, op: &Operation, outcome: Outcome, mapping: Option<MappingChange>) {
        let written = self
            .write("record the outcome", || {
                self.store.finish(op, &outcome, mapping.as_ref())
            })
            .await;
        match written {
            Ok(()) => self.relay_wakeup.notify_one(),
            Err(_) => tracing::warn!("stopped before the outcome was recorded; it resumes later"),
        }
    }
}
