//! The simulated cloud: zones, disk offerings, VMs, volumes and async jobs, in memory.
//!
//! One `std::sync::Mutex` guards it all: every operation is a few map look-ups and no lock is
//! held across an `.await`. Rules follow docs/cloudstack.md.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use schema::{DiskOfferingId, VmId, VolumeId, ZoneId};

mod volume_ops;

use crate::faults::Faults;
use crate::{CUSTOM_OFFERING_ID, FIXED_OFFERING_ID, SimConfig, ZONE_ID, sysfs};

/// One API call the simulator received.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub command: String,
    /// Parameters as received, names lowercased, without `signature`.
    pub params: HashMap<String, String>,
    /// When the request arrived.
    pub at: DateTime<Utc>,
    /// When the answer was sent.
    pub answered_at: DateTime<Utc>,
    /// The HTTP status answered (200 also for a dropped answer).
    pub status: u16,
    /// The `errortext` of an error answer.
    pub error_text: Option<String>,
    /// The connection was dropped after the call was processed.
    pub dropped: bool,
    /// The names of the parameters that came in the URL's query string (lowercased), as
    /// opposed to a POST form body: a key or signature there ends up in proxy and access logs.
    pub in_url: Vec<String>,
}

/// An error answered to a call: HTTP status = `errorcode`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub cserrorcode: Option<u32>,
    pub text: String,
}

impl ApiError {
    pub fn param(text: impl Into<String>) -> Self {
        Self {
            code: 431,
            cserrorcode: Some(4350),
            text: text.into(),
        }
    }

    pub fn unknown_id(text: impl Into<String>) -> Self {
        Self {
            code: 431,
            cserrorcode: Some(9999),
            text: text.into(),
        }
    }
}

/// CloudStack allows at most this many data disks per VM.
pub const MAX_DATA_DISKS: usize = 6;

#[derive(Debug, Clone)]
struct SimVolume {
    id: VolumeId,
    /// `DATADISK`, or `ROOT` for the host VM's boot disk.
    kind: &'static str,
    name: String,
    zone: ZoneId,
    offering: DiskOfferingId,
    size_bytes: u64,
    state: &'static str,
    created: DateTime<Utc>,
    vm: Option<VmId>,
    device_id: Option<u32>,
    attached: Option<DateTime<Utc>>,
    last_job: Option<String>,
    /// The account that owns it: listVolumes without `listall=true` shows only the caller's
    /// ([`CALLER_ACCOUNT`]), as CloudStack does.
    account: String,
}

/// The account the simulator's api key belongs to.
pub const CALLER_ACCOUNT: &str = "admin";

#[derive(Debug, Clone)]
struct SimVm {
    id: VmId,
    name: String,
    /// Power state: `Running` or `Stopped` (set through the control API).
    running: bool,
}

#[derive(Debug, Clone)]
enum JobState {
    Pending,
    Succeeded(Value),
    Failed { code: u16, text: String },
}

#[derive(Debug, Clone)]
struct Job {
    command: &'static str,
    instance: Option<VolumeId>,
    created: DateTime<Utc>,
    state: JobState,
}

/// How hot-plugged devices appear on the host VM (issue: device correlation tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceBehaviour {
    /// Time from the attach request to the device appearing; `None`: when the job succeeds.
    pub delay: Option<Duration>,
    /// A random extra delay up to this, per device (shuffles the order of several attaches).
    pub jitter: Duration,
    /// Never create devices (a guest that does not see the disk).
    pub missing: bool,
    /// When udev's by-id link of a new device appears (always after the device, as udev
    /// makes it once the kernel's uevent is handled).
    pub by_id: ByIdLinks,
    /// Devices are virtio-scsi disks (`sdX`, the serial in `device/vpd_pg80`, a
    /// `scsi-0QEMU_QEMU_HARDDISK_<serial>` link) instead of virtio-blk (`vdX`, `serial`,
    /// `virtio-<serial>`).
    pub scsi: bool,
}

/// When the by-id link of a new host device appears.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ByIdLinks {
    /// Right after the device.
    #[default]
    AtOnce,
    /// This long after the device (udev busy).
    After(Duration),
    /// Never (no udev rule makes one).
    Never,
}

