//! CloudStack's JSON responses (docs/cloudstack.md), parsed into typed values.
//!
//! Every response is `{"<command lowercase>response": {...}}`; errors use the same key or
//! `errorresponse`. These functions take the raw body so that each shape is unit-tested.

use serde::Deserialize;
use serde_json::Value;

use schema::{DiskOfferingId, SnapshotId, VmId, VolumeId, ZoneId};

use crate::error::CloudStackError;

/// A CloudStack async-job id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `VolumeResponse`. Only the fields the daemon uses are typed; CloudStack sends more.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    #[serde(default)]
    pub zoneid: Option<ZoneId>,
    /// Bytes.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub state: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub virtualmachineid: Option<VmId>,
    /// The power state of the VM it is attached to (`Running`, `Stopped`, ...).
    #[serde(default)]
    pub vmstate: Option<String>,
    #[serde(default)]
    pub deviceid: Option<u32>,
    #[serde(default)]
    pub diskofferingid: Option<DiskOfferingId>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub jobid: Option<String>,
    /// Status of the latest async job on the volume (0 while it runs).
    #[serde(default)]
    pub jobstatus: Option<u8>,
}

impl Volume {
    /// The async job CloudStack reports as running on the volume (`jobstatus` 0), if any.
    pub fn running_job(&self) -> Option<JobId> {
        match (self.jobstatus, &self.jobid) {
            (Some(0), Some(job)) => Some(JobId(job.clone())),
            _ => None,
        }
    }

    /// Whether this is a VM's root disk (`type` `ROOT`), not a data disk.
    pub fn is_root(&self) -> bool {
        self.kind.as_deref() == Some("ROOT")
    }

    /// When CloudStack created the volume (`created`, whole seconds with an offset, as
    /// `2026-11-22T10:00:00+0000`); `None` when absent or not in that form.
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        parse_created(self.created.as_deref()?)
    }
}

/// A volume snapshot as CloudStack lists it (`SnapshotResponse`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Snapshot {
    pub id: SnapshotId,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub volumeid: Option<VolumeId>,
    /// `Allocated`, `Creating`, `CreatedOnPrimary`, `BackingUp`, `BackedUp`, `Error`, ...
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub jobid: Option<String>,
    /// Status of the latest async job on the snapshot (0 while it runs).
    #[serde(default)]
    pub jobstatus: Option<u8>,
}

impl Snapshot {
    /// Whether a volume can be reverted to it or it can be kept as a restore point: backed up,
    /// or (where snapshots stay on primary storage) created there.
    pub fn is_usable(&self) -> bool {
        matches!(self.state.as_str(), "BackedUp" | "CreatedOnPrimary")
    }

    /// The async job CloudStack reports as running on the snapshot, if any.
    pub fn running_job(&self) -> Option<JobId> {
        match (self.jobstatus, &self.jobid) {
            (Some(0), Some(job)) => Some(JobId(job.clone())),
            _ => None,
        }
    }

    /// When CloudStack took it (see [`Volume::created_at`] for the form).
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        parse_created(self.created.as_deref()?)
    }
}

