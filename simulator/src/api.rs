//! The HTTP surface of the simulator: `/client/api` as CloudStack serves it, and `/sim/*` for
//! tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use chrono::{NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use schema::VmId;

use crate::faults::Faults;
use crate::state::{ApiError, CallRecord, Sim};

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/client/api", get(api).post(api))
        .route("/sim/calls", get(calls))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/keys", post(set_keys))
        .route("/sim/vms", post(add_vm))
        .route("/sim/vms/{id}/power", post(set_power))
        .with_state(sim)
}

async fn calls(State(sim): State<Arc<Sim>>) -> Json<Vec<CallRecord>> {
    Json(sim.calls())
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Json<Faults> {
    Json(sim.faults())
}

async fn set_faults(State(sim): State<Arc<Sim>>, Json(faults): Json<Faults>) -> Json<Faults> {
    sim.set_faults(faults);
    Json(sim.faults())
}

#[derive(Deserialize)]
struct Keys {
    api_key: String,
    secret_key: String,
}

async fn set_keys(State(sim): State<Arc<Sim>>, Json(keys): Json<Keys>) -> StatusCode {
    sim.set_keys(&keys.api_key, &keys.secret_key);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct NewVm {
    id: VmId,
    name: String,
    /// With a root disk at device 0 (default).
    #[serde(default = "yes")]
    root: bool,
    /// Running (default) or stopped.
    #[serde(default = "yes")]
    running: bool,
}

fn yes() -> bool {
    true
}

async fn add_vm(State(sim): State<Arc<Sim>>, Json(vm): Json<NewVm>) -> StatusCode {
    sim.add_vm_with(vm.id, &vm.name, vm.root, vm.running);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Power {
    running: bool,
}

/// Starts or stops a VM: `{"running": false}`.
async fn set_power(
    State(sim): State<Arc<Sim>>,
    axum::extract::Path(id): axum::extract::Path<VmId>,
    Json(power): Json<Power>,
) -> StatusCode {
    if sim.set_vm_running(id, power.running) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
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
    let in_url: Vec<String> = pairs.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    pairs.extend(form_urlencoded::parse(&body).into_owned());
    // Names are matched case-insensitively; the signature covers them as sent.
    let params: HashMap<String, String> = pairs
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let command = params.get("command").cloned().unwrap_or_default();
    let lower = command.to_ascii_lowercase();

    let mut faults = sim.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if take_lost(&sim, &lower) {
        return broken_answer();
    }
    let admitted = authenticate(&sim, &pairs, &params)
        .and_then(|()| faults.injected_error(&lower).map_or(Ok(()), Err));
    let slow = admitted.is_ok().then(|| take_slow(&sim, &lower)).flatten();
    let result = match (admitted, slow) {
        (Err(e), _) => Err(e),
        (Ok(()), None) => dispatch(&sim, &lower, &params),
        (Ok(()), Some(slow)) => {
            // Recorded by the task that acts: the client may be gone before the answer.
            let call = (command.clone(), params.clone(), at, in_url);
            return slow_answer(slow_dispatch(&sim, call, slow).await, &command);
        }
    };
    let dropped = result.is_ok() && {
        // `take_drop` counts down `drop_next`; write the change back.
        let dropped = faults.take_drop(&lower);
        if dropped {
            let mut now = sim.faults();
            now.drop_next = faults.drop_next.clone();
            sim.set_faults(now);
        }
        dropped
    };
    let (status, body, error_text) = match result {
        Ok(inner) => (200, json!({ response_key(&command): inner }), None),
        Err(e) => (
            e.code,
            json!({ response_key(&command): {
                "uuidList": [], "errorcode": e.code, "cserrorcode": e.cserrorcode, "errortext": e.text,
            }}),
            Some(e.text),
        ),
    };
    sim.record_call(CallRecord {
        command: command.clone(),
        params,
        at,
        answered_at: Utc::now(),
        status,
        error_text,
        dropped,
        in_url,
    });
    if dropped {
        // The call took effect; the client sees the connection break mid-answer.
        return broken_answer();
    }
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
    let secret_key = params
        .get("apikey")
        .and_then(|k| sim.secret_of(k))
        .ok_or_else(unauthorized)?;
    if params.get("signatureversion").map(String::as_str) == Some("3") {
        let expires = params.get("expires").ok_or_else(unauthorized)?;
        let expires = chrono::DateTime::parse_from_str(expires, "%Y-%m-%dT%H:%M:%S%z")
            .map(|d| d.naive_utc())
            .or_else(|_| NaiveDateTime::parse_from_str(expires, "%Y-%m-%dT%H:%M:%S"))
            .map_err(|_| unauthorized())?;
        if expires < Utc::now().naive_utc() {
            return Err(unauthorized());
        }
    }
    let signed = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    if cloudstack::signing::verify(&secret_key, signed, signature) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

/// An answer whose connection breaks before any byte of the body: the client cannot tell
/// whether the call acted.
fn broken_answer() -> Response {
    let broken = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("dropped by fault injection"))
    });
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::from_stream(broken))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Whether this call of `command` is to be lost (counts `lose_next` down).
fn take_lost(sim: &Arc<Sim>, command: &str) -> bool {
    let mut faults = sim.faults();
    match faults.lose_next.get_mut(command) {
        Some(n) if *n > 0 => {
            *n -= 1;
            sim.set_faults(faults);
            true
        }
        _ => false,
    }
}

/// The armed slow call of `command`, if any (used once).
fn take_slow(sim: &Arc<Sim>, command: &str) -> Option<crate::faults::SlowCall> {
    let mut faults = sim.faults();
    let slow = faults.slow_next.remove(command)?;
    sim.set_faults(faults);
    Some(slow)
}

/// Acts after `slow.act_after_ms` in a task of its own, which records the call (a client that
/// hangs up stops neither), and answers after `slow.answer_after_ms`.
async fn slow_dispatch(
    sim: &Arc<Sim>,
    (command, params, at, in_url): (
        String,
        HashMap<String, String>,
        chrono::DateTime<Utc>,
        Vec<String>,
    ),
    slow: crate::faults::SlowCall,
) -> Result<Value, ApiError> {
    let arrived = tokio::time::Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sim = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(arrived + Duration::from_millis(slow.act_after_ms)).await;
        let result = dispatch(&sim, &command.to_ascii_lowercase(), &params);
        let (status, error_text) = match &result {
            Ok(_) => (200, None),
            Err(e) => (e.code, Some(e.text.clone())),
        };
        sim.record_call(CallRecord {
            command,
            params,
            at,
            answered_at: Utc::now(),
            status,
            error_text,
            dropped: false,
            in_url,
        });
        let _ = tx.send(result);
    });
    tokio::time::sleep_until(arrived + Duration::from_millis(slow.answer_after_ms)).await;
    rx.await
        .unwrap_or_else(|_| Err(ApiError::param("the simulated call was lost")))
}

