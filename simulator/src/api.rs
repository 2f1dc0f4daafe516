//! The HTTP surface of the simulator: `/client/api` as CloudStack serves it, and `/sim/*` for
//! tests.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chrono::{NaiveDateTime, Utc};
use serde_json::{Value, json};

use crate::state::{ApiError, CallRecord, Sim};

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/client/api", get(api).post(api))
        .route("/sim/calls", get(calls))
        .with_state(sim)
}

async fn calls(State(sim): State<Arc<Sim>>) -> Json<Vec<CallRecord>> {
    Json(sim.calls())
}

/// What CloudStack answers to any authentication failure, and to an unknown command.
const UNAUTHORIZED: &str = "unable to verify user credentials and/or request signature";

/// One API request: GET query string, or POST form body (or both).
async fn api(State(sim): State<Arc<Sim>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let at = Utc::now();
    let mut pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    pairs.extend(form_urlencoded::parse(&body).into_owned());
    // Names are matched case-insensitively; the signature covers them as sent.
    let params: HashMap<String, String> = pairs
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let command = params.get("command").cloned().unwrap_or_default();

    let result =
        authenticate(&sim, &pairs, &params).and_then(|()| dispatch(&sim, &command, &params));
    let (status, body) = match result {
        Ok(inner) => (200, json!({ response_key(&command): inner })),
        Err(e) => (
            e.code,
            json!({ response_key(&command): {
                "uuidList": [], "errorcode": e.code, "cserrorcode": e.cserrorcode, "errortext": e.text,
            }}),
        ),
    };
    sim.record_call(CallRecord {
        command: command.clone(),
        params,
        at,
        status,
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

fn response_key(command: &str) -> String {
    if command.is_empty() {
        "errorresponse".into()
    } else {
        format!("{}response", command.to_ascii_lowercase())
    }
}

fn unauthorized() -> ApiError {
    ApiError {
        code: 401,
        cserrorcode: None,
        text: UNAUTHORIZED.into(),
    }
}

/// CloudStack's `ApiServer.verifyRequest`: known api key, signature over every parameter as
/// sent, and (signature version 3) an `expires` that has not passed.
fn authenticate(
    sim: &Sim,
    pairs: &[(String, String)],
    params: &HashMap<String, String>,
) -> Result<(), ApiError> {
    let signature = pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("signature"))
        .map(|(_, v)| v.as_str())
        .ok_or_else(unauthorized)?;
    if params.get("apikey") != Some(&sim.config.api_key) {
        return Err(unauthorized());
    }
    if params.get("signatureversion").map(String::as_str) == Some("3") {
        let expires = params.get("expires").ok_or_else(unauthorized)?;
        let expires = NaiveDateTime::parse_from_str(expires, "%Y-%m-%dT%H:%M:%S%z")
            .or_else(|_| {
                chrono::DateTime::parse_from_str(expires, "%Y-%m-%dT%H:%M:%S%z")
                    .map(|d| d.naive_utc())
            })
            .map_err(|_| unauthorized())?;
        if expires < Utc::now().naive_utc() {
            return Err(unauthorized());
        }
    }
    let signed = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    if cloudstack::signing::verify(&sim.config.secret_key, signed, signature) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

fn dispatch(sim: &Arc<Sim>, command: &str, p: &HashMap<String, String>) -> Result<Value, ApiError> {
    match command.to_ascii_lowercase().as_str() {
        "listzones" => Ok(sim.list_zones()),
        "listdiskofferings" => Ok(sim.list_disk_offerings()),
        "createvolume" => sim.create_volume(p),
        "queryasyncjobresult" => sim.query_async_job(p),
        "listvolumes" => sim.list_volumes(p),
        // CloudStack answers an unknown command like a bad signature.
        _ => Err(unauthorized()),
    }
}