/// CloudStack's `created` timestamps: whole seconds with an offset (`2026-11-22T10:00:00+0000`).
fn parse_created(created: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_str(created, "%Y-%m-%dT%H:%M:%S%z")
        .ok()
        .map(|c| c.with_timezone(&chrono::Utc))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VirtualMachine {
    pub id: VmId,
    pub name: String,
    #[serde(default)]
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Zone {
    pub id: ZoneId,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DiskOffering {
    pub id: DiskOfferingId,
    pub name: String,
    /// GiB; 0 for a customized offering.
    #[serde(default)]
    pub disksize: u64,
    #[serde(default)]
    pub iscustomized: bool,
}

/// Where an async job stands (`jobstatus` 0–3).
#[derive(Debug, Clone, PartialEq)]
pub enum JobStatus {
    Pending,
    /// `jobresult`, e.g. `{"volume": {...}}`.
    Succeeded(Value),
    Failed {
        code: Option<u16>,
        text: String,
    },
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AsyncJob {
    pub job_id: JobId,
    pub status: JobStatus,
}

fn decode(command: &str, reason: impl Into<String>) -> CloudStackError {
    CloudStackError::Decode {
        command: command.to_owned(),
        reason: reason.into(),
    }
}

/// Unwraps `{"<command>response": {...}}` of a successful (HTTP 200) answer.
pub fn unwrap_success(command: &str, body: &str) -> Result<Value, CloudStackError> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| decode(command, format!("not JSON ({e}): {}", snippet(body))))?;
    let key = format!("{}response", command.to_ascii_lowercase());
    let Value::Object(mut obj) = value else {
        return Err(decode(command, format!("not an object: {}", snippet(body))));
    };
    match obj.remove(&key) {
        Some(inner @ Value::Object(_)) => {
            if let Some(err) = api_error(command, &inner, None) {
                return Err(err);
            }
            Ok(inner)
        }
        Some(other) => Err(decode(
            command,
            format!("`{key}` is not an object: {other}"),
        )),
        None => match obj.get("errorresponse") {
            Some(inner) => Err(api_error(command, inner, None).unwrap_or_else(|| {
                decode(command, format!("unreadable error: {}", snippet(body)))
            })),
            None => Err(decode(command, format!("no `{key}` in {}", snippet(body)))),
        },
    }
}

/// Reads an error answer (HTTP status ≠ 200). The body is
/// `{"<command>response"|"errorresponse": {"errorcode", "cserrorcode", "errortext"}}`, or
/// anything at all from a proxy in between.
pub fn parse_error(command: &str, status: u16, body: &str) -> CloudStackError {
    let parsed = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let obj = v.as_object()?;
        obj.values()
            .find_map(|inner| api_error(command, inner, Some(status)))
    });
    let text = if body.trim().is_empty() {
        format!("HTTP {status} with an empty body")
    } else {
        snippet(body)
    };
    parsed.unwrap_or_else(|| match status {
        // No CloudStack error object: a proxy or the container answered, not CloudStack.
        500 | 502 | 503 | 504 => CloudStackError::Gateway {
            command: command.to_owned(),
            status,
            text,
        },
        _ => CloudStackError::Api {
            command: command.to_owned(),
            code: status,
            cserrorcode: None,
            text,
        },
    })
}

fn api_error(command: &str, inner: &Value, status: Option<u16>) -> Option<CloudStackError> {
    let code = inner.get("errorcode").and_then(as_u64)?;
    Some(CloudStackError::Api {
        command: command.to_owned(),
        code: u16::try_from(code).ok().or(status).unwrap_or(530),
        cserrorcode: inner
            .get("cserrorcode")
            .and_then(as_u64)
            .and_then(|c| u32::try_from(c).ok()),
        text: inner
            .get("errortext")
            .and_then(Value::as_str)
            .unwrap_or("(no errortext)")
            .to_owned(),
    })
}

/// Numbers sometimes arrive as strings.
fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

fn snippet(body: &str) -> String {
    let s: String = body.chars().take(300).collect();
    if s.len() < body.len() {
        format!("{s}…")
    } else {
        s
    }
}

/// `createVolume`: `{"id": "<volume>", "jobid": "<job>"}`.
pub fn parse_create_volume(inner: &Value) -> Result<(VolumeId, JobId), CloudStackError> {
    #[derive(Deserialize)]
    struct Created {
        id: VolumeId,
        jobid: JobId,
    }
    Created::deserialize(inner)
        .map(|c| (c.id, c.jobid))
        .map_err(|e| decode("createVolume", format!("{e}: {inner}")))
}

