#![doc = include_str!("../README.md")]

mod broker;
pub mod consumer;
pub mod definitions;
pub mod publisher;
pub mod relay;
pub mod topology;

pub use broker::{AmqpConfig, Broker};
pub use consumer::{ConsumerConfig, Incoming, Outcome};
pub use relay::RelayConfig;

/// Errors of this crate's broker operations.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// No open connection right now; the supervisor is reconnecting. Back off and retry.
    #[error("not connected to RabbitMQ")]
    NotConnected,
    /// A broker operation did not finish within its bound.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The broker refused a message (`basic.nack`): it was not stored (a full queue with
    /// `reject-publish`, or broker trouble).
    #[error("broker nacked the message")]
    Nacked,
    /// A `mandatory` message no queue was bound to: returned by the broker, not stored.
    #[error("unroutable: no queue bound to {routing_key:?} on {exchange:?}")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// A name the AMQP protocol cannot carry (longer than 255 bytes).
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("AMQP: {0}")]
    Lapin(#[from] lapin::Error),
}
