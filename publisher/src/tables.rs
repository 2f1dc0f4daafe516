//! `volumectl`'s read-API output: aligned tables for people, the API's JSON for scripts.

use chrono::{DateTime, Utc};
use schema::api::{DeviceView, MappingView, OperationView, SnapshotView, VolumeView};

/// Columns padded to the widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    (*c).to_owned()
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

pub fn operations(ops: &[OperationView]) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            vec![
                o.id.to_string(),
                o.op_type.as_str().into(),
                o.status.as_str().into(),
                or_dash(o.volume_id),
                or_dash(o.vm_id),
                time(o.created_at),
                or_dash(o.error.as_ref().map(|e| e.code.as_str())),
            ]
        })
        .collect();
    table(
        &["ID", "TYPE", "STATUS", "VOLUME", "VM", "CREATED", "ERROR"],
        &rows,
    )
}

/// One operation, as `key  value` lines.
pub fn operation(o: &OperationView) -> String {
    let mut rows = vec![
        vec!["id".into(), o.id.to_string()],
        vec!["type".into(), o.op_type.as_str().into()],
        vec!["status".into(), o.status.as_str().into()],
        vec!["volume".into(), or_dash(o.volume_id)],
        vec!["vm".into(), or_dash(o.vm_id)],
        vec!["correlation id".into(), or_dash(o.correlation_id.as_ref())],
        vec![
            "cloudstack job".into(),
            or_dash(o.cloudstack_job_id.as_ref()),
        ],
        vec!["attempts".into(), o.attempts.to_string()],
        vec!["created".into(), time(o.created_at)],
        vec!["updated".into(), time(o.updated_at)],
        vec!["completed".into(), or_dash(o.completed_at.map(time))],
    ];
    if let Some(e) = &o.error {
        rows.push(vec!["error".into(), format!("{}: {}", e.code, e.message)]);
        rows.push(vec!["hint".into(), e.hint.clone()]);
    }
    table(&["FIELD", "VALUE"], &rows)
}

pub fn mappings(items: &[MappingView]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|m| {
            vec![
                m.volume_id.to_string(),
                m.vm_id.to_string(),
                serde_json::to_value(m.mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                or_dash(m.device_path.as_ref()),
                or_dash(m.persistent_path.as_ref()),
                m.linux_state.clone(),
                or_dash(m.size),
            ]
        })
        .collect();
    table(
        &[
            "VOLUME",
            "VM",
            "MODE",
            "DEVICE",
            "PERSISTENT",
            "LINUX",
            "SIZE",
        ],
        &rows,
    )
}

pub fn volume(v: &VolumeView) -> String {
    let mut out = format!("volume {}\n", v.volume_id);
    match &v.mapping {
        Some(m) => out.push_str(&format!("\n{}\n", mappings(std::slice::from_ref(m)))),
        None => out.push_str("\nnot attached (no mapping)\n"),
    }
    if let Some(e) = &v.nbd_export {
        out.push_str(&format!(
            "\nexport {}  {}  -> {}\n",
            e.name, e.url, e.target_path
        ));
    }
    if !v.snapshots.is_empty() {
        out.push_str(&format!("\nsnapshots\n{}\n", snapshots(&v.snapshots)));
    }
    if let Some(o) = &v.last_operation {
        out.push_str(&format!(
            "\nlast operation\n{}\n",
            operations(std::slice::from_ref(o))
        ));
    }
    out.trim_end().to_owned()
}

pub fn snapshots(items: &[SnapshotView]) -> String {
    if items.is_empty() {
        return "no snapshots".to_owned();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.name.clone(),
                s.state.clone(),
                s.created.format("%Y-%m-%d %H:%M:%S").to_string(),
                or_dash(s.operation_id.as_ref()),
            ]
        })
        .collect();
    table(
        &["SNAPSHOT", "NAME", "STATE", "CREATED", "OPERATION"],
        &rows,
    )
}

pub fn devices(items: &[DeviceView]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                or_dash(d.size),
                or_dash(d.serial.as_ref()),
                or_dash(d.controller.as_ref()),
                or_dash(d.volume_id),
            ]
        })
        .collect();
    table(&["NAME", "SIZE", "SERIAL", "CONTROLLER", "VOLUME"], &rows)
}

pub fn exports(items: &[schema::api::ExportView]) -> String {
    if items.is_empty() {
        return "no active NBD export".into();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                e.volume_id.to_string(),
                e.name.clone(),
                e.url.clone(),
                e.target_path.clone(),
                time(e.created_at),
            ]
        })
        .collect();
    table(&["VOLUME", "EXPORT", "URL", "TARGET", "CREATED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_whatever_the_widths() {
        let t = table(
            &["A", "LONGER", "Z"],
            &[
                vec!["wide-cell".into(), "x".into(), "end".into()],
                vec!["y".into(), "-".into(), "".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A          LONGER  Z");
        assert_eq!(lines[1], "wide-cell  x       end");
        assert_eq!(lines[2], "y          -", "no trailing spaces");
    }
}