#[derive(Debug)]
struct Inner {
    api_key: String,
    secret_key: String,
    /// More accounts' key pairs, valid next to the main one (tests tell callers apart by key).
    other_keys: Vec<(String, String)>,
    faults: Faults,
    devices: DeviceBehaviour,
    volumes: HashMap<VolumeId, SimVolume>,
    vms: HashMap<VmId, SimVm>,
    jobs: HashMap<String, Job>,
    calls: Vec<CallRecord>,
    /// Guest device names of volumes attached to the host VM.
    device_names: HashMap<VolumeId, String>,
    next_controller: u32,
    /// Volume snapshots, destroyed ones included (`listSnapshots` leaves those out).
    snapshots: HashMap<schema::SnapshotId, volume_ops::SimSnapshot>,
    /// `kvm.snapshot.enabled`.
    kvm_snapshot_enabled: bool,
}

/// The simulator's state and behaviour.
#[derive(Debug)]
pub struct Sim {
    pub config: SimConfig,
    inner: Mutex<Inner>,
}

/// CloudStack's timestamp format: `2026-11-22T10:00:00+0000`.
pub fn cs_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%z").to_string()
}

const GIB: u64 = 1 << 30;
const DATADISK: &str = "DATADISK";
const ROOT: &str = "ROOT";
/// The host VM's root disk: 8 GiB at device id 0, the guest's `vda`.
const ROOT_DISK_BYTES: u64 = 8 * GIB;

