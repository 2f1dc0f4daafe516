//! Broker names (docs/wire.md). Only exchange and queue names carry the prefix; routing keys
//! never do.

use crate::command::OperationType;

/// Poison messages go to the dead-letter queue after this many deliveries (`x-delivery-limit`).
pub const DELIVERY_LIMIT: i32 = 5;

/// Header names the daemon sets on messages it dead-letters (docs/wire.md), read back by
/// `volumectl dead-letters`.
pub mod headers {
    /// Why the daemon rejected the command (at most 1 KiB of text).
    pub const REJECTION_REASON: &str = "x-rejection-reason";
    /// The routing key the command was published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
}

/// The exchange and queue names for one `AMQP_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

/// The longest `AMQP_PREFIX`: AMQP names are at most 255 bytes, and the longest name derived
/// from the prefix is `<prefix>.commands.dead`.
pub const MAX_PREFIX_BYTES: usize = 255 - ".commands.dead".len();

/// An `AMQP_PREFIX` that cannot name exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("the AMQP prefix is empty")]
    Empty,
    #[error(
        "the AMQP prefix is {0} bytes; at most {MAX_PREFIX_BYTES} (names derived from it must fit AMQP's 255)"
    )]
    TooLong(usize),
}

impl Topology {
    /// The names for `prefix`, checked: every derived name fits AMQP's 255 bytes.
    pub fn parse(prefix: &str) -> Result<Self, PrefixError> {
        if prefix.is_empty() {
            return Err(PrefixError::Empty);
        }
        if prefix.len() > MAX_PREFIX_BYTES {
            return Err(PrefixError::TooLong(prefix.len()));
        }
        Ok(Self::new(prefix))
    }

    /// The names for `prefix`, unchecked (see [`Topology::parse`]).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic exchange producers publish commands to; also the name of the commands queue.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.prefix)
    }

    /// Quorum queue (single active consumer) the daemon consumes.
    pub fn commands_queue(&self) -> String {
        format!("{}.commands", self.prefix)
    }

    /// Fanout exchange that receives rejected commands.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.commands.dlx", self.prefix)
    }

    /// Queue where rejected and poison commands wait for inspection or replay.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.commands.dead", self.prefix)
    }

    /// Topic exchange completion events leave through.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Binding key of the commands queue.
    pub const COMMANDS_BINDING: &'static str = "volume.#";

    /// Routing key of a command: `volume.<type>`.
    pub fn command_routing_key(op: OperationType) -> String {
        format!("volume.{}", op.as_str())
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new("volume")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_whose_names_do_not_fit_amqp_is_refused() {
        let longest = "p".repeat(MAX_PREFIX_BYTES);
        let t = Topology::parse(&longest).expect("the longest prefix");
        assert_eq!(t.dead_letter_queue().len(), 255);
        assert_eq!(
            Topology::parse(&format!("{longest}x")),
            Err(PrefixError::TooLong(MAX_PREFIX_BYTES + 1))
        );
        assert_eq!(Topology::parse(""), Err(PrefixError::Empty));
    }

    #[test]
    fn only_names_carry_the_prefix() {
        let t = Topology::new("acc7");
        assert_eq!(t.commands_exchange(), "acc7.commands");
        assert_eq!(t.dead_letter_queue(), "acc7.commands.dead");
        assert_eq!(t.events_exchange(), "acc7.events");
        assert_eq!(
            Topology::command_routing_key(OperationType::Create),
            "volume.create"
        );
        use crate::event::{EventOpType, OperationStatus, event_type};
        assert_eq!(
            event_type(OperationType::Create, OperationStatus::Completed),
            "volume.create.completed"
        );
        assert_eq!(
            event_type(EventOpType::Unknown, OperationStatus::Failed),
            "volume.unknown.failed"
        );
    }
}
