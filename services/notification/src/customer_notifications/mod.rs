//! Customer notifications: what a customer is told when their order reaches a final state,
//! and the event notification publishes when it has told them.
//!
//! - This file: the domain — [`Notification`] and [`for_order_event`], the text a final order
//!   event calls for (and `None` for every other event).
//! - [`store`]: the `notifications` table's SQL, one function per statement.
//!
//! Who writes them is [`crate::journey_events`] (the idempotent consumer, P03); who reads them
//! is [`crate::api`].
//!
//! Must not break: a notification is only ever written together with the inbox row of the
//! message that caused it (and `source_message_id` is unique as a second guard), so one
//! event is one notification however often it is delivered.

pub mod store;

use chrono::{DateTime, Utc};
use keel_events::order::{EventType, OrderEvent, State};
use serde::Serialize;
use uuid::Uuid;

/// One notification, as stored and as served.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Notification {
    pub id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
    /// The order state it announces (`CONFIRMED`, `REJECTED`, `PAYMENT_DECLINED`, ...).
    pub kind: String,
    /// The customer-facing text.
    pub message: String,
    /// The event (message id) that caused it.
    pub source_message_id: String,
    pub created_at: DateTime<Utc>,
}

/// What a customer is told about one order event: the state it announces and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The order state (`kind` of the stored notification).
    pub kind: State,
    pub message: String,
}

/// The announcement an order event calls for: one per final state, `None` for the others.
pub fn for_order_event(kind: EventType, event: &OrderEvent) -> Option<Announcement> {
    let id = event.order_id;
    let because = event
        .reason
        .as_deref()
        .map(|r| format!(" ({})", r.replace('_', " ")))
        .unwrap_or_default();
    let message = match kind {
        EventType::Confirmed => format!("Your order {id} is confirmed."),
        EventType::Rejected => format!("Your order {id} could not be placed{because}."),
        EventType::PaymentDeclined => {
            format!("Your payment for order {id} was declined{because}; you have not been charged.")
        }
        EventType::PaymentFailed => {
            format!("We could not take payment for order {id}; you have not been charged.")
        }
        // The order was only placed: nothing to tell the customer yet.
        EventType::Placed => return None,
    };
    Some(Announcement {
        kind: kind.state(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use keel_events::{Currency, CustomerId, OrderId};

    use super::*;

    fn event(kind: EventType, reason: Option<&str>) -> OrderEvent {
        OrderEvent {
            order_id: OrderId(Uuid::nil()),
            customer_id: CustomerId::from("cust-1"),
            state: kind.state(),
            total_minor: 1200,
            currency: Currency::parse("EUR").expect("a known currency"),
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn only_final_order_events_are_announced() {
        for kind in EventType::ALL {
            let announced = for_order_event(kind, &event(kind, None));
            assert_eq!(announced.is_some(), kind.is_final(), "{kind:?}");
            if let Some(a) = announced {
                assert_eq!(a.kind, kind.state());
            }
        }
    }

    #[test]
    fn a_decline_says_why_and_that_nothing_was_charged() {
        let kind = EventType::PaymentDeclined;
        let Some(a) = for_order_event(kind, &event(kind, Some("insufficient_funds"))) else {
            panic!("a decline is announced")
        };
        assert!(a.message.contains("(insufficient funds)"), "{}", a.message);
        assert!(a.message.contains("not been charged"), "{}", a.message);
    }
}