/// A VM's root disk, attached at device 0. The host VM's also gets its guest device `vda`
/// (on controller `virtio3`) when there is a sysfs root, so a self-check can find its serial
/// among the local devices.
fn root_disk(config: &SimConfig, vm: VmId, n: usize) -> SimVolume {
    let id = VolumeId::new_random();
    if config.host_vm_id == Some(vm)
        && let Some(root) = &config.sysfs_root
        && let Err(e) = sysfs::create_device(
            root,
            &sysfs::Disk {
                name: "vda",
                serial: &id.disk_serial(),
                size_bytes: ROOT_DISK_BYTES,
                controller: 3,
                scsi: false,
            },
        )
    {
        tracing::warn!(error = %e, "cannot create the host VM's root device");
    }
    let now = Utc::now();
    SimVolume {
        id,
        kind: ROOT,
        name: format!("ROOT-{n}"),
        zone: ZONE_ID,
        offering: FIXED_OFFERING_ID,
        size_bytes: ROOT_DISK_BYTES,
        state: "Ready",
        created: now,
        vm: Some(vm),
        device_id: Some(0),
        attached: Some(now),
        last_job: None,
        account: CALLER_ACCOUNT.to_owned(),
    }
}

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        let mut vms = HashMap::new();
        let mut volumes = HashMap::new();
        for (i, id) in config
            .vms
            .iter()
            .chain(config.host_vm_id.iter())
            .enumerate()
        {
            vms.insert(
                *id,
                SimVm {
                    id: *id,
                    name: format!("sim-vm-{}", i + 1),
                    running: true,
                },
            );
            let root = root_disk(&config, *id, i + 1);
            volumes.insert(root.id, root);
        }
        Self {
            inner: Mutex::new(Inner {
                api_key: config.api_key.clone(),
                other_keys: Vec::new(),
                secret_key: config.secret_key.clone(),
                faults: config.faults.clone(),
                devices: DeviceBehaviour::default(),
                volumes,
                vms,
                jobs: HashMap::new(),
                calls: Vec::new(),
                device_names: HashMap::new(),
                next_controller: 4,
                snapshots: HashMap::new(),
                kvm_snapshot_enabled: config.kvm_snapshot_enabled,
            }),
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- test and operator controls -------------------------------------------------------

    /// The (api key, secret key) pair requests must be signed with now.
    pub fn keys(&self) -> (String, String) {
        let i = self.lock();
        (i.api_key.clone(), i.secret_key.clone())
    }

    /// The secret key of `api_key`, if it is the main key or one added with [`Sim::add_keys`].
    pub fn secret_of(&self, api_key: &str) -> Option<String> {
        let i = self.lock();
        if i.api_key == api_key {
            return Some(i.secret_key.clone());
        }
        i.other_keys
            .iter()
            .find(|(k, _)| k == api_key)
            .map(|(_, s)| s.clone())
    }

    /// Another valid key pair (another user of the same account); the call log records which
    /// key signed each call.
    pub fn add_keys(&self, api_key: &str, secret_key: &str) {
        self.lock()
            .other_keys
            .push((api_key.to_owned(), secret_key.to_owned()));
    }

    /// Rotates the keys: requests signed with the old pair fail with 401 from now on.
    pub fn set_keys(&self, api_key: &str, secret_key: &str) {
        let mut i = self.lock();
        i.api_key = api_key.to_owned();
        i.secret_key = secret_key.to_owned();
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn set_device_behaviour(&self, devices: DeviceBehaviour) {
        self.lock().devices = devices;
    }

    /// Registers a running VM with its root disk (CloudStack would have it already).
    pub fn add_vm(&self, id: VmId, name: &str) {
        self.add_vm_with(id, name, true, true);
    }

    /// Registers a VM, with a root disk at device 0 or (`root` false) none, running or
    /// stopped: a stopped VM without a root disk can boot from a volume attached at device 0.
    pub fn add_vm_with(&self, id: VmId, name: &str, root: bool, running: bool) {
        let mut inner = self.lock();
        if root && !inner.vms.contains_key(&id) {
            let root = root_disk(&self.config, id, inner.vms.len() + 1);
            inner.volumes.insert(root.id, root);
        }
        inner.vms.insert(
            id,
            SimVm {
                id,
                name: name.to_owned(),
                running,
            },
        );
    }

    /// Starts or stops a VM (its power state; nothing else changes). `false`: no such VM.
    pub fn set_vm_running(&self, id: VmId, running: bool) -> bool {
        match self.lock().vms.get_mut(&id) {
            Some(vm) => {
                vm.running = running;
                true
            }
            None => false,
        }
    }

    /// The volume's CloudStack type (`ROOT` or `DATADISK`) and size in bytes.
    pub fn volume_type_and_size(&self, id: VolumeId) -> Option<(String, u64)> {
        let inner = self.lock();
        let v = inner.volumes.get(&id)?;
        Some((v.kind.to_owned(), v.size_bytes))
    }

    pub fn record_call(&self, call: CallRecord) {
        self.lock().calls.push(call);
    }

    /// Every call received so far, oldest first.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// How many calls of `command` (case-insensitive) were received.
    pub fn call_count(&self, command: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.command.eq_ignore_ascii_case(command))
            .count()
    }

    /// Every volume: id and name.
    /// Every data disk (the host VM's root disk is left out): id and name.
    pub fn volumes(&self) -> Vec<(VolumeId, String)> {
        self.lock()
            .volumes
            .values()
            .filter(|v| v.kind == DATADISK)
            .map(|v| (v.id, v.name.clone()))
            .collect()
    }

    /// How many data disks exist.
    pub fn volume_count(&self) -> usize {
        self.volumes().len()
    }

    /// The root disk of `vm`.
    pub fn root_volume(&self, vm: VmId) -> Option<VolumeId> {
        self.lock()
            .volumes
            .values()
            .find(|v| v.kind == ROOT && v.vm == Some(vm))
            .map(|v| v.id)
    }

    /// The VM and device id a volume is attached to, if any.
    pub fn attachment(&self, id: VolumeId) -> Option<(VmId, u32)> {
        let i = self.lock();
        let v = i.volumes.get(&id)?;
        Some((v.vm?, v.device_id?))
    }

    /// The guest device name of a volume attached to the host VM.
    pub fn device_name(&self, id: VolumeId) -> Option<String> {
        self.lock().device_names.get(&id).cloned()
    }

    /// Creates a volume directly (as if created earlier), for tests that start from one.
    pub fn seed_volume(&self, name: &str, size_bytes: u64) -> VolumeId {
        self.seed_volume_as(VolumeId::new_random(), name, size_bytes)
    }

    /// [`Sim::seed_volume`] with a given id (a volume an installation already knows).
    pub fn seed_volume_as(&self, id: VolumeId, name: &str, size_bytes: u64) -> VolumeId {
        self.seed_volume_with(id, CALLER_ACCOUNT, name, size_bytes)
    }

    /// A volume that belongs to another `account` (made by another tenant or tool): listed
    /// only with `listall=true`.
    pub fn seed_volume_in(&self, account: &str, name: &str, size_bytes: u64) -> VolumeId {
        self.seed_volume_with(VolumeId::new_random(), account, name, size_bytes)
    }

    fn seed_volume_with(
        &self,
        id: VolumeId,
        account: &str,
        name: &str,
        size_bytes: u64,
    ) -> VolumeId {
        let vol = SimVolume {
            id,
            kind: DATADISK,
            name: name.to_owned(),
            zone: ZONE_ID,
            offering: CUSTOM_OFFERING_ID,
            size_bytes,
            state: "Allocated",
            created: Utc::now(),
            vm: None,
            device_id: None,
            attached: None,
            last_job: None,
            account: account.to_owned(),
        };
        self.lock().volumes.insert(id, vol);
        id
    }

    // ---- the API --------------------------------------------------------------------------

    pub fn list_zones(&self) -> Value {
        json!({"count": 1, "zone": [{
            "id": ZONE_ID, "name": "sim-zone-1", "networktype": "Advanced",
            "allocationstate": "Enabled", "localstorageenabled": false, "securitygroupsenabled": false,
        }]})
    }

    pub fn list_disk_offerings(&self) -> Value {
        json!({"count": 2, "diskoffering": [
            {"id": CUSTOM_OFFERING_ID, "name": "Custom", "displaytext": "Custom size",
             "disksize": 0, "iscustomized": true, "storagetype": "shared", "provisioningtype": "thin"},
            {"id": FIXED_OFFERING_ID, "name": "Small", "displaytext": "Small Disk, 5 GB",
             "disksize": 5, "iscustomized": false, "storagetype": "shared", "provisioningtype": "thin"},
        ]})
    }

    pub fn list_virtual_machines(&self, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let id = p
            .get("id")
            .map(|s| parse_id(s, "id", VmId::parse))
            .transpose()?;
        let i = self.lock();
        let mut vms: Vec<&SimVm> = i
            .vms
            .values()
            .filter(|v| id.is_none_or(|id| v.id == id))
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        if vms.is_empty() {
            return Ok(json!({}));
        }
        let items: Vec<Value> = vms
            .iter()
            .map(|v| json!({"id": v.id, "name": v.name, "displayname": v.name, "instancename": format!("i-2-{}-VM", v.name),
                 "state": power(v.running), "zoneid": ZONE_ID, "zonename": "sim-zone-1", "hypervisor": "KVM"}))
            .collect();
        Ok(json!({"count": items.len(), "virtualmachine": items}))
    }

    /// `createVolume`: validates synchronously, records the volume (`Allocated`) at once and
    /// finishes its job after the configured latency.
    pub fn create_volume(self: &Arc<Self>, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let name = required(p, "name", "createvolume")?;
        let zone = parse_id(
            required(p, "zoneid", "createvolume")?,
            "zoneid",
            ZoneId::parse,
        )?;
        if zone != ZONE_ID {
            return Err(ApiError::param(format!("Unable to find zone by id {zone}")));
        }
        let offering = parse_id(
            required(p, "diskofferingid", "createvolume")?,
            "diskofferingid",
            DiskOfferingId::parse,
        )?;
        let size_bytes = if offering == CUSTOM_OFFERING_ID {
            let size = required(p, "size", "createvolume")?;
            match size.parse::<u64>() {
                Ok(gib) if gib >= 1 => gib * GIB,
                _ => {
                    return Err(ApiError::param(format!(
                        "Invalid size {size}: must be a whole number of GiB, at least 1"
                    )));
                }
            }
        } else if offering == FIXED_OFFERING_ID {
            5 * GIB
        } else {
            return Err(ApiError::param(format!(
                "Unable to find disk offering by id {offering}"
            )));
        };

        let id = VolumeId::new_random();
        let mut inner = self.lock();
        let created = Utc::now() + chrono::TimeDelta::milliseconds(inner.faults.clock_offset_ms);
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.volume.CreateVolumeCmd",
            Some(id),
        );
        inner.volumes.insert(
            id,
            SimVolume {
                kind: DATADISK,
                id,
                name: name.to_owned(),
                zone,
                offering,
                size_bytes,
                state: "Allocated",
                created,
                vm: None,
                device_id: None,
                attached: None,
                last_job: Some(job_id.clone()),
                account: p
                    .get("account")
                    .cloned()
                    .unwrap_or_else(|| CALLER_ACCOUNT.to_owned()),
            },
        );
        let fails = inner.faults.job_fails();
        drop(inner);
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to create volume {id}: injected job failure")),
            move |inner| {
                let vol = inner
                    .volumes
                    .get(&id)
                    .ok_or((530, format!("volume {id} vanished")))?;
                Ok(json!({"volume": volume_json(vol, inner)}))
            },
        );
        Ok(json!({"id": id, "jobid": job_id}))
    }

    /// `attachVolume`: checks the volume, the VM, the device id and the data-disk limit, then
    /// attaches when the job ends. Attaching to the host VM also creates its guest device.
    pub fn attach_volume(self: &Arc<Self>, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let id = parse_id(required(p, "id", "attachvolume")?, "id", VolumeId::parse)?;
        let vm = parse_id(
            required(p, "virtualmachineid", "attachvolume")?,
            "virtualmachineid",
            VmId::parse,
        )?;
        let device_id = match p.get("deviceid") {
            None => None,
            Some(d) => match d.parse::<u32>() {
                Ok(3) => return Err(ApiError::param("deviceId 3 is reserved for the CD-ROM")),
                Ok(d) if d <= 25 => Some(d),
                _ => {
                    return Err(ApiError::param(format!(
                        "Invalid deviceId {d}: must be between 0 and 25"
                    )));
                }
            },
        };
        let mut inner = self.lock();
        let vol = find_volume(&inner, id)?;
        if !inner.vms.contains_key(&vm) {
            return Err(ApiError::unknown_id(format!(
                "Unable to find virtual machine by id {vm}"
            )));
        }
        if vol.vm.is_some() {
            return Err(ApiError::param(format!(
                "Volume {id} is already attached to a VM; please specify a volume that is not attached to any VM."
            )));
        }
        let size_bytes = vol.size_bytes;
        let on_vm: Vec<u32> = inner
            .volumes
            .values()
            .filter(|v| v.vm == Some(vm))
            .filter_map(|v| v.device_id)
            .collect();
        if let Some(d) = device_id
            && on_vm.contains(&d)
        {
            return Err(ApiError::param(format!(
                "deviceId {d} is already used by another volume of VM {vm}"
            )));
        }
        // CloudStack's volume DAO: a volume attached at device 0 becomes the VM's root disk,
        // which only a stopped VM without one may get.
        if device_id == Some(0) && inner.vms.get(&vm).is_some_and(|m| m.running) {
            return Err(ApiError::param(format!(
                "VM {vm} is running: stop it before attaching a volume as its root disk (deviceId 0)"
            )));
        }
        let max = self.config.max_data_disks;
        if on_vm.iter().filter(|d| **d != 0).count() >= max && device_id != Some(0) {
            return Err(ApiError::param(format!(
                "The specified VM already has the maximum number of data disks ({max}). Please specify another VM."
            )));
        }
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd",
            Some(id),
        );
        let fails = inner.faults.job_fails();
        let devices = inner.devices.clone();
        drop(inner);

        let to_host = self.config.host_vm_id == Some(vm) && !fails && !devices.missing;
        if to_host && let Some(delay) = devices.delay {
            self.create_device_later(id, size_bytes, delay, &devices);
        }
        let sim = Arc::clone(self);
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to attach volume {id} to VM {vm}: injected job failure")),
            move |inner| {
                let used: Vec<u32> = inner
                    .volumes
                    .values()
                    .filter(|v| v.vm == Some(vm))
                    .filter_map(|v| v.device_id)
                    .collect();
                let chosen = match device_id {
                    Some(d) if used.contains(&d) => {
                        return Err((530, format!("deviceId {d} was taken meanwhile")));
                    }
                    Some(d) => d,
                    None => (1..=25)
                        .find(|d| *d != 3 && !used.contains(d))
                        .ok_or((530, "no free device id".to_owned()))?,
                };
                let vol = inner
                    .volumes
                    .get_mut(&id)
                    .ok_or((530, format!("volume {id} vanished")))?;
                if vol.vm.is_some() {
                    return Err((530, format!("volume {id} was attached meanwhile")));
                }
                vol.vm = Some(vm);
                vol.device_id = Some(chosen);
                vol.kind = if chosen == 0 { ROOT } else { DATADISK };
                vol.state = "Ready";
                vol.attached = Some(Utc::now());
                let out = volume_json_by_id(id, inner);
                if to_host && devices.delay.is_none() {
                    sim.create_device_later(id, size_bytes, Duration::ZERO, &devices);
                }
                Ok(out)
            },
        );
        Ok(json!({"jobid": job_id}))
    }

    /// `detachVolume`: detaches when the job ends and removes the guest device of the host VM.
    pub fn detach_volume(self: &Arc<Self>, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let id = parse_id(required(p, "id", "detachvolume")?, "id", VolumeId::parse)?;
        let mut inner = self.lock();
        let vol = find_volume(&inner, id)?;
        let Some(vm) = vol.vm else {
            return Err(ApiError::param(format!(
                "Please specify a volume that is attached to a VM: volume {id} is not attached"
            )));
        };
        if vol.kind == ROOT && inner.vms.get(&vm).is_some_and(|m| m.running) {
            return Err(ApiError::param(format!(
                "Volume {id} is the root disk of VM {vm}, which is running: stop the VM before detaching it"
            )));
        }
        let job_id = new_job(
            &mut inner,
            "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd",
            Some(id),
        );
        let fails = inner.faults.job_fails();
        drop(inner);
        let root = self.config.sysfs_root.clone();
        let by_id = self.config.by_id_dir.clone();
        self.finish_job_later(
            job_id.clone(),
            fails.then(|| format!("Failed to detach volume {id}: injected job failure")),
            move |inner| {
                let vol = inner
                    .volumes
                    .get_mut(&id)
                    .ok_or((530, format!("volume {id} vanished")))?;
                vol.vm = None;
                vol.device_id = None;
                vol.attached = None;
                // A root disk detached is a data disk again (CloudStack's volume DAO).
                vol.kind = DATADISK;
                let out = volume_json_by_id(id, inner);
                if let (Some(root), Some(name)) = (root, inner.device_names.remove(&id))
                    && let Err(e) = sysfs::remove_device(&root, &name)
                {
                    tracing::warn!(error = %e, device = name, "cannot remove the simulated device");
                }
                if let Some(by_id) = by_id
                    && let Err(e) = sysfs::remove_by_id(&by_id, &id.disk_serial())
                {
                    tracing::warn!(error = %e, volume = %id, "cannot remove the simulated by-id link");
                }
                Ok(out)
            },
        );
        Ok(json!({"jobid": job_id}))
    }

    /// `deleteVolume` (synchronous): an attached volume cannot be deleted.
    pub fn delete_volume(&self, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let id = parse_id(required(p, "id", "deletevolume")?, "id", VolumeId::parse)?;
        let mut inner = self.lock();
        let vol = find_volume(&inner, id)?;
        if vol.vm.is_some() {
            return Err(ApiError::param(
                "Please specify a volume that is not attached to any VM.",
            ));
        }
        inner.volumes.remove(&id);
        if let Some(root) = &self.config.sysfs_root
            && let Err(e) = sysfs::remove_backing(root, &id.to_string())
        {
            tracing::warn!(error = %e, volume = %id, "cannot remove the simulated backing file");
        }
        Ok(json!({"success": true}))
    }

    pub fn query_async_job(&self, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let job_id = required(p, "jobid", "queryasyncjobresult")?;
        let inner = self.lock();
        let job = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| ApiError::unknown_id(format!("Unable to find job by id {job_id}")))?;
        let mut out = json!({
            "jobid": job_id, "cmd": job.command, "userid": "sim-user", "accountid": "sim-account",
            "jobprocstatus": 0, "jobinstancetype": "Volume", "jobinstanceid": job.instance,
            "created": cs_time(job.created),
        });
        let fields = match &job.state {
            JobState::Pending => json!({"jobstatus": 0, "jobresultcode": 0}),
            JobState::Succeeded(result) => json!({
                "jobstatus": 1, "jobresultcode": 0, "jobresulttype": "object",
                "jobresult": result, "completed": cs_time(Utc::now()),
            }),
            JobState::Failed { code, text } => json!({
                "jobstatus": 2, "jobresultcode": code, "jobresulttype": "object",
                "jobresult": {"errorcode": code, "errortext": text}, "completed": cs_time(Utc::now()),
            }),
        };
        if let (Some(out), Value::Object(fields)) = (out.as_object_mut(), fields) {
            out.extend(fields);
        }
        Ok(out)
    }

    pub fn list_volumes(&self, p: &HashMap<String, String>) -> Result<Value, ApiError> {
        let id = p
            .get("id")
            .map(|s| parse_id(s, "id", VolumeId::parse))
            .transpose()?;
        let vm = p
            .get("virtualmachineid")
            .map(|s| parse_id(s, "virtualmachineid", VmId::parse))
            .transpose()?;
        let inner = self.lock();
        let mut found: Vec<&SimVolume> = inner
            .volumes
            .values()
            .filter(|v| id.is_none_or(|id| v.id == id))
            .filter(|v| vm.is_none_or(|vm| v.vm == Some(vm)))
            .filter(|v| p.get("name").is_none_or(|n| &v.name == n))
            .filter(|v| p.get("zoneid").is_none_or(|z| v.zone.to_string() == *z))
            // Without `listall=true`, only the caller's own resources.
            .filter(|v| {
                p.get("listall")
                    .is_some_and(|a| a.eq_ignore_ascii_case("true"))
                    || v.account == CALLER_ACCOUNT
            })
            .collect();
        found.sort_by_key(|v| v.created);
        if found.is_empty() {
            // CloudStack's empty list: no count, no array.
            return Ok(json!({}));
        }
        let items: Vec<Value> = found.iter().map(|v| volume_json(v, &inner)).collect();
        Ok(json!({"count": items.len(), "volume": items}))
    }

    // ---- jobs and devices -----------------------------------------------------------------

    /// Completes `job_id` after the job latency: with `injected_failure` (errorcode 530) when
    /// fault injection decided so, else with what `finish` computes then.
    fn finish_job_later<F>(
        self: &Arc<Self>,
        job_id: String,
        injected_failure: Option<String>,
        finish: F,
    ) where
        F: FnOnce(&mut Inner) -> Result<Value, (u16, String)> + Send + 'static,
    {
        let sim = Arc::clone(self);
        let latency = self.config.job_latency;
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            let mut inner = sim.lock();
            let outcome = match injected_failure {
                Some(text) => Err((530, text)),
                None => finish(&mut inner),
            };
            let state = match outcome {
                Ok(result) => JobState::Succeeded(result),
                Err((code, text)) => JobState::Failed { code, text },
            };
            if let Some(job) = inner.jobs.get_mut(&job_id) {
                job.state = state;
            }
        });
    }

    /// Creates the guest device of `volume` under the sysfs root after `delay` (+ jitter), as
    /// the kernel does: the device node (`<sysfs_root>/dev/<name>`, standing for `/dev/<name>`,
    /// to the volume's backing file) with the device, then udev's by-id link as
    /// [`DeviceBehaviour::by_id`] says.
    fn create_device_later(
        self: &Arc<Self>,
        volume: VolumeId,
        size_bytes: u64,
        delay: Duration,
        devices: &DeviceBehaviour,
    ) {
        let Some(root) = self.config.sysfs_root.clone() else {
            return;
        };
        let extra = if devices.jitter.is_zero() {
            Duration::ZERO
        } else {
            devices.jitter.mul_f64(rand::rng().random::<f64>())
        };
        let (by_id, scsi) = (devices.by_id, devices.scsi);
        let sim = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay + extra).await;
            let serial = volume.disk_serial();
            let link = {
                let mut inner = sim.lock();
                if !inner.volumes.contains_key(&volume) || inner.device_names.contains_key(&volume)
                {
                    return;
                }
                let taken: Vec<String> = inner.device_names.values().cloned().collect();
                let name = sysfs::next_free_name(&root, if scsi { "sd" } else { "vd" }, &taken);
                let controller = inner.next_controller;
                inner.next_controller += 1;
                let backing = match &sim.config.by_id_dir {
                    Some(_) => sysfs::create_backing(&root, &volume.to_string(), size_bytes)
                        .map_err(|e| tracing::warn!(error = %e, %volume, "cannot create the simulated backing file"))
                        .ok(),
                    None => None,
                };
                if let Some(file) = &backing
                    && let Err(e) = sysfs::create_node(&root, &name, file)
                {
                    tracing::warn!(error = %e, %volume, "cannot create the simulated device node");
                }
                let disk = sysfs::Disk {
                    name: &name,
                    serial: &serial,
                    size_bytes,
                    controller,
                    scsi,
                };
                if let Err(e) = sysfs::create_device(&root, &disk) {
                    tracing::warn!(error = %e, %volume, "cannot create the simulated device");
                    return;
                }
                inner.device_names.insert(volume, name);
                backing.zip(sim.config.by_id_dir.clone())
            };
            let Some((file, by_id_dir)) = link else {
                return;
            };
            match by_id {
                ByIdLinks::Never => return,
                ByIdLinks::AtOnce => {}
                ByIdLinks::After(d) => tokio::time::sleep(d).await,
            }
            // Still attached (a detach meanwhile removed the device: udev makes no link).
            if !sim.lock().device_names.contains_key(&volume) {
                return;
            }
            if let Err(e) =
                sysfs::create_by_id(&by_id_dir, &sysfs::by_id_name(&serial, scsi), &file)
            {
                tracing::warn!(error = %e, %volume, "cannot create the simulated by-id link");
            }
        });
    }
}

