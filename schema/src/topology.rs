//! Broker names (CONTRACT §2). Only exchange and queue names carry the prefix; routing keys
//! never do.

use crate::command::OperationType;
use crate::event::OperationStatus;

/// The exchange and queue names for one `AMQP_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
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

    /// Routing key and CloudEvent type of an event: `volume.<type>.<completed|failed>`.
    pub fn event_type(op: OperationType, status: OperationStatus) -> String {
        format!("volume.{}.{}", op.as_str(), status.as_str())
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
    fn only_names_carry_the_prefix() {
        let t = Topology::new("acc7");
        assert_eq!(t.commands_exchange(), "acc7.commands");
        assert_eq!(t.dead_letter_queue(), "acc7.commands.dead");
        assert_eq!(t.events_exchange(), "acc7.events");
        assert_eq!(
            Topology::command_routing_key(OperationType::Create),
            "volume.create"
        );
        assert_eq!(
            Topology::event_type(OperationType::Create, OperationStatus::Completed),
            "volume.create.completed"
        );
    }
}
