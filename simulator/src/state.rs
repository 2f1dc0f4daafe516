//! The simulated cloud: zones, disk offerings, volumes and async jobs, in memory.
//!
//! One `std::sync::Mutex` guards it all: every operation is a few map look-ups and no lock is
//! held across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use schema::{DiskOfferingId, VolumeId, ZoneId};

use crate::{CUSTOM_OFFERING_ID, FIXED_OFFERING_ID, SimConfig, ZONE_ID};

/// One API call the simulator received.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub command: String,
    /// Parameters as received, names lowercased, without `signature`.
    pub params: HashMap<String, String>,
    /// When the request arrived.
    pub at: DateTime<Utc>,
    /// The HTTP status answered.
    pub status: u16,
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

#[derive(Debug, Clone)]
struct SimVolume {
    id: VolumeId,
    name: String,
    zone: ZoneId,
    offering: DiskOfferingId,
    size_bytes: u64,
    state: &'static str,
    created: DateTime<Utc>,
    last_job: Option<String>,
}

impl SimVolume {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "zoneid": self.zone, "zonename": "sim-zone-1",
            "type": "DATADISK", "size": self.size_bytes, "state": self.state,
            "diskofferingid": self.offering, "diskofferingname": offering_name(self.offering),
            "storagetype": "shared", "provisioningtype": "thin", "hypervisor": "KVM",
            "created": cs_time(self.created), "attached": Value::Null, "tags": [],
            "jobid": self.last_job, "jobstatus": 0,
        })
    }
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
    created: DateTime<Utc>,
    state: JobState,
}

#[derive(Debug, Default)]
struct Inner {
    volumes: HashMap<VolumeId, SimVolume>,
    jobs: HashMap<String, Job>,
    calls: Vec<CallRecord>,
}

/// The simulator's state and behaviour.
#[derive(Debug)]
pub struct Sim {
    pub config: SimConfig,
    inner: Mutex<Inner>,
}

fn offering_name(id: DiskOfferingId) -> &'static str {
    if id == CUSTOM_OFFERING_ID {
        "Custom"
    } else {
        "Small"
    }
}

/// CloudStack's timestamp format: `2026-11-22T10:00:00+0000`.
fn cs_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%z").to_string()
}

const GIB: u64 = 1 << 30;

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
    pub fn volumes(&self) -> Vec<(VolumeId, String)> {
        self.lock()
            .volumes
            .values()
            .map(|v| (v.id, v.name.clone()))
            .collect()
    }

    pub fn volume_count(&self) -> usize {
        self.lock().volumes.len()
    }

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
        let job_id = Uuid::new_v4().to_string();
        let volume = SimVolume {
            id,
            name: name.to_owned(),
            zone,
            offering,
            size_bytes,
            state: "Allocated",
            created: Utc::now(),
            last_job: Some(job_id.clone()),
        };
        let mut inner = self.lock();
        inner.volumes.insert(id, volume);
        inner.jobs.insert(
            job_id.clone(),
            Job {
                command: "org.apache.cloudstack.api.command.user.volume.CreateVolumeCmd",
                created: Utc::now(),
                state: JobState::Pending,
            },
        );
        drop(inner);
        self.finish_job_later(job_id.clone(), move |inner| {
            inner
                .volumes
                .get(&id)
                .map(|v| json!({"volume": v.to_json()}))
                .ok_or((530, format!("volume {id} vanished")))
        });
        Ok(json!({"id": id, "jobid": job_id}))
    }

    /// Completes `job_id` after the job latency with what `finish` computes then.
    fn finish_job_later<F>(self: &Arc<Self>, job_id: String, finish: F)
    where
        F: FnOnce(&mut Inner) -> Result<Value, (u16, String)> + Send + 'static,
    {
        let sim = Arc::clone(self);
        let latency: Duration = self.config.job_latency;
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            let mut inner = sim.lock();
            let state = match finish(&mut inner) {
                Ok(result) => JobState::Succeeded(result),
                Err((code, text)) => JobState::Failed { code, text },
            };
            if let Some(job) = inner.jobs.get_mut(&job_id) {
                job.state = state;
            }
        });
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
            "jobprocstatus": 0, "jobinstancetype": "Volume", "created": cs_time(job.created),
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
        let inner = self.lock();
        let mut found: Vec<&SimVolume> = inner
            .volumes
            .values()
            .filter(|v| id.is_none_or(|id| v.id == id))
            .filter(|v| p.get("name").is_none_or(|n| &v.name == n))
            .filter(|v| p.get("zoneid").is_none_or(|z| v.zone.to_string() == *z))
            .collect();
        found.sort_by_key(|v| v.created);
        if found.is_empty() {
            // CloudStack's empty list: no count, no array.
            return Ok(json!({}));
        }
        let items: Vec<Value> = found.iter().map(|v| v.to_json()).collect();
        Ok(json!({"count": items.len(), "volume": items}))
    }
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
    parse(s).map_err(|_| ApiError::param(format!("Unable to execute API command due to invalid value. Invalid parameter {name} value={s} due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class.")))
}