/// The volume, or CloudStack's answer for an id it does not know (431, cserrorcode 9999).
fn find_volume(inner: &Inner, id: VolumeId) -> Result<&SimVolume, ApiError> {
    inner
        .volumes
        .get(&id)
        .ok_or_else(|| ApiError::unknown_id(format!("Unable to find volume by id {id}")))
}

/// A pending job; it becomes the volume's latest job (what listVolumes reports).
fn new_job(inner: &mut Inner, command: &'static str, instance: Option<VolumeId>) -> String {
    let job_id = Uuid::new_v4().to_string();
    if let Some(v) = instance.and_then(|id| inner.volumes.get_mut(&id)) {
        v.last_job = Some(job_id.clone());
    }
    inner.jobs.insert(
        job_id.clone(),
        Job {
            command,
            instance,
            created: Utc::now(),
            state: JobState::Pending,
        },
    );
    job_id
}

/// CloudStack's name of a VM power state.
fn power(running: bool) -> &'static str {
    if running { "Running" } else { "Stopped" }
}

/// `{"volume": {...}}` of a volume that exists.
fn volume_json_by_id(id: VolumeId, inner: &Inner) -> Value {
    match inner.volumes.get(&id) {
        Some(v) => json!({"volume": volume_json(v, inner)}),
        None => json!({}),
    }
}

