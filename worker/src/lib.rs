//! volume-daemon: the single place where volume operations happen.
//!
//! Commands arrive from RabbitMQ (`intake`), are committed as operations (`db`),
//! executed against CloudStack with bounded concurrency (`executor`, `operation`,
//! `cloud`), and end with their result and an outbox row in one transaction; the
//! `relay` publishes the outbox as CloudEvents with publisher confirms. `http` serves
//! health, readiness and metrics. `app` wires it all; `main` only parses settings.
//! See ARCHITECTURE.md for the path of one command and the invariants.

// Modules are crate-private unless the binary, the benchmarks or the tests need them, so
// rustc reports dead code; `unreachable_pub` keeps `pub` for what other crates can reach.
#![warn(unreachable_pub)]

pub(crate) mod api;
pub mod app;
pub(crate) mod broker;
pub(crate) mod cloud;
pub mod config;
pub(crate) mod context;
pub(crate) mod db;
pub mod devices;
pub(crate) mod executor;
pub(crate) mod host;
pub(crate) mod housekeeping;
pub(crate) mod http;
pub mod import;
pub(crate) mod intake;
pub(crate) mod lease;
pub(crate) mod mappings;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod operation;
pub(crate) mod relay;
pub(crate) mod retry;
pub(crate) mod selfcheck;
pub(crate) mod status;
pub(crate) mod stop;
pub(crate) mod supervise;
pub mod telemetry;

pub use app::Application;
pub use config::Settings;
