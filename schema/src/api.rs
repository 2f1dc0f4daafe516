//! The read-only JSON API (docs/http.md): the bodies the daemon serves under `/api/v1` and
//! `volumectl` reads. The daemon serializes these types and the client deserializes them, and
//! `openapi.json` at the workspace root is generated from them ([`openapi`]); a test fails when
//! the committed document and the types disagree.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::command::OperationType;
use crate::error::EventError;
use crate::event::OperationStatus;
use crate::ids::{CommandId, VmId, VolumeId};

/// Largest page of `GET /api/v1/operations`.
pub const MAX_PAGE: u32 = 500;
/// Page size when `limit` is absent.
pub const DEFAULT_PAGE: u32 = 50;

/// An operation as `volume_operations` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OperationView {
    /// The command id.
    pub id: CommandId,
    #[serde(rename = "type")]
    pub op_type: OperationType,
    pub status: OperationStatus,
    pub volume_id: Option<VolumeId>,
    pub vm_id: Option<VmId>,
    pub correlation_id: Option<String>,
    /// The failed event's error object; null unless the operation failed.
    pub error: Option<EventError>,
    pub cloudstack_job_id: Option<String>,
    /// Executions started (more than one after a takeover or a restart).
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The command as accepted.
    pub request: Value,
    /// What the operation reported when it ended (null before, and for failures).
    pub response: Option<Value>,
    /// Brought over from the old Go daemon by `volume-daemon import-legacy`.
    #[serde(default)]
    pub imported: bool,
}

/// A page of operations, newest first. `next_cursor` fetches the next (older) page; null on
/// the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OperationPage {
    pub items: Vec<OperationView>,
    pub next_cursor: Option<String>,
}

/// `operation_mode`: `oma` for the host VM, `failover` for any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MappingMode {
    Oma,
    Failover,
}

/// Where an attached volume is (`device_mappings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MappingView {
    pub volume_id: VolumeId,
    pub vm_id: VmId,
    pub mode: MappingMode,
    /// `/dev/vdX` of a host attachment whose device is present; null otherwise.
    pub device_path: Option<String>,
    pub by_id_path: Option<String>,
    /// The persistent device name of a host attachment (docs/host.md).
    pub persistent_path: Option<String>,
    pub serial: Option<String>,
    /// `attached`.
    pub cloudstack_state: String,
    /// `present`, `missing` (host attachment without a device) or `remote`.
    pub linux_state: String,
    /// Bytes.
    pub size: Option<u64>,
    pub last_sync: Option<DateTime<Utc>>,
}

/// An NBD export of a host attachment (`nbd_exports`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExportView {
    pub volume_id: VolumeId,
    /// `migration-vol-<volume_id>`.
    pub name: String,
    /// `NBD_URL/<name>`.
    pub url: String,
    /// The persistent path the export entry points at.
    pub target_path: String,
    /// `active` or `removed`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/volumes/{id}`: what the daemon knows of one volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeView {
    pub volume_id: VolumeId,
    pub mapping: Option<MappingView>,
    /// The active export, if any.
    pub nbd_export: Option<ExportView>,
    /// The newest operation on the volume.
    pub last_operation: Option<OperationView>,
    /// The snapshots the daemon took of the volume that were not deleted, newest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotView>,
}

/// A volume snapshot the daemon took (`snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotView {
    pub id: crate::SnapshotId,
    /// CloudStack's name (it contains the command id that took it).
    pub name: String,
    /// CloudStack's state when the snapshot operation ended (`BackedUp`, ...).
    pub state: String,
    pub created: DateTime<Utc>,
    /// The `snapshot` command that took it.
    pub operation_id: Option<CommandId>,
}

/// `GET /api/v1/vms/{id}/volumes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmVolumes {
    pub vm_id: VmId,
    pub items: Vec<MappingView>,
}

/// A row of the device monitor's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceView {
    /// `vdb`.
    pub name: String,
    /// Bytes.
    pub size: Option<u64>,
    pub serial: Option<String>,
    /// The `virtioN` controller.
    pub controller: Option<String>,
    /// The volume of the host mapping on this device, if any.
    pub volume_id: Option<VolumeId>,
}

/// `GET /api/v1/exports`: the active exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExportList {
    pub items: Vec<ExportView>,
}

