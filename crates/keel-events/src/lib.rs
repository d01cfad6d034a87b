#![doc = include_str!("../README.md")]

mod envelope;
mod ids;
mod money;

pub mod notification;
pub mod order;
pub mod payment;

pub use envelope::{DecodeError, EXCHANGE, Envelope, JourneyEvent, SCHEMA_VERSION};
pub use ids::{CustomerId, OrderId, PaymentId};
pub use money::{Currency, CurrencyError, Money};