/// The answer to a slow call, as any other call's.
fn slow_answer(result: Result<Value, ApiError>, command: &str) -> Response {
    let (status, body) = match result {
        Ok(inner) => (200, json!({ response_key(command): inner })),
        Err(e) => (
            e.code,
            json!({ response_key(command): {
                "uuidList": [], "errorcode": e.code, "cserrorcode": e.cserrorcode, "errortext": e.text,
            }}),
        ),
    };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

fn dispatch(sim: &Arc<Sim>, command: &str, p: &HashMap<String, String>) -> Result<Value, ApiError> {
    match command {
        "listzones" => Ok(sim.list_zones()),
        "listdiskofferings" => Ok(sim.list_disk_offerings()),
        "listvirtualmachines" => sim.list_virtual_machines(p),
        "createvolume" => sim.create_volume(p),
        "attachvolume" => sim.attach_volume(p),
        "detachvolume" => sim.detach_volume(p),
        "deletevolume" => sim.delete_volume(p),
        "queryasyncjobresult" => sim.query_async_job(p),
        "listvolumes" => sim.list_volumes(p),
        "createsnapshot" => sim.create_snapshot(p),
        "listsnapshots" => sim.list_snapshots(p),
        "revertsnapshot" => sim.revert_snapshot(p),
        "deletesnapshot" => sim.delete_snapshot(p),
        "resizevolume" => sim.resize_volume(p),
        // CloudStack answers an unknown command like a bad signature.
        _ => Err(unauthorized()),
    }
}
