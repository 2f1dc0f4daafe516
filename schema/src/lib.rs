//! Wire and domain types shared by every volume-daemon crate.
//!
//! This crate is the **API boundary** of the project: it alone owns the JSON shapes of
//! commands (docs/wire.md) and events (docs/wire.md), the error codes, and the broker names
//! (docs/wire.md, with their declaration under the `amqp` feature). It knows nothing of databases
//! or CloudStack: the worker and the publisher convert at their edges.
//!
//! # Layout
//! - [`ids`]: validated identifiers (`CommandId`, `VolumeId`, `VmId`, ...).
//! - [`command`]: the four commands and [`command::Command::parse`], the one place where an
//!   incoming message is validated.
//! - [`event`]: CloudEvents 1.0 completion events.
//! - [`error`]: [`ErrorCode`] and the structured error carried by failed events.
//! - [`topology`]: exchange, queue and routing-key names for a given `AMQP_PREFIX`.
//! - [`topology::headers`]: header names the daemon sets on dead-lettered commands.
//! - `amqp` (feature `amqp`): declares that topology with lapin, for the daemon and the library.
//! - [`secret`]: [`SecretUrl`] and [`SecretString`], whose `Debug` cannot leak them.
//! - [`wire`]: command bodies as they travel, and the JSON Schemas of commands and events.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod api;
pub mod command;
pub mod error;
pub mod event;
pub mod ids;
pub mod secret;
pub mod size;
pub mod topology;
pub mod trace;
pub mod wire;

pub use command::{Action, Command, InvalidCommand, MessageProps, OperationType};
pub use error::{ErrorCode, EventError};
pub use event::{
    CloudEvent, EventData, EventOpType, OperationStatus, SnapshotInfo, VolumeInfo,
    correlation_or_command_id,
};
pub use ids::{CommandId, DiskOfferingId, EventId, SnapshotId, VmId, VolumeId, ZoneId};
pub use secret::{SecretString, SecretUrl};
pub use size::ByteSize;
pub use topology::Topology;
