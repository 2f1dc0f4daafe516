//! `volume-daemon import-legacy --from <URL> [--dry-run]`: an old Go daemon's installation
//! brought into this daemon's database (docs/configuration.md, "Taking over the old daemon's
//! installation"). The old database is only read. Refused while it has `pending` or
//! `executing` operations (they would be lost). Imported: the device mappings (`volume_uuid` →
//! `volume_id`; made-up `remote-vm-…` paths → none), their persistent names, the NBD exports of
//! host mappings (same export names), the active `ossea_configs` row (unless `OSSEA_CONFIGS_URL`
//! says the platform's database keeps it) and every operation, verbatim, as history in
//! `legacy_operations`. One report line per row it cannot map; a row already imported is left
//! as it is, so a second run writes nothing.

use std::collections::HashSet;

use chrono::Utc;
use schema::{
    CloudEvent, CommandId, ErrorCode, EventData, EventError, EventId, OperationStatus,
    OperationType, SecretUrl, VmId, VolumeId,
};

use crate::config::Settings;
use crate::db::legacy::{
    self, Form, ImportedOperation, NewExport, NewMapping, OldMapping, OldOperation, OldState, Plan,
    Written,
};
use crate::db::{self, DbError};

/// Why nothing was imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the old database {url}: {reason}")]
    Old { url: String, reason: String },
    #[error(
        "the old database has {} unfinished operation(s) ({}): they would be lost; let the old daemon finish them (or end them there), then import again",
        .0.len(),
        .0.join(", ")
    )]
    Unfinished(Vec<String>),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("writing the import: {0}")]
    Write(sqlx::Error),
}

/// What an import did (or, dry, would do).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub dry_run: bool,
    /// The old tables' form: `production` or `documented`.
    pub form: &'static str,
    pub mappings: usize,
    pub exports: usize,
    pub operations: usize,
    /// Of which ended create, attach, detach and delete operations, also this daemon's.
    pub imported: usize,
    pub config: bool,
    /// Rows written (`None` for a dry run): mappings, exports, history, credentials, imported
    /// operations.
    pub written: Option<[u64; 5]>,
    /// One line per row that was not imported, and why.
    pub skipped: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would import"
        } else {
            "imported"
        };
        writeln!(
            f,
            "old tables: {} form; {verb} {} mapping(s), {} export(s), {} operation(s) as history ({} of them as operations of this daemon), {} credentials row",
            self.form,
            self.mappings,
            self.exports,
            self.operations,
            self.imported,
            if self.config { "its" } else { "no" }
        )?;
        if let Some([m, e, o, c, i]) = self.written {
            writeln!(
                f,
                "rows written: {m} mapping(s), {e} export(s), {o} operation(s), {c} credentials, {i} imported operation(s) (rows already imported are left as they are)"
            )?;
        }
        for line in &self.skipped {
            writeln!(f, "not imported: {line}")?;
        }
        Ok(())
    }
}

/// Reads the old installation at `from` and, unless `dry_run`, writes it into the database of
/// `settings`.
pub async fn import_legacy(
    settings: &Settings,
    from: &SecretUrl,
    dry_run: bool,
) -> Result<Report, ImportError> {
    let old_error = |reason: String| ImportError::Old {
        url: from.redacted().to_owned(),
        reason,
    };
    let pool = legacy::connect(from)
        .await
        .map_err(|e| old_error(e.to_string()))?;
    let state = legacy::read(&pool).await;
    pool.close().await;
    let state = state.map_err(|e| old_error(e.to_string()))?;
    let unfinished: Vec<String> = (state.operations.iter())
        .filter(|o| matches!(o.status.as_str(), "pending" | "executing"))
        .map(|o| format!("{} ({} {})", o.id, o.kind, o.status))
        .collect();
    if !unfinished.is_empty() {
        return Err(ImportError::Unfinished(unfinished));
    }
    let (plan, skipped) = plan(&state, settings);
    let mut report = Report {
        dry_run,
        form: match state.form {
            Form::Production => "production",
            Form::Documented => "documented",
        },
        mappings: plan.mappings.len(),
        exports: plan.exports.len(),
        operations: plan.operations.len(),
        imported: plan.imported.len(),
        config: plan.config.is_some(),
        written: None,
        skipped,
    };
    if dry_run {
        return Ok(report);
    }
    let own = db::connect_and_migrate(&settings.database_url, 2).await?;
    let written = legacy::write(&own, &plan).await;
    own.close().await;
    let Written {
        mappings,
        exports,
        operations,
        imported,
        configs,
    } = written.map_err(ImportError::Write)?;
    report.written = Some([mappings, exports, operations, configs, imported]);
    Ok(report)
}

