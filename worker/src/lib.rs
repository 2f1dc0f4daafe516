//! volume-daemon: the single place where volume operations happen.
//!
//! Commands arrive from RabbitMQ ([`intake`]), are committed as operations ([`db`]),
//! executed against CloudStack with bounded concurrency ([`executor`], [`operation`],
//! [`cloud`]), and end with their result and an outbox row in one transaction; the
//! [`relay`] publishes the outbox as CloudEvents with publisher confirms. [`http`] serves
//! health, readiness and metrics. [`app`] wires it all; `main` only parses settings.
//! See ARCHITECTURE.md for the path of one command and the invariants.

pub mod api;
pub mod app;
pub mod broker;
pub mod cloud;
pub mod config;
pub mod context;
pub mod db;
pub mod devices;
pub mod executor;
pub mod host;
pub mod housekeeping;
pub mod http;
pub mod intake;
pub mod lease;
pub mod mappings;
pub mod metrics;
pub mod model;
pub mod operation;
pub mod relay;
pub mod retry;
pub mod selfcheck;
pub mod status;
pub mod stop;
pub mod telemetry;

pub use app::Application;
pub use config::Settings;
