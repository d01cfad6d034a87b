//! The order's states, and how checkout's state enums are stored: one mapping per enum.
//!
//! Every state checkout keeps in a `text` column (an order's and a saga's state, a step's
//! name and outcome, a reservation's state) is an enum with one `as_str` — the text in the
//! column, the API and the events — and a `parse` that inverts it. `keel_pg::text_column!`
//! derives the sqlx encoding from those two (the platform's one way to store a state), so SQL binds the enum itself (`.bind(OrderState::Pending)`)
//! and rows decode into it: no state is ever spelled as a string literal in a query, and a
//! value the code does not know fails to decode instead of travelling on as a string. The
//! columns' CHECK constraints (migrations) list the same texts; the round-trip tests here and
//! in `saga::state` keep the two in step.
//!
//! Must not break: `as_str` is the stored format. Renaming a variant's text needs a migration
//! of the rows (and the CHECK constraint), never just a code change.

use keel_pg::text_column;
use serde::Serialize;

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

text_column!(OrderState, "order state");

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

    /// The stored and published text (the one mapping).
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
