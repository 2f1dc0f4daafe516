//! Signed calls to the CloudStack API, with retries and async-job polling.

use std::fmt;
use std::sync::Once;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use serde_json::Value;

use schema::secret::{ExposeSecret, SecretString};
use schema::{DiskOfferingId, SnapshotId, VmId, VolumeId, ZoneId};

use crate::error::CloudStackError;
use crate::response::{
    self, AsyncJob, DiskOffering, JobId, JobStatus, Snapshot, VirtualMachine, Volume, Zone,
};
use crate::signing;

/// Where and as whom to call CloudStack. Re-read for every operation, so a rotated key
/// applies at once.
/// The secret key is a [`SecretString`]: its `Debug` shows nothing, so no log can leak it; the
/// `Debug` below also hides the API key and any password inside the URL.
#[derive(Clone)]
pub struct Credentials {
    /// e.g. `http://cloudstack:8080/client/api`
    pub api_url: String,
    pub api_key: String,
    pub secret_key: SecretString,
}

impl Credentials {
    /// Whether requests would cross a network in plain text: an `http://` URL whose host is
    /// not a loopback address. The body carries the api key and a signature anyone on the path
    /// can replay until it expires, so the daemon warns about such a URL.
    pub fn plaintext_to_remote(&self) -> bool {
        let Ok(url) = reqwest::Url::parse(&self.api_url) else {
            return false;
        };
        let host = url.host_str().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        url.scheme() == "http" && !loopback
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("api_url", &schema::secret::redact_url(&self.api_url))
            .field("api_key", &"***")
            .field("secret_key", &"***")
            .finish()
    }
}

/// How transient errors are retried: exponential backoff with jitter, bounded by a deadline.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// No retry starts after this much time has passed since the client was built.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(120),
        }
    }
}

/// When to ask about a running job. The interval is a fixed fraction of the time the job has
/// run so far, between a floor and a cap: a job is seen at most `min_interval` or
/// `overshoot_percent` % of its own length after it ended (whichever is more), and the calls
/// per job grow with the logarithm of its length, not linearly. With the defaults (10 ms,
/// 10 %, 5 s) the counts and lateness are pinned by a unit test (`polls_for` computes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPolling {
    /// The first poll comes this long after the job started, and no two polls are closer.
    pub min_interval: Duration,
    /// The interval as a percentage of the time the job has run.
    pub overshoot_percent: u32,
    /// No two polls are further apart.
    pub max_interval: Duration,
    pub deadline: Duration,
}

impl Default for JobPolling {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(10),
            overshoot_percent: 10,
            max_interval: Duration::from_secs(5),
            deadline: Duration::from_secs(600),
        }
    }
}

impl JobPolling {
    /// The wait before the next poll, `elapsed` into the job.
    pub fn next_delay(&self, elapsed: Duration) -> Duration {
        (elapsed * self.overshoot_percent / 100).clamp(self.min_interval, self.max_interval)
    }

    /// How many polls a job of `length` costs, and when the last one (the one that sees its
    /// end) comes.
    pub fn polls_for(&self, length: Duration) -> (u32, Duration) {
        let mut at = self.min_interval;
        let mut polls = 1;
        while at < length {
            at += self.next_delay(at);
            polls += 1;
        }
        (polls, at)
    }
}

/// Told about every call the client makes, for metrics. `result` is `ok`, the error code
/// (`429`, `530`, ...) or `transport`.
pub trait Observer: Send + Sync + fmt::Debug {
    fn call(&self, command: &str, result: &str);
    fn retry(&self, command: &str);
}

/// A CloudStack API client bound to one set of credentials. Cheap to build: the HTTP
/// connection pool is shared through the `reqwest::Client` passed in.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    creds: Credentials,
    retry: RetryPolicy,
    observer: Option<std::sync::Arc<dyn Observer>>,
}

static CRYPTO: Once = Once::new();

impl Client {
    /// The shared HTTP client: rustls with the ring provider, bounded timeouts.
    pub fn http() -> Result<reqwest::Client, CloudStackError> {
        CRYPTO.call_once(|| {
            // Fails only if another provider was installed first, which is fine too.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            // A signed request never follows a redirect to wherever it points: a 3xx is an
            // answer, and an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CloudStackError::Transport {
                command: "(building the HTTP client)".into(),
                source: e,
            })
    }