/// What the import writes, and a line for each row it cannot map.
fn plan(state: &OldState, settings: &Settings) -> (Plan, Vec<String>) {
    let mut skipped = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut mappings = Vec::new();
    for old in &state.mappings {
        match mapping(old, state.form, settings, &mut names) {
            Ok(m) => mappings.push(m),
            Err(why) => skipped.push(why),
        }
    }
    let host: HashSet<&str> = (mappings.iter())
        .filter(|m| m.mode == "oma")
        .map(|m| m.volume_id.as_str())
        .collect();
    let mut exports = Vec::new();
    for e in &state.exports {
        let target = (mappings.iter())
            .find(|m| m.volume_id == e.volume && host.contains(e.volume.as_str()))
            .and_then(|m| m.symlink_path.clone());
        match target {
            Some(target_path) if e.status != "removed" => exports.push(NewExport {
                volume_id: e.volume.clone(),
                export_name: e.export_name.clone(),
                target_path,
            }),
            Some(_) => skipped.push(format!("export {}: removed", e.export_name)),
            None => skipped.push(format!(
                "export {}: volume {} has no host mapping here",
                e.export_name, e.volume
            )),
        }
    }
    let keep_config = settings.ossea_configs_url.is_none();
    if state.config.is_some() && !keep_config {
        skipped.push(
            "ossea_configs: OSSEA_CONFIGS_URL is set, the platform's row stays where it is".into(),
        );
    }
    let imported = state.operations.iter().filter_map(imported).collect();
    let plan = Plan {
        mappings,
        exports,
        operations: state.operations.clone(),
        imported,
        config: state.config.clone().filter(|_| keep_config),
    };
    (plan, skipped)
}

/// One old mapping as this daemon records it, or why it cannot be.
fn mapping(
    old: &OldMapping,
    form: Form,
    settings: &Settings,
    names: &mut Vec<String>,
) -> Result<NewMapping, String> {
    let volume = VolumeId::parse(&old.volume)
        .map_err(|e| format!("mapping of {:?}: not a volume id ({e})", old.volume))?;
    VmId::parse(&old.vm_id).map_err(|e| {
        format!(
            "mapping of volume {volume}: VM {:?} is not a VM id ({e})",
            old.vm_id
        )
    })?;
    let made_up = old.device_path.starts_with("remote-vm-");
    let host = match (form, old.mode.as_deref()) {
        (Form::Production, Some(mode)) => mode == "oma",
        _ => !made_up,
    };
    let device_path =
        (host && old.device_path.starts_with("/dev/")).then(|| old.device_path.clone());
    let (persistent_name, symlink_path) = if host {
        let name = match &old.persistent_name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => crate::host::persistent_name(volume, names),
        };
        names.push(name.clone());
        let path = settings.persistent_device_dir.join(&name);
        (Some(name), Some(path.display().to_string()))
    } else {
        (None, None)
    };
    Ok(NewMapping {
        volume_id: volume.to_string(),
        vm_id: old.vm_id.clone(),
        mode: if host { "oma" } else { "failover" },
        linux_state: match (host, &device_path) {
            (true, Some(_)) => "present",
            (true, None) => "missing",
            (false, _) => "remote",
        },
        device_path,
        serial: volume.disk_serial(),
        device_id: old.device_id,
        size: old.size,
        persistent_name,
        symlink_path,
    })
}

