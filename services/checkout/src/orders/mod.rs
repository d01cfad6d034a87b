//! Orders: `POST /v1/orders` and `GET /v1/orders/{id}` (P13 idempotency keys), and the
//! order aggregate's state changes that the saga makes.
//!
//! Placing an order is one transaction: the idempotency key, the order and its lines, its
//! first history row, the saga instance, the saga's job, the `checkout.order.placed` outbox
//! event and the stored answer commit together or not at all. The API answers 202: the
//! order is accepted, and the saga (`crate::saga`) takes it to a final state in the
//! background.
//!
//! - [`request`]: parsing and validation of the body, with per-field errors.
//! - [`store`]: the SQL of the order aggregate (insert, load, state changes with history and
//!   outbox event).
//! - [`api`]: the handlers.
//!
//! Must not break: an order's state changes only through [`store::change_state`], which
//! locks the order row, appends its history and writes its event in the caller's transaction.

pub mod api;
pub mod request;
pub mod store;

use serde::Serialize;

pub use api::{OrdersState, Placed, place_order, routes};
/// An order's id: the shared wire type, since billing and notification see it too.
pub use keel_events::OrderId;

/// The routes this module serves (method, path), as documented in `openapi.yaml`.
pub const ROUTES: &[(&str, &str)] = &[("POST", "/v1/orders"), ("GET", "/v1/orders/{id}")];

/// The states an order goes through, as customers see them (the saga has one more of its
/// own, COMPENSATING, during which the order keeps its last state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderState {
    /// Accepted; nothing reserved yet.
    Pending,
    /// Stock reserved; payment not yet authorized.
    Reserved,
    /// Payment authorized; not yet captured.
    Authorized,
    /// Final: paid, stock sold.
    Confirmed,
    /// Final: refused before payment (out of stock).
    Rejected,
    /// Final: the card was declined; stock released.
    PaymentDeclined,
    /// Final: payment could not be completed (billing unavailable past the deadline, or a
    /// non-retryable error); stock released and any authorization voided.
    PaymentFailed,
}

impl OrderState {
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Reserved,
        Self::Authorized,
        Self::Confirmed,
        Self::Rejected,
        Self::PaymentDeclined,
        Self::PaymentFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Reserved => "RESERVED",
            Self::Authorized => "AUTHORIZED",
            Self::Confirmed => "CONFIRMED",
            Self::Rejected => "REJECTED",
            Self::PaymentDeclined => "PAYMENT_DECLINED",
            Self::PaymentFailed => "PAYMENT_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        self.event_type().is_some() && self != Self::Pending
    }

    /// The event published when an order enters this state: the first state and each final
    /// one have one; the intermediate states have none (they are in the history only).
    pub fn event_type(self) -> Option<&'static str> {
        use keel_events::order;
        match self {
            Self::Pending => Some(order::PLACED),
            Self::Reserved | Self::Authorized => None,
            Self::Confirmed => Some(order::CONFIRMED),
            Self::Rejected => Some(order::REJECTED),
            Self::PaymentDeclined => Some(order::PAYMENT_DECLINED),
            Self::PaymentFailed => Some(order::PAYMENT_FAILED),
        }
    }
}

impl std::fmt::Display for OrderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for OrderState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_only_end_states_are_final() {
        for s in OrderState::ALL {
            assert_eq!(OrderState::parse(s.as_str()), Some(s));
        }
        let finals: Vec<_> = OrderState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            finals,
            vec![
                OrderState::Confirmed,
                OrderState::Rejected,
                OrderState::PaymentDeclined,
                OrderState::PaymentFailed
            ]
        );
        for f in finals {
            assert!(
                keel_events::order::FINAL.contains(&f.event_type().unwrap_or("")),
                "{f}"
            );
        }
    }
}