fn volume_json(v: &SimVolume, inner: &Inner) -> Value {
    let job_status = v
        .last_job
        .as_ref()
        .and_then(|j| inner.jobs.get(j))
        .map(|j| match j.state {
            JobState::Pending => 0,
            JobState::Succeeded(_) => 1,
            JobState::Failed { .. } => 2,
        });
    let mut out = json!({
        "id": v.id, "name": v.name, "zoneid": v.zone, "zonename": "sim-zone-1",
        "type": v.kind, "size": v.size_bytes, "state": v.state,
        "diskofferingid": v.offering, "diskofferingname": if v.offering == CUSTOM_OFFERING_ID { "Custom" } else { "Small" },
        "storagetype": "shared", "provisioningtype": "thin", "hypervisor": "KVM",
        "created": cs_time(v.created), "tags": [], "account": v.account,
    });
    if let Some(obj) = out.as_object_mut() {
        if let (Some(vm), Some(dev)) = (v.vm, v.device_id) {
            let vm_name = inner
                .vms
                .get(&vm)
                .map(|m| m.name.clone())
                .unwrap_or_default();
            obj.insert("virtualmachineid".into(), json!(vm));
            obj.insert("vmname".into(), json!(vm_name));
            let running = inner.vms.get(&vm).is_some_and(|m| m.running);
            obj.insert("vmstate".into(), json!(power(running)));
            obj.insert("deviceid".into(), json!(dev));
            obj.insert("attached".into(), json!(v.attached.map(cs_time)));
        }
        if let (Some(job), Some(status)) = (&v.last_job, job_status) {
            obj.insert("jobid".into(), json!(job));
            obj.insert("jobstatus".into(), json!(status));
        }
    }
    out
}

fn required<'a>(
    p: &'a HashMap<String, String>,
    name: &str,
    command: &str,
) -> Result<&'a str, ApiError> {
    p.get(name).map(String::as_str).ok_or_else(|| ApiError {
        code: 431,
        cserrorcode: Some(9999),
        text: format!("Unable to execute API command {command} due to missing parameter {name}"),
    })
}

fn parse_id<T, E>(s: &str, name: &str, parse: fn(&str) -> Result<T, E>) -> Result<T, ApiError> {
    parse(s).map_err(|_| {
        ApiError::param(format!(
            "Unable to execute API command due to invalid value. Invalid parameter {name} value={s} due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class."
        ))
    })
}