    pub fn new(http: reqwest::Client, creds: Credentials, retry: RetryPolicy) -> Self {
        Self {
            http,
            creds,
            retry,
            observer: None,
        }
    }

    /// Reports every call and retry to `observer`.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The signed query string for `command` with `params` (lowercase names, so the sort order
    /// cannot depend on casing), expiring in 10 minutes.
    pub fn signed_query(&self, command: &str, params: &[(&str, String)]) -> String {
        let expires = (Utc::now() + chrono::Duration::minutes(10))
            .format("%Y-%m-%dT%H:%M:%S+0000")
            .to_string();
        let mut all: Vec<(&str, &str)> = vec![
            ("apikey", self.creds.api_key.as_str()),
            ("command", command),
            ("response", "json"),
            ("signatureversion", "3"),
            ("expires", expires.as_str()),
        ];
        all.extend(params.iter().map(|(k, v)| (*k, v.as_str())));
        let signature = signing::sign(self.creds.secret_key.expose_secret(), all.iter().copied());
        all.iter()
            .map(|(k, v)| format!("{k}={}", signing::encode_value(v)))
            .chain(std::iter::once(format!(
                "signature={}",
                signing::encode_value(&signature)
            )))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// One signed request, no retry (a `cloudstack.request` span). Returns the inner object of
    /// `<command>response`.
    ///
    /// Sent as a POST with the signed parameters as its form body (CloudStack's `ApiServlet`
    /// reads both alike), so the api key and the signature, which stays valid until `expires`,
    /// never sit in a URL that a proxy or an access log records.
    #[tracing::instrument(name = "cloudstack.request", skip_all, fields(command = %command))]
    pub async fn request_once(
        &self,
        command: &str,
        params: &[(&str, String)],
    ) -> Result<Value, CloudStackError> {
        let form = self.signed_query(command, params);
        let transport = |e: reqwest::Error| CloudStackError::Transport {
            command: command.to_owned(),
            // The URL may carry userinfo: keep it out of messages.
            source: e.without_url(),
        };
        let result = async {
            let resp = self
                .http
                .post(&self.creds.api_url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form)
                .send()
                .await
                .map_err(transport)?;
            let status = resp.status().as_u16();
            let body = resp.text().await.map_err(transport)?;
            if status == 200 {
                response::unwrap_success(command, &body)
            } else {
                Err(response::parse_error(command, status, &body))
            }
        }
        .await;
        if let Some(o) = &self.observer {
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => e
                    .cloudstack_code()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| {
                        if e.was_answered() {
                            "invalid".to_owned()
                        } else {
                            "transport".to_owned()
                        }
                    }),
            };
            o.call(command, &outcome);
        }
        result
    }

    /// A request retried on transient errors for at most the retry deadline, counted from
    /// this request's first attempt (each request has its own budget: a long operation's late
    /// calls are retried as well as its first ones). `answered_only` limits retries to errors
    /// that CloudStack answered (it rejected the request, so re-sending cannot act twice);
    /// mutating calls use it, read-only calls retry connection errors too.
    async fn request(
        &self,
        command: &str,
        params: &[(&str, String)],
        answered_only: bool,
    ) -> Result<Value, CloudStackError> {
        let retry_until = tokio::time::Instant::now() + self.retry.deadline;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_jitter()
            .without_max_times();
        (|| self.request_once(command, params))
            .retry(backoff)
            .when(|e: &CloudStackError| {
                e.is_transient() && (!answered_only || e.was_answered()) && tokio::time::Instant::now() < retry_until
            })
            // A 429 names the delay it wants: wait at least that long, but never past the
            // retry deadline (then the error is the answer).
            .adjust(|e, delay| {
                let left = retry_until.saturating_duration_since(tokio::time::Instant::now());
                match (e.retry_after(), delay) {
                    (Some(wanted), Some(_)) if wanted > left => None,
                    (Some(wanted), Some(d)) => Some(d.max(wanted)),
                    (_, d) => d,
                }
            })
            .notify(|e, delay| {
                if let Some(o) = &self.observer {
                    o.retry(command);
                }
                tracing::warn!(command, error = %e, retry_in_ms = delay.as_millis() as u64, "CloudStack call failed; retrying");
            })
            .await
    }

    /// `createVolume` (async): the new volume's id and the job to wait for.
    pub async fn create_volume(
        &self,
        name: &str,
        zone: ZoneId,
        offering: DiskOfferingId,
        size_gib: Option<u64>,
    ) -> Result<(VolumeId, JobId), CloudStackError> {
        let mut params = vec![
            ("name", name.to_owned()),
            ("zoneid", zone.to_string()),
            ("diskofferingid", offering.to_string()),
        ];
        if let Some(gib) = size_gib {
            params.push(("size", gib.to_string()));
        }
        let inner = self.request("createVolume", &params, true).await?;
        response::parse_create_volume(&inner)
    }

    /// `attachVolume` (async). `device_id` 0 attaches as the root disk; `None` lets CloudStack
    /// pick the next free slot.
    pub async fn attach_volume(
        &self,
        volume: VolumeId,
        vm: VmId,
        device_id: Option<u32>,
    ) -> Result<JobId, CloudStackError> {
        let mut params = vec![
            ("id", volume.to_string()),
            ("virtualmachineid", vm.to_string()),
        ];
        if let Some(d) = device_id {
            params.push(("deviceid", d.to_string()));
        }
        let inner = self.request("attachVolume", &params, true).await?;
        response::parse_job_id("attachVolume", &inner)
    }

    /// `detachVolume` (async).
    pub async fn detach_volume(&self, volume: VolumeId) -> Result<JobId, CloudStackError> {
        let inner = self
            .request("detachVolume", &[("id", volume.to_string())], true)
            .await?;
        response::parse_job_id("detachVolume", &inner)
    }

    /// `createSnapshot` (async) of `volume` named `name`: the snapshot's id and the job.
    pub async fn create_snapshot(
        &self,
        volume: VolumeId,
        name: &str,
    ) -> Result<(SnapshotId, JobId), CloudStackError> {
        let params = [("volumeid", volume.to_string()), ("name", name.to_owned())];
        let inner = self.request("createSnapshot", &params, true).await?;
        response::parse_create_snapshot(&inner)
    }

    /// `revertSnapshot` (async): the snapshot's volume back to it.
    pub async fn revert_snapshot(&self, snapshot: SnapshotId) -> Result<JobId, CloudStackError> {
        let inner = self
            .request("revertSnapshot", &[("id", snapshot.to_string())], true)
            .await?;
        response::parse_job_id("revertSnapshot", &inner)
    }

    /// `deleteSnapshot` (async).
    pub async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<JobId, CloudStackError> {
        let inner = self
            .request("deleteSnapshot", &[("id", snapshot.to_string())], true)
            .await?;
        response::parse_job_id("deleteSnapshot", &inner)
    }

    /// `resizeVolume` (async) to `size_gib` GiB; a smaller size needs `shrink_ok`.
    pub async fn resize_volume(
        &self,
        volume: VolumeId,
        size_gib: u64,
        shrink_ok: bool,
    ) -> Result<JobId, CloudStackError> {
        let params = [
            ("id", volume.to_string()),
            ("size", size_gib.to_string()),
            ("shrinkok", shrink_ok.to_string()),
        ];
        let inner = self.request("resizeVolume", &params, true).await?;
        response::parse_job_id("resizeVolume", &inner)
    }

    /// `listSnapshots` with the given filters (`("volumeid", ...)`, `("id", ...)`,
    /// `("name", ...)`).
    pub async fn list_snapshots(
        &self,
        filters: &[(&str, String)],
    ) -> Result<Vec<Snapshot>, CloudStackError> {
        let mut params = vec![("listall", "true".to_owned())];
        params.extend(filters.iter().cloned());
        let inner = self.request("listSnapshots", &params, false).await?;
        response::parse_list("listSnapshots", "snapshot", &inner)
    }

    /// Waits for a snapshot job (createSnapshot, revertSnapshot): the snapshot it ended with.
    pub async fn wait_for_snapshot_job(
        &self,
        job: &JobId,
        polling: JobPolling,
    ) -> Result<Snapshot, CloudStackError> {
        let result = self.wait_for_job(job, polling).await?;
        response::parse_job_snapshot(job, &result)
    }

    /// `deleteVolume` (synchronous).
    pub async fn delete_volume(&self, volume: VolumeId) -> Result<(), CloudStackError> {
        let inner = self
            .request("deleteVolume", &[("id", volume.to_string())], true)
            .await?;
        response::parse_success("deleteVolume", &inner)
    }

    /// One volume, or `None` when CloudStack does not know it (an empty list, or the 431
    /// CloudStack answers for an id that does not exist).
    pub async fn get_volume(&self, volume: VolumeId) -> Result<Option<Volume>, CloudStackError> {
        match self.list_volumes(&[("id", volume.to_string())]).await {
            Ok(mut found) => Ok(found.pop()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `queryAsyncJobResult`, retried on transient errors (it is read-only).
    pub async fn query_job(&self, job: &JobId) -> Result<AsyncJob, CloudStackError> {
        let inner = self
            .request("queryAsyncJobResult", &[("jobid", job.0.clone())], false)
            .await?;
        response::parse_async_job(&inner)
    }

    /// Polls a job until it ends (a `cloudstack.job` span): its `jobresult` on success, `JobFailed` / `JobCancelled`
    /// otherwise, `Deadline` when it is still running after `polling.deadline`.
    #[tracing::instrument(name = "cloudstack.job", skip_all, fields(job_id = %job))]
    pub async fn wait_for_job(
        &self,
        job: &JobId,
        polling: JobPolling,
    ) -> Result<Value, CloudStackError> {
        let started = tokio::time::Instant::now();
        tokio::time::sleep(polling.min_interval).await;
        loop {
            let status = match self.query_job(job).await {
                Ok(j) => j.status,
                // The job runs on whether or not we can ask about it: a transient error that
                // outlasted its own retries is no reason to give up before the job's deadline.
                Err(e) if e.is_transient() => {
                    tracing::warn!(job = %job, error = %e, "cannot query the job for now; polling on");
                    JobStatus::Pending
                }
                Err(e) => return Err(e),
            };
            match status {
                JobStatus::Pending => {}
                JobStatus::Succeeded(result) => return Ok(result),
                JobStatus::Failed { code, text } => {
                    return Err(CloudStackError::JobFailed {
                        job_id: job.0.clone(),
                        code,
                        text,
                    });
                }
                JobStatus::Cancelled => {
                    return Err(CloudStackError::JobCancelled {
                        job_id: job.0.clone(),
                    });
                }
            }
            let delay = polling.next_delay(started.elapsed());
            if started.elapsed() + delay > polling.deadline {
                return Err(CloudStackError::Deadline {
                    what: format!("job {job}"),
                    job_id: Some(job.0.clone()),
                    after: polling.deadline,
                    last: "still in progress (jobstatus 0)".into(),
                });
            }
            tracing::debug!(job = %job, delay_ms = delay.as_millis() as u64, "job in progress");
            tokio::time::sleep(delay).await;
        }
    }

    /// Waits for a volume job and returns the volume it reports.
    pub async fn wait_for_volume_job(
        &self,
        job: &JobId,
        polling: JobPolling,
    ) -> Result<Volume, CloudStackError> {
        let result = self.wait_for_job(job, polling).await?;
        response::parse_job_volume(job, &result)
    }

    /// `listVolumes` with the given filters (e.g. `("id", ...)`, `("name", ...)`).
    pub async fn list_volumes(
        &self,
        filters: &[(&str, String)],
    ) -> Result<Vec<Volume>, CloudStackError> {
        let mut params = vec![("listall", "true".to_owned())];
        params.extend(filters.iter().cloned());
        let inner = self.request("listVolumes", &params, false).await?;
        response::parse_list("listVolumes", "volume", &inner)
    }

    /// `listVolumes` without `listall`: only the caller's own account's volumes, so a look-up
    /// by name for what the caller's createVolume made never finds another account's volume
    /// of that name.
    pub async fn list_own_volumes(
        &self,
        filters: &[(&str, String)],
    ) -> Result<Vec<Volume>, CloudStackError> {
        let inner = self.request("listVolumes", filters, false).await?;
        response::parse_list("listVolumes", "volume", &inner)
    }

    pub async fn list_virtual_machines(
        &self,
        filters: &[(&str, String)],
    ) -> Result<Vec<VirtualMachine>, CloudStackError> {
        let mut params = vec![("listall", "true".to_owned())];
        params.extend(filters.iter().cloned());
        let inner = self.request("listVirtualMachines", &params, false).await?;
        response::parse_list("listVirtualMachines", "virtualmachine", &inner)
    }

    pub async fn list_zones(&self) -> Result<Vec<Zone>, CloudStackError> {
        let inner = self.request("listZones", &[], false).await?;
        response::parse_list("listZones", "zone", &inner)
    }

    pub async fn list_disk_offerings(
        &self,
        zone: Option<ZoneId>,
    ) -> Result<Vec<DiskOffering>, CloudStackError> {
        let params: Vec<(&str, String)> = zone
            .map(|z| ("zoneid", z.to_string()))
            .into_iter()
            .collect();
        let inner = self.request("listDiskOfferings", &params, false).await?;
        response::parse_list("listDiskOfferings", "diskoffering", &inner)
    }
}

#[cfg(test)]
mod polling_tests {
    use super::*;

    /// The calls a job costs and how late its end is seen, for short and long jobs alike.
    #[test]
    fn the_default_schedule_sees_ends_soon_at_a_logarithmic_cost() {
        let p = JobPolling::default();
        let ms = Duration::from_millis;
        for (length, max_polls) in [
            (ms(50), 5),
            (ms(500), 27),
            (Duration::from_secs(5), 52),
            (Duration::from_secs(300), 130),
        ] {
            let (polls, seen) = p.polls_for(length);
            let late = seen - length;
            println!("{length:?}: {polls} polls, seen {late:?} after its end");
            assert!(polls <= max_polls, "{length:?}: {polls} polls");
            // Late by at most the floor, or the overshoot share of the length (or the cap).
            let allowed =
                (length * p.overshoot_percent / 100).clamp(p.min_interval, p.max_interval);
            assert!(late <= allowed, "{length:?}: seen {late:?} late");
        }
        assert_eq!(p.next_delay(Duration::ZERO), p.min_interval);
        assert_eq!(p.next_delay(Duration::from_secs(3600)), p.max_interval);
    }
}

#[cfg(test)]
mod credentials_tests {
    use super::*;

    /// L17: no key and no password in the URL show in a `Debug` of the credentials.
    #[test]
    fn credentials_debug_shows_no_key() {
        let c = Credentials {
            api_url: "http://admin:url-pass@cloudstack:8080/client/api".into(),
            api_key: "the-api-key".into(),
            secret_key: "the-secret".to_owned().into(),
        };
        let shown = format!("{c:?}");
        for secret in ["url-pass", "the-api-key", "the-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("cloudstack:8080"), "{shown}");
    }

    /// L11: plain `http://` is flagged only when it leaves the machine.
    #[test]
    fn plain_http_is_flagged_only_towards_another_machine() {
        let at = |url: &str| Credentials {
            api_url: url.into(),
            api_key: "k".into(),
            secret_key: "s".to_owned().into(),
        };
        for remote in [
            "http://cloudstack:8080/client/api",
            "http://10.0.0.5/client/api",
            "http://[2001:db8::1]:8080/client/api",
        ] {
            assert!(at(remote).plaintext_to_remote(), "{remote}");
        }
        for fine in [
            "https://cloudstack/client/api",
            "http://127.0.0.1:8080/client/api",
            "http://localhost:8080/client/api",
            "http://[::1]:8080/client/api",
        ] {
            assert!(!at(fine).plaintext_to_remote(), "{fine}");
        }
    }
}
