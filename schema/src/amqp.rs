//! Declares the broker topology of docs/wire.md with lapin (feature `amqp`). Every declaration
//! is idempotent, so the daemon, `volumectl` and tests all call the same [`declare`]; the names
//! come from [`Topology`], the arguments from here, and nowhere else.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::topology::{DELIVERY_LIMIT, Topology};

/// The commands queue's arguments: quorum, single active consumer, dead-lettering.
pub fn commands_queue_arguments(topology: &Topology) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(topology.dead_letter_exchange())),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(DELIVERY_LIMIT),
    );
    args
}

/// Declares both exchanges, the commands queue and the dead-letter pair.
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for (name, kind) in [
        (topology.commands_exchange(), ExchangeKind::Topic),
        (topology.events_exchange(), ExchangeKind::Topic),
        (topology.dead_letter_exchange(), ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await?;
    }

    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(topology.dead_letter_queue().into(), durable_queue, quorum)
        .await?;
    channel
        .queue_bind(
            topology.dead_letter_queue().into(),
            topology.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .queue_declare(
            topology.commands_queue().into(),
            durable_queue,
            commands_queue_arguments(topology),
        )
        .await?;
    channel
        .queue_bind(
            topology.commands_queue().into(),
            topology.commands_exchange().into(),
            Topology::COMMANDS_BINDING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
