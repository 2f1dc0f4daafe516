//! Access to CloudStack for one operation: whose credentials, which zone, which VM is ours,
//! and how CloudStack's errors become the error codes of docs/wire.md.
//!
//! Credentials come from `CLOUDSTACK_*` when `CLOUDSTACK_API_URL` is set, else from the
//! active `ossea_configs` row. The row is read again for every operation (a [`Session`]), so a
//! rotated key applies at once, without a restart.

use std::time::Duration;

use cloudstack::{Client, CloudStackError, Credentials, JobPolling, RetryPolicy};
use schema::{ErrorCode, EventError, OperationType, VmId, ZoneId};

use crate::db::configs::ConfigRow;

/// How long each kind of async job may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobDeadlines {
    pub create: Duration,
    pub attach: Duration,
    pub detach: Duration,
    pub snapshot: Duration,
}

/// Static CloudStack settings from the environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct CloudEnv {
    /// `None` means "read `ossea_configs`".
    pub credentials: Option<Credentials>,
    pub zone: Option<ZoneId>,
    pub host_vm: Option<VmId>,
}

/// Builds a [`Session`] per operation.
#[derive(Debug, Clone)]
pub(crate) struct Cloud {
    http: reqwest::Client,
    /// Told about every CloudStack call (metrics).
    observer: Option<std::sync::Arc<dyn cloudstack::Observer>>,
    env: CloudEnv,
    retry: RetryPolicy,
    deadlines: JobDeadlines,
}

/// A client with the credentials in force when the operation started.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub client: Client,
    /// The configured default zone, if any.
    pub zone: Option<ZoneId>,
    /// The VM this daemon runs on, if known: attachments to it are `host` mode.
    pub host_vm: Option<VmId>,
    deadlines: JobDeadlines,
}

impl Session {
    /// Job polling for one kind of job: fast at first, then backing off, up to its deadline.
    pub(crate) fn polling(&self, job: OperationType) -> JobPolling {
        let deadline = match job {
            OperationType::Create => self.deadlines.create,
            OperationType::Attach => self.deadlines.attach,
            OperationType::Detach | OperationType::Delete => self.deadlines.detach,
            OperationType::Snapshot
            | OperationType::RevertSnapshot
            | OperationType::DeleteSnapshot => self.deadlines.snapshot,
            // A resize is a volume change of the size of an attach.
            OperationType::Resize => self.deadlines.attach,
            // They start no job; a listVolumes is bounded by the request deadline.
            OperationType::Cancel | OperationType::Reconcile => self.deadlines.detach,
        };
        JobPolling {
            deadline,
            ..JobPolling::default()
        }
    }
}

/// How long a self-check's request is retried.
const PROBE_RETRY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The active `ossea_configs` row.
struct OsseaConfig {
    name: String,
    credentials: Credentials,
    zone: Option<String>,
    host_vm: Option<String>,
}

impl Cloud {
    pub(crate) fn new(
        http: reqwest::Client,
        env: CloudEnv,
        retry: RetryPolicy,
        deadlines: JobDeadlines,
    ) -> Self {
        Self {
            http,
            observer: None,
            env,
            retry,
            deadlines,
        }
    }

    pub(crate) fn with_observer(
        mut self,
        observer: std::sync::Arc<dyn cloudstack::Observer>,
    ) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Whether a session needs the `ossea_configs` row: the environment leaves the credentials,
    /// the zone or the host VM to it.
    pub(crate) fn needs_config_row(&self) -> bool {
        self.env.credentials.is_none() || self.env.zone.is_none() || self.env.host_vm.is_none()
    }

    /// The CloudStack access in force now, given the active `ossea_configs` row (read by the
    /// caller, which owns the database's retry policy).
    pub(crate) fn session(&self, row: Option<ConfigRow>) -> Result<Session, EventError> {
        self.session_with(row, self.retry)
    }

    /// A session for a self-check: retries for a few seconds only, so an unreachable
    /// CloudStack is reported soon.
    pub(crate) fn probe_session(&self, row: Option<ConfigRow>) -> Result<Session, EventError> {
        let retry = RetryPolicy {
            deadline: PROBE_RETRY_DEADLINE,
            ..self.retry
        };
        self.session_with(row, retry)
    }

    fn session_with(
        &self,
        row: Option<ConfigRow>,
        retry: RetryPolicy,
    ) -> Result<Session, EventError> {
        let row = row.map(OsseaConfig::from);
        let credentials = match (&self.env.credentials, &row) {
            (Some(c), _) => c.clone(),
            (None, Some(r)) => r.credentials.clone(),
            (None, None) => {
                return Err(EventError::new(
                    ErrorCode::CloudstackUnauthorized,
                    "no CloudStack configured: set CLOUDSTACK_API_URL, CLOUDSTACK_API_KEY and CLOUDSTACK_SECRET_KEY, or add an active ossea_configs row",
                ));
            }
        };
        let zone = match (self.env.zone, &row) {
            (Some(z), _) => Some(z),
            (None, Some(r)) => parse_column(r, "zone", r.zone.as_deref(), ZoneId::parse)?,
            (None, None) => None,
        };
        let host_vm = match (self.env.host_vm, &row) {
            (Some(v), _) => Some(v),
            (None, Some(r)) => parse_column(r, "oma_vm_id", r.host_vm.as_deref(), VmId::parse)?,
            (None, None) => None,
        };
        let mut client = Client::new(self.http.clone(), credentials, retry);
        if let Some(o) = &self.observer {
            client = client.with_observer(o.clone());
        }
        Ok(Session {
            client,
            zone,
            host_vm,
            deadlines: self.deadlines,
        })
    }
}