/// Namespace of the imported operations' event ids: the same old operation always gets the
/// same event id, so a second import and a duplicate command agree.
const IMPORTED_EVENTS: uuid::Uuid =
    uuid::Uuid::from_u128(0x6d1f_2c3a_9b7e_4e0f_8a5d_1c2b_3e4f_5a6b);

/// An old ended operation of a command type this daemon has, as one of its own with a terminal
/// event; `None` for the others (kept as history only).
fn imported(o: &OldOperation) -> Option<ImportedOperation> {
    let kind = OperationType::parse(&o.kind).filter(|t| {
        matches!(
            t,
            OperationType::Create
                | OperationType::Attach
                | OperationType::Detach
                | OperationType::Delete
        )
    })?;
    let status = OperationStatus::parse(&o.status).filter(|s| s.is_terminal())?;
    let id = CommandId::parse(&o.id).ok()?;
    let created_at = o.created_at.unwrap_or_else(Utc::now);
    let completed_at = o.completed_at.unwrap_or(created_at);
    let error = (status == OperationStatus::Failed).then(|| old_error(o));
    let event = event_of(
        o,
        &id,
        kind,
        status,
        error.clone(),
        (created_at, completed_at),
    );
    let event_id = event.id;
    Some(ImportedOperation {
        id: id.as_str().to_owned(),
        kind: kind.as_str(),
        status: status.as_str(),
        volume_id: o.volume_id.clone(),
        vm_id: o.vm_id.clone(),
        request: o.request.clone().unwrap_or_else(|| "{}".into()),
        response: o.response.clone(),
        error: error.as_ref().map(|e| e.message.clone()),
        error_code: error.as_ref().map(|e| e.code.as_str()),
        error_detail: error.as_ref().and_then(|e| serde_json::to_string(e).ok()),
        event_id: event_id.to_string(),
        event_payload: serde_json::to_string(&event).unwrap_or_default(),
        created_at,
        completed_at: Some(completed_at),
    })
}

/// An old failure as an error object: the old daemon kept only its text.
fn old_error(o: &OldOperation) -> EventError {
    let text = o
        .error
        .clone()
        .unwrap_or_else(|| "failed in the old daemon".into());
    EventError::new(ErrorCode::Internal, text)
        .with_hint("imported from the old volume daemon, whose errors were plain text")
}

/// The terminal event of an imported operation; its id derives from the operation's.
fn event_of(
    o: &OldOperation,
    id: &CommandId,
    kind: OperationType,
    status: OperationStatus,
    error: Option<EventError>,
    (created_at, completed_at): (chrono::DateTime<Utc>, chrono::DateTime<Utc>),
) -> CloudEvent {
    let data = EventData {
        operation_id: id.clone(),
        command_id: id.clone(),
        correlation_id: id.as_str().to_owned(),
        op_type: kind.into(),
        status,
        volume_id: o.volume_id.as_deref().and_then(|v| VolumeId::parse(v).ok()),
        vm_id: o.vm_id.as_deref().and_then(|v| VmId::parse(v).ok()),
        device_path: None,
        by_id_path: None,
        mode: None,
        persistent_path: None,
        nbd_export: None,
        metadata: Default::default(),
        error,
        created_at,
        completed_at,
        duration_ms: (completed_at - created_at).num_milliseconds().max(0) as u64,
        volume: None,
        already_detached: None,
        already_absent: None,
        target: None,
        changes: None,
        snapshot: None,
        snapshot_id: None,
        previous_size: None,
    };
    let event_id = EventId::from_uuid(uuid::Uuid::new_v5(&IMPORTED_EVENTS, id.as_str().as_bytes()));
    CloudEvent::new(event_id, completed_at, data)
}
