//! The event envelope: the JSON body of every message on `keel.events`, and its decoding into
//! typed journey events (the wire half of P02 and P03).
//!
//! Wire format: the AMQP body is the JSON of an [`Envelope`]; the AMQP properties repeat what a
//! broker-side tool needs without parsing the body (`message_id` = [`Envelope::id`], `type` =
//! [`Envelope::event_type`], `timestamp`, `content_type = application/json`, and a
//! `traceparent` header). The routing key is the event type (`<service>.<aggregate>.<event>`).
//!
//! Versioning: an envelope carries `schema_version`; [`JourneyEvent::decode`] accepts the
//! version this crate writes and refuses the rest (a consumer dead-letters them rather than
//! guessing). Adding an optional field keeps the version; removing or changing the meaning of
//! one bumps it. An event *type* a consumer does not know is not an error: producers may add
//! events, and a consumer bound to `billing.payment.*` must not dead-letter the new one.
//!
//! Must not break: producers and consumers build and read `data` only through the payload
//! structs ([`JourneyEvent`]), never by hand, so both sides are the same Rust type.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::notification::{self, NotificationRecorded};
use crate::order::{self, OrderEvent};
use crate::payment::{self, PaymentEvent};

/// The exchange every outbox relay publishes to (topic).
pub const EXCHANGE: &str = "keel.events";

/// The [`Envelope`] version producers write and consumers accept.
pub const SCHEMA_VERSION: u32 = 1;

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
    /// When the producer wrote the event (its clock, inside the transaction that changed the
    /// state; commit follows within that transaction's duration). RFC 3339 on the wire.
    pub occurred_at: DateTime<Utc>,
    /// The event's own fields: one of the payload structs, as JSON.
    pub data: serde_json::Value,
}

/// Every event of the journey, typed: what producers write and consumers match on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JourneyEvent {
    /// `checkout.order.*`
    Order(order::EventType, OrderEvent),
    /// `billing.payment.*`
    Payment(payment::EventType, PaymentEvent),
    /// `notification.notification.recorded`
    NotificationRecorded(NotificationRecorded),
}

impl JourneyEvent {
    /// The envelope `type` and routing key.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Order(t, _) => t.as_str(),
            Self::Payment(t, _) => t.as_str(),
            Self::NotificationRecorded(_) => notification::RECORDED,
        }
    }

    /// The envelope `data`.
    pub fn data(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::Order(_, e) => serde_json::to_value(e),
            Self::Payment(_, e) => serde_json::to_value(e),
            Self::NotificationRecorded(e) => serde_json::to_value(e),
        }
    }

    /// The typed event in `envelope`; `Ok(None)` for an event type this crate does not know
    /// (see the module docs for why that is not an error).
    pub fn decode(envelope: &Envelope) -> Result<Option<Self>, DecodeError> {
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(DecodeError::SchemaVersion(envelope.schema_version));
        }
        let data = |e| DecodeError::Data {
            event_type: envelope.event_type.clone(),
            source: e,
        };
        let t = envelope.event_type.as_str();
        let event = if let Some(kind) = order::EventType::parse(t) {
            Self::Order(kind, OrderEvent::deserialize(&envelope.data).map_err(data)?)
        } else if let Some(kind) = payment::EventType::parse(t) {
            Self::Payment(
                kind,
                PaymentEvent::deserialize(&envelope.data).map_err(data)?,
            )
        } else if t == notification::RECORDED {
            Self::NotificationRecorded(
                NotificationRecorded::deserialize(&envelope.data).map_err(data)?,
            )
        } else {
            return Ok(None);
        };
        Ok(Some(event))
    }
}

