//! Domain events that cross service boundaries over RabbitMQ (`keel.events`).
//!
//! Wire format: the AMQP body is the JSON of an [`Envelope`]; the AMQP properties repeat what a
//! broker-side tool needs without parsing the body (`message_id` = [`Envelope::id`], `type` =
//! [`Envelope::event_type`], `timestamp`, `content_type = application/json`, and a
//! `traceparent` header). The routing key is the event type (`<service>.<aggregate>.<event>`).
//!
//! Versioning: an envelope carries `schema_version`; a consumer accepts the versions it knows
//! and dead-letters the rest rather than guessing. Adding an optional field keeps the version;
//! removing or changing the meaning of one bumps it.

use serde::{Deserialize, Serialize};

/// The exchange every outbox relay publishes to (topic).
pub const EXCHANGE: &str = "keel.events";

/// The JSON body of every event message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event; the AMQP `message_id` and the consumers' inbox key (P03).
    pub id: uuid::Uuid,
    /// `<service>.<aggregate>.<event>`, also the routing key.
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u32,
    /// The aggregate the event is about (an order id, a payment id).
    pub aggregate_id: String,
    /// RFC 3339, when the producer wrote the event (its clock, inside the transaction that
    /// changed the state; commit follows within that transaction's duration).
    pub occurred_at: String,
    /// The event's own fields; see the `*Event` types below.
    pub data: serde_json::Value,
}

/// Final (and first) states of an order, as checkout publishes them.
pub mod order {
    use serde::{Deserialize, Serialize};

    pub const PLACED: &str = "checkout.order.placed";
    pub const CONFIRMED: &str = "checkout.order.confirmed";
    pub const REJECTED: &str = "checkout.order.rejected";
    pub const PAYMENT_DECLINED: &str = "checkout.order.payment_declined";
    pub const PAYMENT_FAILED: &str = "checkout.order.payment_failed";

    /// Every order event type that ends the journey.
    pub const FINAL: [&str; 4] = [CONFIRMED, REJECTED, PAYMENT_DECLINED, PAYMENT_FAILED];

    /// `data` of every `checkout.order.*` event.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct OrderEvent {
        pub order_id: uuid::Uuid,
        pub customer_id: String,
        /// The order's state after the change (`PENDING`, `CONFIRMED`, `REJECTED`, ...).
        pub state: String,
        pub total_minor: i64,
        pub currency: String,
        /// Why the order ended where it did (`out_of_stock`, `insufficient_funds`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}

/// Payment events, as billing publishes them.
pub mod payment {
    use serde::{Deserialize, Serialize};

    pub const AUTHORIZED: &str = "billing.payment.authorized";
    pub const DECLINED: &str = "billing.payment.declined";
    pub const CAPTURE_REQUESTED: &str = "billing.payment.capture_requested";
    pub const CAPTURED: &str = "billing.payment.captured";
    pub const VOIDED: &str = "billing.payment.voided";

    /// `data` of every `billing.payment.*` event.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PaymentEvent {
        pub payment_id: uuid::Uuid,
        pub order_id: uuid::Uuid,
        pub amount_minor: i64,
        pub currency: String,
        /// `AUTHORIZED`, `DECLINED`, `CAPTURE_PENDING`, `CAPTURED`, `VOIDED`.
        pub status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}
