//! `volumectl status`: one look at an appliance. Every instance's `/ready` (its role, every
//! component, its version and schema), the outbox, the operations pending and executing, the
//! dead-letter queue's depth (a passive declare) and the last failures, then the problems
//! found, each on a line of its own.

use std::process::ExitCode;

use publisher::VolumeClient;
use publisher::api::{ApiClient, OperationQuery};
use schema::OperationStatus;
use schema::api::OperationView;
use serde_json::{Value, json};

use crate::tables;

/// How many failed operations are shown.
const LAST_FAILURES: u32 = 5;
/// An outbox whose oldest event is older than this is a problem (the alert's threshold).
const OUTBOX_LAG_S: f64 = 60.0;

/// One instance's answer to `/ready`.
struct Instance {
    url: String,
    answer: Result<(u16, Value), String>,
}

impl Instance {
    fn body(&self) -> Option<&Value> {
        self.answer.as_ref().ok().map(|(_, b)| b)
    }

    fn role(&self) -> &str {
        self.body().and_then(|b| b["role"].as_str()).unwrap_or("-")
    }

    fn ready(&self) -> bool {
        matches!(self.answer, Ok((200, _)))
    }
}

/// What `status` found.
struct Report {
    instances: Vec<Instance>,
    dead_letters: Result<(String, u32), String>,
    failures: Result<Vec<OperationView>, String>,
}

/// Runs `volumectl status` against `api_urls` (every instance of the appliance) and the broker.
pub(crate) async fn run(api_urls: &[String], amqp_url: &str, prefix: &str, json: bool) -> ExitCode {
    let mut instances = Vec::new();
    for url in api_urls {
        let answer = match ApiClient::new(url) {
            Ok(api) => api.ready().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        instances.push(Instance {
            url: url.clone(),
            answer,
        });
    }
    let dead_letters = match VolumeClient::connect(amqp_url, prefix).await {
        Ok(client) => client
            .dead_letter_count()
            .await
            .map(|n| (client.topology().dead_letter_queue(), n))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    // The failures from an instance that answers (the active's database is everyone's).
    let failures = match main_instance(&instances) {
        Some(i) => failures_from(&i.url).await,
        None => Err("no instance answers".into()),
    };
    let report = Report {
        instances,
        dead_letters,
        failures,
    };
    let problems = report.problems();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(&problems)).unwrap_or_default()
        );
    } else {
        println!("{}", report.to_text(&problems));
    }
    report.exit_code()
}

/// The instance whose view of the database is shown: the active, else any that answers.
fn main_instance(instances: &[Instance]) -> Option<&Instance> {
    instances
        .iter()
        .find(|i| i.role() == "active")
        .or_else(|| instances.iter().find(|i| i.body().is_some()))
}

async fn failures_from(url: &str) -> Result<Vec<OperationView>, String> {
    let api = ApiClient::new(url).map_err(|e| e.to_string())?;
    let q = OperationQuery {
        status: Some(OperationStatus::Failed),
        ..OperationQuery::default()
    };
    api.operations(&q, LAST_FAILURES, None)
        .await
        .map(|page| page.items)
        .map_err(|e| e.to_string())
}

impl Report {
    /// The main instance's `/ready` body.
    fn main_view(&self) -> Option<&Value> {
        main_instance(&self.instances).and_then(Instance::body)
    }

