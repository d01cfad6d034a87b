//! Exchanges, queues and bindings (P02/P03 plumbing).
//!
//! One durable topic exchange, [`EXCHANGE`] (`keel.events`), carries every domain event; the
//! routing key is the event type (`checkout.order.confirmed`). Each consumer owns one durable
//! **quorum** queue bound to the patterns it wants (`checkout.order.*`). Declarations are
//! idempotent, so publishers and consumers declare what they use every time they (re)connect
//! and never depend on start-up order.
//!
//! The delivery limit: RabbitMQ 3.10 quorum queues have none by default, so a message that
//! always fails would be redelivered forever. [`QueueSpec::delivery_limit`] bounds that; today
//! a message over the limit is dropped by the broker. The dead-letter queue (P01) adds the
//! dead-letter exchange (`x-dead-letter-exchange`, `x-dead-letter-strategy: at-least-once`,
//! `x-overflow: reject-publish`) and the retry tiers, so it is kept instead.
//!
//! Must not break: queue arguments are fixed when a queue is first declared; declaring it
//! again with different ones fails with `PRECONDITION_FAILED` (406). Changing
//! `delivery_limit` for an existing queue is an operation (a policy, or a new queue), not a
//! config edit — the error names the queue so the operator sees which.

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::AmqpError;

pub use keel_events::EXCHANGE;

pub(crate) fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|_| AmqpError::InvalidName(s.chars().take(64).collect()))
}

/// Declares the durable topic exchange [`EXCHANGE`] (idempotent).
pub async fn declare_exchange(channel: &Channel) -> Result<(), AmqpError> {
    channel
        .exchange_declare(
            short(EXCHANGE)?,
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A consumer's queue: its name, what it is bound to, and its poison-message bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// `<service>.<purpose>`, e.g. `notification.events`.
    pub name: String,
    /// Routing-key patterns on [`EXCHANGE`] (`checkout.order.*`, `billing.payment.*`).
    pub bindings: Vec<String>,
    /// `x-delivery-limit`: after this many returns to the queue the broker drops the message
    /// (until P01's dead-letter exchange exists, which keeps it instead).
    pub delivery_limit: u32,
}

impl QueueSpec {
    /// The queue's declaration arguments: quorum type and the delivery limit.
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args
    }
}

/// Declares [`EXCHANGE`], the durable quorum queue `spec` and its bindings (idempotent).
pub async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    declare_exchange(channel).await?;
    let queue = short(&spec.name)?;
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            spec.arguments(),
        )
        .await
        .inspect_err(|e| {
            tracing::error!(queue = %spec.name, error = %e,
                "declaring the queue failed (arguments differ from the existing queue's?)");
        })?;
    for pattern in &spec.bindings {
        channel
            .queue_bind(
                queue.clone(),
                short(EXCHANGE)?,
                short(pattern)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