/// `createSnapshot`: `{"id": "<snapshot>", "jobid": "<job>"}`.
pub fn parse_create_snapshot(inner: &Value) -> Result<(SnapshotId, JobId), CloudStackError> {
    #[derive(Deserialize)]
    struct Created {
        id: SnapshotId,
        jobid: JobId,
    }
    Created::deserialize(inner)
        .map(|c| (c.id, c.jobid))
        .map_err(|e| decode("createSnapshot", format!("{e}: {inner}")))
}

/// The snapshot a snapshot job (createSnapshot, revertSnapshot) ended with.
pub fn parse_job_snapshot(job_id: &JobId, result: &Value) -> Result<Snapshot, CloudStackError> {
    result
        .get("snapshot")
        .ok_or_else(|| format!("no `snapshot` in {result}"))
        .and_then(|v| Snapshot::deserialize(v).map_err(|e| format!("{e}: {v}")))
        .map_err(|reason| decode(&format!("job {job_id}"), reason))
}

/// An async command's `{"jobid": "..."}`.
pub fn parse_job_id(command: &str, inner: &Value) -> Result<JobId, CloudStackError> {
    inner
        .get("jobid")
        .and_then(Value::as_str)
        .map(|j| JobId(j.to_owned()))
        .ok_or_else(|| decode(command, format!("no jobid in {inner}")))
}

/// `queryAsyncJobResult`.
pub fn parse_async_job(inner: &Value) -> Result<AsyncJob, CloudStackError> {
    let cmd = "queryAsyncJobResult";
    let job_id = parse_job_id(cmd, inner)?;
    let status = match inner.get("jobstatus").and_then(as_u64) {
        Some(0) => JobStatus::Pending,
        Some(1) => JobStatus::Succeeded(inner.get("jobresult").cloned().unwrap_or(Value::Null)),
        Some(2) => {
            let result = inner.get("jobresult");
            let code = result
                .and_then(|r| r.get("errorcode"))
                .and_then(as_u64)
                .or_else(|| inner.get("jobresultcode").and_then(as_u64))
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| *c != 0);
            let text = match result {
                Some(Value::String(s)) => s.clone(),
                Some(r) => r
                    .get("errortext")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| r.to_string()),
                None => "(no jobresult)".to_owned(),
            };
            JobStatus::Failed { code, text }
        }
        Some(3) => JobStatus::Cancelled,
        other => {
            return Err(decode(
                cmd,
                format!("unknown jobstatus {other:?} in {inner}"),
            ));
        }
    };
    Ok(AsyncJob { job_id, status })
}

/// The `volume` of a finished volume job's `jobresult`.
pub fn parse_job_volume(job_id: &JobId, result: &Value) -> Result<Volume, CloudStackError> {
    result
        .get("volume")
        .ok_or_else(|| format!("no `volume` in {result}"))
        .and_then(|v| Volume::deserialize(v).map_err(|e| format!("{e}: {v}")))
        .map_err(|reason| decode(&format!("job {job_id}"), reason))
}

/// A `list*` response: `{"count": N, "<item>": [...]}`, or `{}` when empty.
pub fn parse_list<T: serde::de::DeserializeOwned>(
    command: &str,
    item: &str,
    inner: &Value,
) -> Result<Vec<T>, CloudStackError> {
    match inner.get(item) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(items) => {
            Vec::<T>::deserialize(items).map_err(|e| decode(command, format!("`{item}`: {e}")))
        }
    }
}

