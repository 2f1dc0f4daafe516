//! End-to-end tests: the real `volume-daemon` binary against the real RabbitMQ and MariaDB of
//! this machine, with the CloudStack simulator on a real port.
//!
//! Every test builds its own [`helpers::TestEnv`]: its own `AMQP_PREFIX`, its own database and
//! its own simulator, so tests run in parallel and leave nothing behind. A missing broker or
//! database fails the test loudly; nothing is skipped.

mod helpers;

mod cluster;
mod commands;
mod create;
mod cutover;
mod deploy;
mod devices;
mod docs;
mod exports;
mod fencing;
mod go_client;
mod http_flood;
mod image;
mod lifecycle;
mod migrating;
mod names;
mod operator;
mod outages;
mod package;
mod producers;
mod python_client;
mod read_ahead;
mod reconcile_races;
mod refusals;
mod rejections;
mod resilience;
mod runbook;
mod scale_out;
mod status;
mod tls;
mod trace_context;
mod upgrade;
mod volume_api;
