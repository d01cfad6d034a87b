//! `checkout.order.*`: the events checkout publishes (through its outbox, P02) when an order
//! is placed and when it reaches a final state. notification turns the final ones into
//! customer notifications; the intermediate states (stock reserved, payment authorized) stay
//! inside checkout and are not published.
//!
//! Must not break: the routing keys and the `state` texts are the contract with every
//! consumer; the payload keeps the flat `total_minor` + `currency` form consumers already read.

use serde::{Deserialize, Serialize};

use crate::{Currency, CustomerId, Money, OrderId};

pub const PLACED: &str = "checkout.order.placed";
pub const CONFIRMED: &str = "checkout.order.confirmed";
pub const REJECTED: &str = "checkout.order.rejected";
pub const PAYMENT_DECLINED: &str = "checkout.order.payment_declined";
pub const PAYMENT_FAILED: &str = "checkout.order.payment_failed";

/// Every order event type that ends the journey.
pub const FINAL: [&str; 4] = [CONFIRMED, REJECTED, PAYMENT_DECLINED, PAYMENT_FAILED];

/// Which order event: one per routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Placed,
    Confirmed,
    Rejected,
    PaymentDeclined,
    PaymentFailed,
}

impl EventType {
    pub const ALL: [Self; 5] = [
        Self::Placed,
        Self::Confirmed,
        Self::Rejected,
        Self::PaymentDeclined,
        Self::PaymentFailed,
    ];

    /// The routing key and envelope `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => PLACED,
            Self::Confirmed => CONFIRMED,
            Self::Rejected => REJECTED,
            Self::PaymentDeclined => PAYMENT_DECLINED,
            Self::PaymentFailed => PAYMENT_FAILED,
        }
    }

    /// The event type for a routing key, `None` if it is not an order event.
    pub fn parse(event_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == event_type)
    }

    /// Whether the order has reached its final state.
    pub fn is_final(self) -> bool {
        self != Self::Placed
    }

    /// The state the order is in after this event (the payload's `state`).
    pub fn state(self) -> State {
        match self {
            Self::Placed => State::Pending,
            Self::Confirmed => State::Confirmed,
            Self::Rejected => State::Rejected,
            Self::PaymentDeclined => State::PaymentDeclined,
            Self::PaymentFailed => State::PaymentFailed,
        }
    }
}

/// An order's state as published: the first one and the final ones (checkout's own state
/// machine has more, which it does not publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Pending,
    Confirmed,
    Rejected,
    PaymentDeclined,
    PaymentFailed,
}

impl State {
    /// The wire text (`PAYMENT_DECLINED`), also what checkout stores and serves.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Rejected => "REJECTED",
            Self::PaymentDeclined => "PAYMENT_DECLINED",
            Self::PaymentFailed => "PAYMENT_FAILED",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` of every `checkout.order.*` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    /// The order's state after the change.
    pub state: State,
    pub total_minor: i64,
    pub currency: Currency,
    /// Why the order ended where it did (`out_of_stock`, `insufficient_funds`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl OrderEvent {
    /// The order's total.
    pub fn total(&self) -> Money {
        Money {
            minor: self.total_minor,
            currency: self.currency,
        }
    }
}
