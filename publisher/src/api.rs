//! A client of the daemon's read-only JSON API (docs/http.md): what `volumectl get`, `ops`,
//! `volume`, `vm` and `devices` read. The bodies are `schema::api`'s types, the ones the daemon
//! serializes.

use std::time::Duration;

use schema::api::{
    ApiError, DeviceView, ExportList, OperationPage, OperationView, VmVolumes, VolumeView,
};
use schema::{CommandId, OperationStatus, OperationType, VmId, VolumeId};

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("cannot reach the daemon's read API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// 404: the id is unknown (the daemon's message names it).
    #[error("{message}")]
    NotFound { message: String },
    /// Any other error status, with the daemon's code and message.
    #[error("the read API answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the read API's answer to {url} is not what it should be: {detail}")]
    Decode { url: String, detail: String },
    #[error("cannot build an HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

static CRYPTO: std::sync::Once = std::sync::Once::new();

/// The filters of `GET /api/v1/operations`.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    pub status: Option<OperationStatus>,
    pub op_type: Option<OperationType>,
    pub volume_id: Option<VolumeId>,
    pub vm_id: Option<VmId>,
}

/// The read API of one daemon.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// `base` is the daemon's HTTP address as a URL (`http://127.0.0.1:8090`) or `host:port`.
    pub fn new(base: &str) -> Result<Self, ApiClientError> {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        CRYPTO.call_once(|| {
            // Fails only if another provider was installed first, which is fine too.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(ApiClientError::Build)?;
        Ok(Self { base, http })
    }

    pub async fn operation(&self, id: &CommandId) -> Result<OperationView, ApiClientError> {
        self.get(&format!("/api/v1/operations/{id}"), &[]).await
    }

    /// One page of operations, newest first, from `cursor` (the previous page's `next_cursor`).
    pub async fn operations(
        &self,
        q: &OperationQuery,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<OperationPage, ApiClientError> {
        let mut params: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        params.extend(q.status.map(|s| ("status", s.as_str().to_owned())));
        params.extend(q.op_type.map(|t| ("type", t.as_str().to_owned())));
        params.extend(q.volume_id.map(|v| ("volume_id", v.to_string())));
        params.extend(q.vm_id.map(|v| ("vm_id", v.to_string())));
        params.extend(cursor.map(|c| ("cursor", c.to_owned())));
        self.get("/api/v1/operations", &params).await
    }

    pub async fn volume(&self, id: VolumeId) -> Result<VolumeView, ApiClientError> {
        self.get(&format!("/api/v1/volumes/{id}"), &[]).await
    }

    pub async fn vm_volumes(&self, id: VmId) -> Result<VmVolumes, ApiClientError> {
        self.get(&format!("/api/v1/vms/{id}/volumes"), &[]).await
    }

    pub async fn devices(&self) -> Result<Vec<DeviceView>, ApiClientError> {
        self.get("/api/v1/devices", &[]).await
    }

    /// The active NBD exports.
    pub async fn exports(&self) -> Result<ExportList, ApiClientError> {
        self.get("/api/v1/exports", &[]).await
    }

    /// `GET /ready`: its status code (200 ready, 503 not) and its JSON body.
    pub async fn ready(&self) -> Result<(u16, serde_json::Value), ApiClientError> {
        let url = format!("{}/ready", self.base);
        let unreachable = |source| ApiClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let response = self.http.get(&url).send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        let json = serde_json::from_slice(&body).map_err(|e| ApiClientError::Decode {
            url: url.clone(),
            detail: format!("/ready answered {status} with a body that is not JSON: {e}"),
        })?;
        Ok((status, json))
    }

    /// The daemon's URL, as given.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<T, ApiClientError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |source| ApiClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let response = self
            .http
            .get(&url)
            .query(params)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        if status == 200 {
            return serde_json::from_slice(&body).map_err(|e| ApiClientError::Decode {
                url,
                detail: e.to_string(),
            });
        }
        let error: ApiError =
            serde_json::from_slice(&body).map_err(|_| ApiClientError::Decode {
                url: url.clone(),
                detail: format!(
                    "status {status} with a body that is not the API's error object: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            })?;
        Err(if status == 404 {
            ApiClientError::NotFound {
                message: error.error.message,
            }
        } else {
            ApiClientError::Refused {
                status,
                code: error.error.code,
                message: error.error.message,
            }
        })
    }
}
