//! The AMQP side of volume-daemon's contract, for producers and subscribers written in Rust.
//!
//! - [`topology`]: declares the exchanges and queues of docs/wire.md (idempotent); it is
//!   `schema::amqp`, the one declaration the daemon uses too.
//! - [`client`]: [`VolumeClient`] publishes commands with publisher confirms and the mandatory
//!   flag, and returns a [`PendingCommand`] whose [`wait`](PendingCommand::wait) resolves to the
//!   terminal event. The listener is bound before the command leaves, so no event is missed.
//! - [`events`]: [`EventStream`], completion events for subscribers, acknowledged explicitly.
//! - [`dead_letters`]: list and replay dead-lettered commands.
//! - [`api`]: [`ApiClient`](api::ApiClient), the daemon's read-only JSON API (operations,
//!   volumes, VMs, devices).
//!
//! Commands are built with the constructors of [`schema::Command`] (`create`, `attach`,
//! `detach`, `delete`) and [`schema::command::AttachVolume`] / [`schema::command::CreateVolume`]
//! for their options.
//!
//! ```no_run
//! # async fn demo() -> Result<(), publisher::Error> {
//! use publisher::VolumeClient;
//! use schema::Command;
//!
//! let client = VolumeClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "volume").await?;
//! let cmd = Command::create("migration-vm1-disk0", "10GiB".parse().expect("size"))
//!     .with_correlation_id("migration-42");
//! let event = client.publish(&cmd).await?.wait(std::time::Duration::from_secs(60)).await?;
//! println!("{} {}", event.event_type, event.data.volume_id.map(|v| v.to_string()).unwrap_or_default());
//! # Ok(()) }
//! ```

pub mod api;
pub mod client;
pub mod dead_letters;
pub mod events;

/// The contract's topology declaration, shared with the daemon (`schema::amqp`).
pub use schema::amqp as topology;

pub use client::{Error, PendingCommand, VolumeClient};
pub use dead_letters::{DeadLetter, Replayed};
pub use events::{EventStream, ReceivedEvent, Subscription};
