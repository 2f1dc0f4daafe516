//! Logging: `RUST_LOG` filters (default `info`; the old daemon's `LOG_LEVEL` when `RUST_LOG`
//! is unset), `LOG_FORMAT` picks text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let legacy = std::env::var("LOG_LEVEL")
        .ok()
        .filter(|l| !l.trim().is_empty());
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    let filter = match (&legacy, rust_log) {
        (Some(level), false) => EnvFilter::try_new(level.trim().to_lowercase())
            .unwrap_or_else(|_| EnvFilter::new("info")),
        _ => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colours only for a person at a terminal: journald and files store the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    match (legacy, rust_log) {
        (Some(level), false) => tracing::warn!(
            level,
            "LOG_LEVEL is the old daemon's variable: honoured as the log filter; set RUST_LOG instead"
        ),
        (Some(_), true) => {
            tracing::warn!("LOG_LEVEL is the old daemon's variable: ignored, RUST_LOG is set")
        }
        (None, _) => {}
    }
}
