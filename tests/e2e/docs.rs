//! The project documents itself: the README, ARCHITECTURE.md and `docs/` link only to files
//! inside the repository, and never to the developers' reference outside it.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every Markdown document a user reads.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md"), repo().join("ARCHITECTURE.md")];
    let dir = std::fs::read_dir(repo().join("docs")).expect("docs/ exists");
    docs.extend(
        dir.filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    docs
}

/// The targets of inline links `[text](target)` that are not URLs or anchors.
fn local_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|t| t.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|t| !t.is_empty() && !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

#[test]
fn documentation_links_resolve_inside_the_repository() {
    let mut broken = Vec::new();
    let mut links = 0;
    let outside = format!("../{}", "shared");
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        assert!(
            !text.contains(&outside),
            "{} points outside the repository ({outside})",
            doc.display()
        );
        for link in local_links(&text) {
            links += 1;
            let target = doc.parent().expect("dir").join(&link);
            let inside = target
                .canonicalize()
                .is_ok_and(|t| t.starts_with(repo().canonicalize().expect("repo")));
            if !inside {
                broken.push(format!("{}: {link}", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links that do not resolve: {broken:?}");
    assert!(
        links >= 10,
        "only {links} local links found: is the parser right?"
    );
}

#[test]
fn the_link_parser_sees_links_and_skips_urls() {
    let text = "see [a](docs/wire.md#x), [b](https://example.org) and [c](../other/X.md)";
    assert_eq!(local_links(text), ["docs/wire.md", "../other/X.md"]);
}

/// Every command example of the AsyncAPI document is a valid command: by the committed JSON
/// Schema and by the daemon's own parser (cancel and reconcile included).
#[test]
fn the_asyncapi_command_examples_are_valid_commands() {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             doc = yaml.safe_load(open(sys.argv[1]))\n\
             for e in doc['components']['messages']['command']['examples']:\n\
             \x20   print(json.dumps(e['payload']))",
        ])
        .arg(repo().join("asyncapi.yaml"))
        .output()
        .expect("python3 runs (scripts/test installs PyYAML)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("schemas/command.schema.json")).expect("schema"),
    )
    .expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema");
    let mut types = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let example: serde_json::Value = serde_json::from_str(line).expect("JSON example");
        assert!(validator.is_valid(&example), "the schema refuses {example}");
        let command = schema::Command::parse(line.as_bytes(), &Default::default())
            .unwrap_or_else(|e| panic!("the daemon refuses {example}: {e}"));
        types.push(command.operation_type().as_str());
    }
    assert_eq!(
        types,
        [
            "create",
            "attach",
            "cancel",
            "reconcile",
            "snapshot",
            "revert_snapshot",
            "delete_snapshot",
            "resize"
        ]
    );
}

/// The `.rs` files ARCHITECTURE.md's code map of the daemon names: in its table, a row whose
/// first cell names a folder (`db/`) names that folder's files by their bare names; a name with
/// a `/` is a path under `worker/src`.
fn code_map_files(architecture: &str) -> std::collections::BTreeSet<String> {
    let section = architecture
        .split("### `worker`")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("ARCHITECTURE.md has a `worker` code map");
    let mut named = std::collections::BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or_default();
        let folder = first
            .split('`')
            .skip(1)
            .step_by(2)
            .find(|t| t.ends_with('/'))
            .unwrap_or_default();
        for token in row.split('`').skip(1).step_by(2) {
            if !token.ends_with(".rs") || token.contains(' ') {
                continue;
            }
            named.insert(if token.contains('/') {
                token.to_owned()
            } else {
                format!("{folder}{token}")
            });
        }
    }
    named
}

/// Every `.rs` file under `worker/src`, as a path relative to it.
fn worker_files(dir: &Path, base: &Path, out: &mut std::collections::BTreeSet<String>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable")
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            worker_files(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(base).expect("under worker/src");
            out.insert(rel.display().to_string());
        }
    }
}

/// ARCHITECTURE.md's code map matches the daemon's files: every module it names exists, and
/// every module that exists is named (a moved or added file fails this until the map says so).
#[test]
fn the_code_map_names_every_module_of_the_daemon_and_no_other() {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("readable");
    let named = code_map_files(&text);
    let src = repo().join("worker/src");
    let mut existing = std::collections::BTreeSet::new();
    worker_files(&src, &src, &mut existing);
    let missing: Vec<_> = named.difference(&existing).collect();
    let unnamed: Vec<_> = existing.difference(&named).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names modules that do not exist: {missing:?}"
    );
    assert!(
        unnamed.is_empty(),
        "modules ARCHITECTURE.md's code map does not name: {unnamed:?}"
    );
    assert!(
        named.len() > 40,
        "only {} found: is the parser right?",
        named.len()
    );
}

/// Every setting `volume-daemon --help` lists (its environment variable) is documented in
/// docs/configuration.md.
#[test]
fn every_setting_of_the_daemon_is_documented() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .arg("--help")
        .output()
        .expect("volume-daemon --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).expect("readable");
    let names: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect();
    assert!(
        names.len() > 30,
        "only {} settings found: {help}",
        names.len()
    );
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from docs/configuration.md: {missing:?}"
    );
}

/// The code, the generated documents and the Go client cite the project's own `docs/`, never
/// the developers' reference a clone does not have.
#[test]
fn sources_cite_the_projects_own_docs() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir)
            .expect("readable")
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !matches!(name, "target" | "vendor" | ".git") {
                    walk(&path, out);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("rs" | "go" | "json" | "yaml")
            ) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in [
        "schema",
        "cloudstack",
        "simulator",
        "worker",
        "publisher",
        "clients",
        "tests",
        "schemas",
    ] {
        walk(&repo().join(dir), &mut files);
    }
    files.push(repo().join("openapi.json"));
    files.push(repo().join("asyncapi.yaml"));
    // The needles are built, so that this file does not cite what it looks for.
    let section = format!("{} §", "CONTRACT");
    let shared = format!("{}/", "shared");
    let cloudstack_notes = format!("{}.md", "CLOUDSTACK");
    let citing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.contains(&section) || text.contains(&shared) || text.contains(&cloudstack_notes)
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(files.len() > 100, "only {} files scanned", files.len());
    assert!(
        citing.is_empty(),
        "files citing the developers' reference: {citing:?}"
    );
}

/// The AsyncAPI document names the draft the JSON Schemas it references are written in.
#[test]
fn the_asyncapi_schema_format_is_the_schemas_draft() {
    let asyncapi = std::fs::read_to_string(repo().join("asyncapi.yaml")).expect("asyncapi");
    let formats: Vec<&str> = asyncapi
        .lines()
        .filter_map(|l| l.trim().strip_prefix("schemaFormat: "))
        .collect();
    assert_eq!(
        formats.len(),
        2,
        "the command and the event payloads: {formats:?}"
    );
    for file in ["schemas/command.schema.json", "schemas/event.schema.json"] {
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(repo().join(file)).expect("schema"))
                .expect("JSON");
        let draft = schema["$schema"]
            .as_str()
            .and_then(|s| s.strip_prefix("https://json-schema.org/draft/"))
            .and_then(|s| s.strip_suffix("/schema"))
            .expect("a $schema of json-schema.org");
        for format in &formats {
            assert_eq!(
                *format,
                format!("application/schema+json;version={draft}"),
                "{file} is draft {draft}"
            );
        }
    }
}
