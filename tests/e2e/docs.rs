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
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        assert!(
            !text.contains("../shared"),
            "{} points outside the repository (../shared)",
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
    let text = "see [a](docs/wire.md#x), [b](https://example.org) and [c](../shared/X.md)";
    assert_eq!(local_links(text), ["docs/wire.md", "../shared/X.md"]);
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
    assert_eq!(types, ["create", "attach", "cancel", "reconcile"]);
}