/// Why an envelope of a known event type cannot be decoded: redelivering cannot fix it.
#[derive(Debug)]
pub enum DecodeError {
    /// A `schema_version` this crate does not write.
    SchemaVersion(u32),
    /// `data` does not match the payload of its `type`.
    Data {
        event_type: String,
        source: serde_json::Error,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SchemaVersion(v) => write!(f, "unknown schema_version {v}"),
            Self::Data { event_type, source } => {
                write!(f, "{event_type} data does not parse: {source}")
            }
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::SchemaVersion(_) => None,
            Self::Data { source, .. } => Some(source),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::{Currency, CustomerId, OrderId, PaymentId};

    fn envelope(event: &JourneyEvent) -> Envelope {
        Envelope {
            id: Uuid::nil(),
            event_type: event.event_type().to_owned(),
            schema_version: SCHEMA_VERSION,
            aggregate_id: "a-1".into(),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            data: event.data().unwrap(),
        }
    }

    fn order_event(kind: order::EventType, reason: Option<&str>) -> OrderEvent {
        OrderEvent {
            order_id: OrderId(Uuid::nil()),
            customer_id: CustomerId::from("cust-42"),
            state: kind.state(),
            total_minor: 4200,
            currency: Currency::parse("EUR").unwrap(),
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn every_journey_event_round_trips_through_the_wire_format() {
        let mut events: Vec<JourneyEvent> = order::EventType::ALL
            .into_iter()
            .map(|k| JourneyEvent::Order(k, order_event(k, Some("out_of_stock"))))
            .collect();
        events.extend(payment::EventType::ALL.into_iter().map(|k| {
            JourneyEvent::Payment(
                k,
                PaymentEvent {
                    payment_id: PaymentId(Uuid::nil()),
                    order_id: OrderId(Uuid::nil()),
                    amount_minor: 4200,
                    currency: Currency::parse("EUR").unwrap(),
                    status: k.status(),
                    reason: None,
                },
            )
        }));
        events.push(JourneyEvent::NotificationRecorded(NotificationRecorded {
            notification_id: Uuid::nil(),
            order_id: OrderId(Uuid::nil()),
            customer_id: CustomerId::from("cust-42"),
            kind: order::State::Confirmed,
        }));
        for event in events {
            // Through the bytes a broker carries, as a consumer sees them.
            let body = serde_json::to_vec(&envelope(&event)).unwrap();
            let received: Envelope = serde_json::from_slice(&body).unwrap();
            assert_eq!(JourneyEvent::decode(&received).unwrap(), Some(event));
        }
    }

    #[test]
    fn the_order_event_wire_format_is_the_published_contract() {
        let event = JourneyEvent::Order(
            order::EventType::PaymentDeclined,
            order_event(
                order::EventType::PaymentDeclined,
                Some("insufficient_funds"),
            ),
        );
        let wire = serde_json::to_value(envelope(&event)).unwrap();
        assert_eq!(
            wire,
            json!({
                "id": "00000000-0000-0000-0000-000000000000",
                "type": "checkout.order.payment_declined",
                "schema_version": 1,
                "aggregate_id": "a-1",
                "occurred_at": "2023-11-14T22:13:20Z",
                "data": {
                    "order_id": "00000000-0000-0000-0000-000000000000",
                    "customer_id": "cust-42",
                    "state": "PAYMENT_DECLINED",
                    "total_minor": 4200,
                    "currency": "EUR",
                    "reason": "insufficient_funds"
                }
            })
        );
        // Envelopes written before `occurred_at` was typed used `+00:00`; they still read.
        let mut old = wire;
        old["occurred_at"] = json!("2023-11-14T22:13:20+00:00");
        let old: Envelope = serde_json::from_value(old).unwrap();
        assert_eq!(JourneyEvent::decode(&old).unwrap(), Some(event));
    }

    #[test]
    fn unknown_types_are_not_errors_but_bad_data_and_versions_are() {
        let event = JourneyEvent::Order(
            order::EventType::Placed,
            order_event(order::EventType::Placed, None),
        );
        let mut e = envelope(&event);
        e.event_type = "billing.payment.refunded".into();
        assert_eq!(JourneyEvent::decode(&e).unwrap(), None);

        let mut e = envelope(&event);
        e.schema_version = 2;
        assert!(matches!(
            JourneyEvent::decode(&e),
            Err(DecodeError::SchemaVersion(2))
        ));

        let mut e = envelope(&event);
        e.data["currency"] = json!("euro");
        let err = JourneyEvent::decode(&e).unwrap_err();
        assert!(
            err.to_string().starts_with("checkout.order.placed data"),
            "{err}"
        );

        let mut e = envelope(&event);
        e.data["state"] = json!("RESERVED");
        assert!(
            JourneyEvent::decode(&e).is_err(),
            "unpublished states refused"
        );
    }
}