/// Every 4xx/5xx body of the read API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiErrorBody {
    /// `BAD_REQUEST`, `NOT_FOUND` or `UNAVAILABLE`.
    pub code: String,
    /// What was wrong, naming the parameter or id.
    pub message: String,
}

/// The OpenAPI 3.1 document of the read API, its schemas generated from the types above.
pub fn openapi() -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    // Each is a `$ref` into `components/schemas` (the device list: an array of them).
    let refs: serde_json::Map<String, Value> = [
        ("OperationView", generator.subschema_for::<OperationView>()),
        ("OperationPage", generator.subschema_for::<OperationPage>()),
        ("VolumeView", generator.subschema_for::<VolumeView>()),
        ("VmVolumes", generator.subschema_for::<VmVolumes>()),
        ("DeviceList", generator.subschema_for::<Vec<DeviceView>>()),
        ("MappingView", generator.subschema_for::<MappingView>()),
        ("ExportList", generator.subschema_for::<ExportList>()),
        ("ApiError", generator.subschema_for::<ApiError>()),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_owned(), s.to_value()))
    .collect();
    let components: serde_json::Map<String, Value> =
        generator.take_definitions(true).into_iter().collect();
    let ok = |name: &str, description: &str| json!({"description": description, "content": {"application/json": {"schema": refs[name]}}});
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": refs["ApiError"]}}});
    let path_param = |name: &str, description: &str| json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}});
    let query = |name: &str, description: &str, schema: Value| json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema});
    let get = |id: &str, summary: &str, params: Vec<Value>, body: Value, not_found: bool| {
        let mut responses = json!({"200": body, "400": error("a malformed id or parameter")});
        if not_found {
            responses["404"] = error("no such id");
        }
        responses["503"] = error("the database is unreachable");
        json!({"get": {"operationId": id, "summary": summary, "parameters": params, "responses": responses}})
    };
    let paths = json!({
        "/api/v1/operations/{id}": get("getOperation", "One operation", vec![path_param("id", "the command id")], ok("OperationView", "the operation"), true),
        "/api/v1/operations": get("listOperations", "Operations, newest first", vec![
            query("status", "pending, executing, completed, failed or cancelled", json!({"type": "string"})),
            query("type", "create, attach, detach, delete, cancel or reconcile", json!({"type": "string"})),
            query("volume_id", "a volume id", json!({"type": "string", "format": "uuid"})),
            query("vm_id", "a VM id", json!({"type": "string", "format": "uuid"})),
            query("limit", "page size", json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE})),
            query("cursor", "the previous page's next_cursor", json!({"type": "string"})),
        ], ok("OperationPage", "a page of operations"), false),
        "/api/v1/volumes/{id}": get("getVolume", "A volume's mapping, export and last operation", vec![path_param("id", "the volume id")], ok("VolumeView", "the volume"), true),
        "/api/v1/vms/{id}/volumes": get("listVmVolumes", "A VM's mapped volumes", vec![path_param("id", "the VM id")], ok("VmVolumes", "the VM's mappings"), false),
        "/api/v1/devices": get("listDevices", "The device monitor's table", vec![], ok("DeviceList", "the devices"), false),
        "/api/v1/devices/{name}/volume": get("getDeviceVolume", "The mapping of the volume on a host device", vec![path_param("name", "a device name such as vdb")], ok("MappingView", "the mapping"), true),
        "/api/v1/exports": get("listExports", "The active NBD exports", vec![], ok("ExportList", "the exports"), false),
        "/api/v1/openapi.json": {"get": {"operationId": "getOpenApi", "summary": "This document", "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "volume-daemon read API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Read-only: no mutation ever happens over HTTP; mutations are commands (docs/wire.md).",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {"schemas": components},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `UPDATE_SCHEMAS=1 cargo test -p schema` rewrites the committed document.
    #[test]
    fn committed_openapi_matches_the_types() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi.json");
        let generated = format!(
            "{}\n",
            serde_json::to_string_pretty(&openapi()).expect("json")
        );
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &generated).expect("write openapi.json");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is out of date with the API types: run `UPDATE_SCHEMAS=1 cargo test -p schema` and commit the result",
            path.display()
        );
    }

    #[test]
    fn every_reference_of_the_document_resolves() {
        let doc = openapi();
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"").skip(1) {
            let target = piece.split('"').next().expect("ref");
            let pointer = target.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
        }
    }
}