/// `deleteVolume`: `{"success": true}` or `{"success": "true"}`.
pub fn parse_success(command: &str, inner: &Value) -> Result<(), CloudStackError> {
    match inner.get("success") {
        Some(Value::Bool(true)) => Ok(()),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(()),
        _ => Err(CloudStackError::Api {
            command: command.to_owned(),
            code: 530,
            cserrorcode: None,
            text: inner
                .get("displaytext")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("success was not true: {inner}")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: &str = "3106013a-e175-423e-a090-1234567890ab";

    fn volume(extra: Value) -> Volume {
        let mut v = serde_json::json!({"id": VOL, "name": "v"});
        v.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        serde_json::from_value(v).expect("a volume")
    }

    #[test]
    fn a_volume_says_its_running_job_whether_it_is_a_root_disk_and_when_it_was_made() {
        let running = volume(serde_json::json!({"jobid": "j1", "jobstatus": 0}));
        assert_eq!(running.running_job(), Some(JobId("j1".into())));
        let ended = volume(serde_json::json!({"jobid": "j1", "jobstatus": 1}));
        assert_eq!(ended.running_job(), None, "a finished job is not running");
        assert_eq!(
            volume(serde_json::json!({"jobstatus": 0})).running_job(),
            None
        );

        assert!(volume(serde_json::json!({"type": "ROOT"})).is_root());
        assert!(!volume(serde_json::json!({"type": "DATADISK"})).is_root());
        assert!(!volume(serde_json::json!({})).is_root());

        let made = volume(serde_json::json!({"created": "2026-11-22T10:00:05+0100"}));
        assert_eq!(
            made.created_at().map(|t| t.to_rfc3339()),
            Some("2026-11-22T09:00:05+00:00".to_owned())
        );
        let odd = volume(serde_json::json!({"created": "yesterday"}));
        assert_eq!(odd.created_at(), None);
    }

    #[test]
    fn create_volume_gives_the_id_and_job() {
        let inner = unwrap_success(
            "createVolume",
            &format!(r#"{{"createvolumeresponse":{{"id":"{VOL}","jobid":"j-1"}}}}"#),
        )
        .expect("ok");
        let (id, job) = parse_create_volume(&inner).expect("parse");
        assert_eq!(id.to_string(), VOL);
        assert_eq!(job, JobId("j-1".into()));
    }

    #[test]
    fn job_success_carries_the_volume() {
        let body = format!(
            r#"{{"queryasyncjobresultresponse":{{"jobid":"j-1","jobstatus":1,"jobprocstatus":0,"jobresultcode":0,"jobresulttype":"object","jobresult":{{"volume":{{"id":"{VOL}","name":"d0","size":1073741824,"state":"Allocated","type":"DATADISK"}}}}}}}}"#
        );
        let job = parse_async_job(&unwrap_success("queryAsyncJobResult", &body).expect("ok"))
            .expect("job");
        let JobStatus::Succeeded(result) = job.status else {
            panic!("{job:?}")
        };
        let vol = parse_job_volume(&job.job_id, &result).expect("volume");
        assert_eq!(vol.size, Some(1 << 30));
        assert_eq!(vol.state, "Allocated");
        assert_eq!(vol.virtualmachineid, None);
    }

    #[test]
    fn job_pending_failed_text_and_cancelled() {
        let pending = serde_json::json!({"jobid": "j", "jobstatus": 0});
        assert_eq!(
            parse_async_job(&pending).expect("ok").status,
            JobStatus::Pending
        );

        let failed = serde_json::json!({"jobid": "j", "jobstatus": 2, "jobresultcode": 530,
            "jobresulttype": "object", "jobresult": {"errorcode": 530, "errortext": "Failed to attach volume"}});
        assert_eq!(
            parse_async_job(&failed).expect("ok").status,
            JobStatus::Failed {
                code: Some(530),
                text: "Failed to attach volume".into()
            }
        );

        let text = serde_json::json!({"jobid": "j", "jobstatus": 2, "jobresultcode": 530,
            "jobresulttype": "text", "jobresult": "Volume is busy"});
        assert_eq!(
            parse_async_job(&text).expect("ok").status,
            JobStatus::Failed {
                code: Some(530),
                text: "Volume is busy".into()
            }
        );

        let cancelled = serde_json::json!({"jobid": "j", "jobstatus": "3"});
        assert_eq!(
            parse_async_job(&cancelled).expect("ok").status,
            JobStatus::Cancelled
        );
        assert!(parse_async_job(&serde_json::json!({"jobid": "j", "jobstatus": 7})).is_err());
    }

    #[test]
    fn errors_under_the_command_key_or_errorresponse() {
        let e = parse_error(
            "createVolume",
            431,
            r#"{"createvolumeresponse":{"uuidList":[],"errorcode":431,"cserrorcode":4350,"errortext":"Unable to find disk offering"}}"#,
        );
        assert!(
            matches!(&e, CloudStackError::Api { code: 431, cserrorcode: Some(4350), text, .. } if text == "Unable to find disk offering"),
            "{e:?}"
        );

        let e = parse_error(
            "listVolumes",
            401,
            r#"{"errorresponse":{"uuidList":[],"errorcode":401,"errortext":"unable to verify user credentials and/or request signature"}}"#,
        );
        assert!(
            matches!(
                &e,
                CloudStackError::Api {
                    code: 401,
                    cserrorcode: None,
                    ..
                }
            ),
            "{e:?}"
        );

        // A proxy's 502 is not CloudStack's answer: like a lost connection, transient and
        // unknown whether CloudStack acted.
        let e = parse_error("listVolumes", 502, "<html>Bad Gateway</html>");
        assert!(
            matches!(&e, CloudStackError::Gateway { status: 502, .. }),
            "{e:?}"
        );
        assert!(e.is_transient() && !e.was_answered());
        // CloudStack's own 503 (with its error object) stays an answer.
        let e = parse_error(
            "listVolumes",
            503,
            r#"{"listvolumesresponse":{"errorcode":503,"errortext":"maintenance"}}"#,
        );
        assert!(
            matches!(&e, CloudStackError::Api { code: 503, .. }),
            "{e:?}"
        );
        assert!(e.was_answered());

        // An error inside a 200 is still an error.
        let e = unwrap_success(
            "listVolumes",
            r#"{"errorresponse":{"errorcode":530,"errortext":"boom"}}"#,
        )
        .expect_err("error");
        assert_eq!(e.cloudstack_code(), Some(530));
    }

    #[test]
    fn empty_list_is_an_empty_object() {
        let inner = unwrap_success("listVolumes", r#"{"listvolumesresponse":{}}"#).expect("ok");
        let vols: Vec<Volume> = parse_list("listVolumes", "volume", &inner).expect("list");
        assert!(vols.is_empty());

        let body = format!(
            r#"{{"listvolumesresponse":{{"count":1,"volume":[{{"id":"{VOL}","name":"d0","state":"Ready","deviceid":1,"virtualmachineid":"{VOL}"}}]}}}}"#
        );
        let inner = unwrap_success("listVolumes", &body).expect("ok");
        let vols: Vec<Volume> = parse_list("listVolumes", "volume", &inner).expect("list");
        assert_eq!(vols[0].deviceid, Some(1));
    }

    #[test]
    fn delete_success_as_bool_or_string() {
        for body in [
            r#"{"deletevolumeresponse":{"success":true}}"#,
            r#"{"deletevolumeresponse":{"success":"true"}}"#,
        ] {
            let inner = unwrap_success("deleteVolume", body).expect("ok");
            parse_success("deleteVolume", &inner).expect("success");
        }
        let inner = unwrap_success(
            "deleteVolume",
            r#"{"deletevolumeresponse":{"success":false,"displaytext":"nope"}}"#,
        )
        .expect("ok");
        assert!(parse_success("deleteVolume", &inner).is_err());
    }

    #[test]
    fn garbage_is_a_decode_error_naming_the_command() {
        let e = unwrap_success("listZones", "not json").expect_err("error");
        assert!(e.to_string().contains("listZones"), "{e}");
        let e = unwrap_success("listZones", r#"{"other":{}}"#).expect_err("error");
        assert!(matches!(e, CloudStackError::Decode { .. }));
    }
}
