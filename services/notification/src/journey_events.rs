//! Which journey events become customer notifications: the idempotent consumer (P03).
//!
//! notification's durable quorum queue (`consumer.queue`, `notification.events`) is bound to
//! [`BINDINGS`] on `keel.events`. For each message, in **one transaction**:
//! 1. `inbox::try_record(CONSUMER, message_id)`: a redelivery (lost ack, relay republish)
//!    finds its row and skips step 2;
//! 2. for a final order state ([`keel_events::order::EventType::is_final`]): insert the customer notification
//!    ([`crate::customer_notifications`]) and its `notification.notification.recorded` event
//!    into the outbox (P02);
//!
//! then commit, and only then answer [`Outcome::Ack`]. A crash before the commit leaves the
//! message unacked and the broker redelivers it; a crash after the commit but before the ack
//! redelivers a message whose inbox row exists: one effect either way.
//!
//! Non-final order events and payment events are recorded in the inbox only: they are part of
//! the journey's audit trail, and a new kind of notification starts by giving one of them an
//! announcement in [`crate::customer_notifications::for_order_event`].
//!
//! Failure handling, by kind (P01; the consumer logs the message's fate once):
//! - unparseable body, unknown `schema_version`, data that does not match its event type
//!   (decoded into `keel_events::JourneyEvent`, never picked out of raw JSON):
//!   [`Outcome::Reject`] with the reason, because redelivering cannot fix it: it goes to
//!   `notification.events.dlq` at once, where `keelctl dlq` lists and replays it;
//! - database unreachable, serialization/deadlock conflicts: [`Outcome::Unavailable`], so the
//!   consumer holds the message and tries again after a backoff, and an outage pushes nothing
//!   through the retry tiers;
//! - any other database error: [`Outcome::Retry`], through the retry tiers (1 s, 10 s, 60 s by
//!   default), then the DLQ.
//!
//! Must not break: the answer is `Ack` only after the commit returned `Ok`.

use keel_amqp::{Incoming, Outcome};
use keel_events::notification::NotificationRecorded;
use keel_events::order::OrderEvent;
use keel_events::{DecodeError, Envelope, JourneyEvent};
use keel_pg::outbox::{self, NewEvent};
use keel_pg::{PgError, inbox};
use sqlx::PgPool;
use uuid::Uuid;

use crate::customer_notifications::store::{self, Subject};
use crate::customer_notifications::{self, Announcement};

/// The inbox's consumer name for this service's queue.
pub const CONSUMER: &str = "notification";

/// What notification's queue is bound to on `keel.events`.
pub const BINDINGS: [&str; 2] = ["checkout.order.*", "billing.payment.*"];

/// A message understood well enough to act on.
#[derive(Debug)]
struct Parsed {
    /// The inbox key: the AMQP message id (= the event id by convention).
    message_id: String,
    envelope: Envelope,
    /// The typed event; `None` for an event type this build does not know (recorded in the
    /// inbox and acked: producers may add events before their consumers learn them).
    event: Option<JourneyEvent>,
}

/// Why a message can never be processed.
#[derive(Debug, thiserror::Error)]
enum Unprocessable {
    #[error("body is not an event envelope: {0}")]
    Body(serde_json::Error),
    /// An unknown `schema_version`, or `data` that does not match its event type.
    #[error("{0}")]
    Decode(DecodeError),
}

fn parse(msg: &Incoming) -> Result<Parsed, Unprocessable> {
    let envelope = msg.envelope().map_err(Unprocessable::Body)?;
    let event = JourneyEvent::decode(&envelope).map_err(Unprocessable::Decode)?;
    // The property is the convention; the envelope's id is the same value, and a fallback
    // for a producer that forgot the property.
    let message_id = msg
        .message_id
        .clone()
        .unwrap_or_else(|| envelope.id.to_string());
    Ok(Parsed {
        message_id,
        envelope,
        event,
    })
}

impl Parsed {
    /// The order event and what it tells the customer, if it tells them anything.
    fn announcement(&self) -> Option<(&OrderEvent, Announcement)> {
        match &self.event {
            Some(JourneyEvent::Order(kind, event)) => {
                customer_notifications::for_order_event(*kind, event).map(|a| (event, a))
            }
            _ => None,
        }
    }
}

/// What handling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// First delivery of a final order event: a notification was recorded.
    Notified(Uuid),
    /// First delivery of any other event: recorded in the inbox only.
    Recorded,
    /// A redelivery: nothing done.
    Duplicate,
}

/// The handler the consumer calls for every message (see the module docs).
pub async fn handle(pool: PgPool, msg: Incoming) -> Outcome {
    let parsed = match parse(&msg) {
        Ok(p) => p,
        // Logged once, by the consumer, as it dead-letters the message with this reason.
        Err(reason) => return Outcome::reject(reason),
    };
    match apply(&pool, &parsed).await {
        Ok(Effect::Notified(id)) => {
            tracing::info!(notification_id = %id, event_type = %parsed.envelope.event_type,
                aggregate_id = %parsed.envelope.aggregate_id, "customer notification recorded");
            Outcome::Ack
        }
        Ok(Effect::Recorded) => Outcome::Ack,
        Ok(Effect::Duplicate) => {
            tracing::debug!(message_id = %parsed.message_id, "duplicate message; no effect");
            Outcome::Ack
        }
        Err(e) if e.is_transient() => {
            // Expected during an outage; `amqp_handler_unavailable_total` shows it.
            tracing::debug!(error = %e, "database unavailable; will retry in place");
            Outcome::Unavailable
        }
        // Logged once, by the consumer, when it moves the message to a tier or the DLQ.
        Err(e) => Outcome::retry(e),
    }
}

/// The one transaction: inbox row, then (first time, final order state) the notification and
/// its outbox event.
async fn apply(pool: &PgPool, parsed: &Parsed) -> Result<Effect, PgError> {
    let mut tx = pool.begin().await?;
    if !inbox::try_record(&mut tx, CONSUMER, &parsed.message_id).await? {
        tx.commit().await?;
        return Ok(Effect::Duplicate);
    }
    let effect = match parsed.announcement() {
        Some((event, announcement)) => {
            let subject = Subject {
                order_id: event.order_id,
                customer_id: &event.customer_id,
                source_message_id: &parsed.message_id,
            };
            let id = store::insert(&mut tx, subject, &announcement).await?;
            crate::email::enqueue(&mut tx, id).await?;
            crate::webhooks::enqueue_for(
                &mut tx,
                crate::webhooks::Recorded {
                    notification_id: id,
                    order_id: event.order_id.0,
                    customer_id: event.customer_id.as_str(),
                    state: announcement.kind,
                    message: &announcement.message,
                    at: chrono::Utc::now(),
                },
            )
            .await?;
            let recorded = JourneyEvent::NotificationRecorded(NotificationRecorded {
                notification_id: id,
                order_id: event.order_id,
                customer_id: event.customer_id.clone(),
                kind: announcement.kind,
            });
            outbox::insert(
                &mut tx,
                &NewEvent {
                    aggregate_type: "notification",
                    aggregate_id: &id.to_string(),
                    event_type: recorded.event_type(),
                    data: recorded
                        .data()
                        .map_err(|e| PgError::Encode(e.to_string()))?,
                },
            )
            .await?;
            Effect::Notified(id)
        }
        None => Effect::Recorded,
    };
    tx.commit().await?;
    Ok(effect)
}
