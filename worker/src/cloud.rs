//! Access to CloudStack for one operation: whose credentials, which zone, and how its errors
//! become the error codes of CONTRACT §4.
//!
//! Credentials come from `CLOUDSTACK_*` when `CLOUDSTACK_API_URL` is set, else from the
//! active `ossea_configs` row, read again for every operation so a rotated key applies at
//! once.

use sqlx::{MySqlPool, Row};

use cloudstack::{Client, CloudStackError, Credentials, JobPolling, RetryPolicy};
use schema::{ErrorCode, EventError, ZoneId};

/// Builds a [`Session`] per operation.
#[derive(Debug, Clone)]
pub struct Cloud {
    http: reqwest::Client,
    pool: MySqlPool,
    /// From the environment; `None` means "read `ossea_configs`".
    env: Option<Credentials>,
    env_zone: Option<ZoneId>,
    pub retry: RetryPolicy,
    pub polling: JobPolling,
}

/// A client with the credentials in force when the operation started.
#[derive(Debug, Clone)]
pub struct Session {
    pub client: Client,
    /// The configured default zone, if any.
    pub zone: Option<ZoneId>,
    pub polling: JobPolling,
}

impl Cloud {
    pub fn new(
        http: reqwest::Client,
        pool: MySqlPool,
        env: Option<Credentials>,
        env_zone: Option<ZoneId>,
        retry: RetryPolicy,
        polling: JobPolling,
    ) -> Self {
        Self {
            http,
            pool,
            env,
            env_zone,
            retry,
            polling,
        }
    }

    pub async fn session(&self) -> Result<Session, EventError> {
        let (creds, zone) = match &self.env {
            Some(creds) => (creds.clone(), self.env_zone),
            None => self.active_config().await?,
        };
        Ok(Session {
            client: Client::new(self.http.clone(), creds, self.retry),
            zone,
            polling: self.polling,
        })
    }

    async fn active_config(&self) -> Result<(Credentials, Option<ZoneId>), EventError> {
        let row = sqlx::query(
            "SELECT name, api_url, api_key, secret_key, zone FROM ossea_configs \
             WHERE is_active = TRUE ORDER BY updated_at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| EventError::new(ErrorCode::Internal, format!("reading ossea_configs failed: {e}")))?
        .ok_or_else(|| {
            EventError::new(
                ErrorCode::CloudstackUnauthorized,
                "no CloudStack configured: set CLOUDSTACK_API_URL, CLOUDSTACK_API_KEY and CLOUDSTACK_SECRET_KEY, or add an active ossea_configs row",
            )
        })?;
        let get = |col: &str| -> Result<Option<String>, EventError> {
            row.try_get(col).map_err(|e| {
                EventError::new(ErrorCode::Internal, format!("ossea_configs.{col}: {e}"))
            })
        };
        let name = get("name")?.unwrap_or_default();
        let creds = Credentials {
            api_url: get("api_url")?.unwrap_or_default(),
            api_key: get("api_key")?.unwrap_or_default(),
            secret_key: get("secret_key")?.unwrap_or_default(),
        };
        let zone = match get("zone")?.filter(|z| !z.trim().is_empty()) {
            None => None,
            Some(z) => Some(ZoneId::parse(z.trim()).map_err(|e| {
                EventError::new(
                    ErrorCode::CloudstackInvalidParameter,
                    format!("ossea_configs {name:?}: zone {e}"),
                )
            })?),
        };
        Ok((creds, zone))
    }
}

/// The event error for a CloudStack failure (CLOUDSTACK.md §4 → CONTRACT §4).
pub fn classify(e: &CloudStackError) -> EventError {
    let code = match e {
        CloudStackError::Api { code, .. } => match code {
            401 | 531 => ErrorCode::CloudstackUnauthorized,
            429 | 532 => ErrorCode::CloudstackLimit,
            430..=432 => ErrorCode::CloudstackInvalidParameter,
            536 => ErrorCode::VolumeInUse,
            503 | 530 | 533 | 534 => ErrorCode::CloudstackUnavailable,
            _ => ErrorCode::Internal,
        },
        CloudStackError::Transport { .. } => ErrorCode::CloudstackUnavailable,
        CloudStackError::JobFailed { .. } | CloudStackError::JobCancelled { .. } => {
            ErrorCode::CloudstackJobFailed
        }
        CloudStackError::Deadline { .. } => ErrorCode::Timeout,
        CloudStackError::Decode { .. } => ErrorCode::Internal,
    };
    EventError::new(code, e.to_string()).with_cloudstack_code(e.cloudstack_code())
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
        let job = CloudStackError::JobFailed {
            job_id: "j".into(),
            code: Some(530),
            text: "Failed to create volume: out of space".into(),
        };
        let e = classify(&job);
        assert_eq!(e.code, ErrorCode::CloudstackJobFailed);
        assert!(e.message.contains("out of space"));
        assert_eq!(e.cloudstack_error_code, Some(530));
    }
}