    /// What an operator should look at, one line each.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let actives = self
            .instances
            .iter()
            .filter(|i| i.role() == "active")
            .count();
        if self.instances.iter().all(|i| i.body().is_none()) {
            out.push("no instance answers".to_owned());
        } else if actives == 0 {
            out.push("no instance is active: commands are not executed".to_owned());
        }
        for i in &self.instances {
            match &i.answer {
                Err(e) => out.push(format!("{}: {e}", i.url)),
                Ok((code, body)) => {
                    if *code != 200 {
                        out.push(format!("{}: not ready ({code})", i.url));
                    }
                    out.extend(component_problems(body).map(|p| format!("{}: {p}", i.url)));
                }
            }
        }
        if let Some(age) = self
            .main_view()
            .and_then(|v| v["outbox"]["oldest_unpublished_age_s"].as_f64())
            && age > OUTBOX_LAG_S
        {
            out.push(format!("the oldest unpublished event is {age:.0} s old"));
        }
        match &self.dead_letters {
            Ok((queue, n)) if *n > 0 => out.push(format!(
                "{n} message(s) in {queue}: volumectl dead-letters list"
            )),
            Ok(_) => {}
            Err(e) => out.push(format!("dead letters: {e}")),
        }
        out
    }

    fn to_text(&self, problems: &[String]) -> String {
        let mut out = Vec::new();
        let rows: Vec<Vec<String>> = self
            .instances
            .iter()
            .map(|i| match &i.answer {
                Ok((_, body)) => vec![
                    i.url.clone(),
                    i.role().to_owned(),
                    if i.ready() { "ready" } else { "NOT READY" }.to_owned(),
                    body["version"].as_str().unwrap_or("-").to_owned(),
                    schema_text(&body["schema"]),
                ],
                Err(_) => vec![
                    i.url.clone(),
                    "-".into(),
                    "UNREACHABLE".into(),
                    "-".into(),
                    "-".into(),
                ],
            })
            .collect();
        out.push(tables::table(
            &["INSTANCE", "ROLE", "READY", "VERSION", "SCHEMA"],
            &rows,
        ));
        for i in &self.instances {
            if let Some(body) = i.body() {
                out.push(format!(
                    "{} ({}): {}",
                    i.url,
                    i.role(),
                    components_text(body)
                ));
            }
        }
        if let Some(view) = self.main_view() {
            let outbox = &view["outbox"];
            let age = outbox["oldest_unpublished_age_s"]
                .as_f64()
                .map_or("none waiting".to_owned(), |a| format!("oldest {a:.1} s"));
            out.push(format!(
                "outbox: {} event(s) waiting ({age})",
                count(&outbox["backlog"])
            ));
            let ops = &view["operations"];
            out.push(format!(
                "operations: {} pending, {} executing",
                count(&ops["pending"]),
                count(&ops["executing"])
            ));
        }
        out.push(match &self.dead_letters {
            Ok((queue, n)) => format!("dead letters: {n} in {queue}"),
            Err(e) => format!("dead letters: unknown ({e})"),
        });
        out.push(match &self.failures {
            Ok(f) if f.is_empty() => "last failures: none".to_owned(),
            Ok(f) => format!("last failures:\n{}", tables::operations(f)),
            Err(e) => format!("last failures: unknown ({e})"),
        });
        if problems.is_empty() {
            out.push("no problem found".to_owned());
        } else {
            out.push(format!(
                "problems:\n{}",
                problems
                    .iter()
                    .map(|p| format!("  - {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        out.join("\n")
    }

    fn to_json(&self, problems: &[String]) -> Value {
        let instances: Vec<Value> = self
            .instances
            .iter()
            .map(|i| match &i.answer {
                Ok((code, body)) => json!({"url": i.url, "http_status": code, "ready": body}),
                Err(e) => json!({"url": i.url, "error": e}),
            })
            .collect();
        json!({
            "instances": instances,
            "dead_letters": match &self.dead_letters {
                Ok((queue, n)) => json!({"queue": queue, "messages": n}),
                Err(e) => json!({"error": e}),
            },
            "last_failures": match &self.failures {
                Ok(f) => serde_json::to_value(f).unwrap_or_default(),
                Err(e) => json!({"error": e}),
            },
            "problems": problems,
        })
    }

    /// 0: an instance is active and ready; 5: no instance answers; 1: anything else.
    fn exit_code(&self) -> ExitCode {
        if self.instances.iter().all(|i| i.body().is_none()) {
            return ExitCode::from(5);
        }
        if self
            .instances
            .iter()
            .any(|i| i.role() == "active" && i.ready())
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

/// The components in a state that needs a look (`nbd: down`, `host_vm: mismatch`, ...).
fn component_problems(body: &Value) -> impl Iterator<Item = String> + '_ {
    const BAD: [&str; 4] = ["down", "unreadable", "mismatch", "unauthorized"];
    body["components"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_str().is_some_and(|s| BAD.contains(&s)))
        .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default()))
}

fn components_text(body: &Value) -> String {
    body["components"]
        .as_object()
        .map(|c| {
            c.iter()
                .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn schema_text(schema: &Value) -> String {
    match (schema["database"].as_i64(), schema["binary"].as_i64()) {
        (Some(d), Some(b)) if d == b => d.to_string(),
        (d, Some(b)) => format!(
            "{} (this build: {b})",
            d.map_or("?".to_owned(), |d| d.to_string())
        ),
        _ => "-".to_owned(),
    }
}

fn count(v: &Value) -> String {
    v.as_u64().map_or("?".to_owned(), |n| n.to_string())
}