impl From<ConfigRow> for OsseaConfig {
    fn from(r: ConfigRow) -> Self {
        Self {
            name: r.name,
            credentials: Credentials {
                api_url: r.api_url,
                api_key: r.api_key,
                secret_key: r.secret_key,
            },
            zone: r.zone,
            host_vm: r.oma_vm_id,
        }
    }
}

fn parse_column<T, E: std::fmt::Display>(
    row: &OsseaConfig,
    column: &str,
    value: Option<&str>,
    parse: fn(&str) -> Result<T, E>,
) -> Result<Option<T>, EventError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse(v).map(Some).map_err(|e| {
            EventError::new(
                ErrorCode::CloudstackInvalidParameter,
                format!("ossea_configs {:?}: {column}: {e}", row.name),
            )
        }),
    }
}

/// The event error for a CloudStack failure (docs/cloudstack.md → the contract's codes).
pub(crate) fn classify(e: &CloudStackError) -> EventError {
    let code = match e {
        CloudStackError::Api { code, .. } => match code {
            401 | 531 => ErrorCode::CloudstackUnauthorized,
            429 | 532 => ErrorCode::CloudstackLimit,
            502 | 504 => ErrorCode::CloudstackUnavailable,
            430..=432 => ErrorCode::CloudstackInvalidParameter,
            536 => ErrorCode::VolumeInUse,
            503 | 530 | 533 | 534 => ErrorCode::CloudstackUnavailable,
            _ => ErrorCode::Internal,
        },
        CloudStackError::Transport { .. } | CloudStackError::Gateway { .. } => {
            ErrorCode::CloudstackUnavailable
        }
        CloudStackError::JobFailed { .. } | CloudStackError::JobCancelled { .. } => {
            ErrorCode::CloudstackJobFailed
        }
        CloudStackError::Deadline {
            job_id: Some(job), ..
        } => {
            // The job may still finish: not retryable (a retry could act twice), and the
            // hint says which job to look at.
            return EventError::new(ErrorCode::Timeout, e.to_string()).with_hint(format!(
                "CloudStack job {job} was still running at the deadline and may still finish: \
                 check it (queryAsyncJobResult) or the volume before acting again"
            ));
        }
        CloudStackError::Deadline { job_id: None, .. } => ErrorCode::Timeout,
        CloudStackError::Decode { .. } => ErrorCode::Internal,
    };
    let mut error = EventError::new(code, e.to_string()).with_cloudstack_code(e.cloudstack_code());
    if e.cloudstack_code() == Some(532) {
        // An account resource limit: CloudStack says not to retry (a rate limit, 429, may be
        // retried later).
        error.retryable = false;
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> CloudStackError {
        CloudStackError::Api {
            command: "createVolume".into(),
            code,
            cserrorcode: Some(4350),
            text: "x".into(),
        }
    }

    #[test]
    fn maps_cloudstack_codes_to_contract_codes() {
        assert_eq!(
            classify(&api(431)).code,
            ErrorCode::CloudstackInvalidParameter
        );
        assert_eq!(classify(&api(431)).cloudstack_error_code, Some(431));
        assert_eq!(classify(&api(401)).code, ErrorCode::CloudstackUnauthorized);
        assert_eq!(classify(&api(429)).code, ErrorCode::CloudstackLimit);
        assert_eq!(classify(&api(530)).code, ErrorCode::CloudstackUnavailable);
        assert_eq!(classify(&api(536)).code, ErrorCode::VolumeInUse);
        let job = CloudStackError::JobFailed {
            job_id: "j".into(),
            code: Some(530),
            text: "Failed to create volume: out of space".into(),
        };
        let e = classify(&job);
        assert_eq!(e.code, ErrorCode::CloudstackJobFailed);
        assert!(e.message.contains("out of space"));
        assert_eq!(e.cloudstack_error_code, Some(530));
        let deadline = CloudStackError::Deadline {
            what: "job j".into(),
            job_id: Some("j".into()),
            after: Duration::from_secs(1),
            last: "still in progress".into(),
        };
        let timeout = classify(&deadline);
        assert_eq!(timeout.code, ErrorCode::Timeout);
        assert!(!timeout.retryable, "the job may still finish");
        assert!(timeout.hint.contains("job j"), "{}", timeout.hint);
        assert!(
            !classify(&api(532)).retryable,
            "532: CloudStack says no retry"
        );
    }
}
