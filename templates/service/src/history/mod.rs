//! Item history: the idempotent consumer (P03) that records every item event it hears.
//!
//! skeleton's durable quorum queue (`consumer.queue`, `skeleton.events`) is bound to
//! [`BINDINGS`] on `keel.events`. The template consumes its own `skeleton.item.*` events so it
//! works alone and shows the whole loop (POST → outbox → relay → broker → this consumer);
//! a real service binds to the events of others that it reacts to (`checkout.order.*`) and
//! decodes them with `keel_events::JourneyEvent`. For each message, in **one transaction**:
//! 1. `inbox::try_record(CONSUMER, message_id)`: a redelivery (lost ack, relay republish)
//!    finds its row and skips step 2;
//! 2. the effect: one [`store`] row for the item;
//!
//! then commit, and only then answer [`Outcome::Ack`]. A crash before the commit leaves the
//! message unacked and the broker redelivers it; a crash after the commit but before the ack
//! redelivers a message whose inbox row exists: one effect either way.
//!
//! Failure handling, by kind (P01; the consumer logs the message's fate once):
//! - unparseable body, unknown `schema_version`, data that does not match its event type:
//!   [`Outcome::Reject`] with the reason, because redelivering cannot fix it: it goes to the
//!   queue's DLQ at once (`keelctl dlq list`);
//! - an event type this build does not know: recorded in the inbox and acked, because
//!   producers may add events before their consumers learn them;
//! - database unreachable, serialization conflicts ([`keel_pg::PgError::is_transient`]):
//!   [`Outcome::Unavailable`], so the consumer holds the message and tries again after a
//!   backoff, counting no attempt;
//! - any other database error: [`Outcome::Retry`], through the queue's retry tiers, then its
//!   DLQ.
//!
//! Must not break: the answer is `Ack` only after the commit returned `Ok`.

pub mod store;

use chrono::{DateTime, Utc};
use keel_amqp::{Incoming, Outcome};
use keel_events::{Envelope, SCHEMA_VERSION};
use keel_pg::{PgError, inbox};
use sqlx::PgPool;

use crate::items::{self, ItemCreated, ItemId};
pub use store::HistoryEntry;

/// The inbox's consumer name for this service's queue.
pub const CONSUMER: &str = "skeleton";

/// What the queue is bound to on `keel.events`.
pub const BINDINGS: [&str; 1] = ["skeleton.item.*"];

/// A message understood well enough to act on.
#[derive(Debug)]
struct Parsed {
    /// The inbox key: the AMQP message id (= the envelope id by convention).
    message_id: String,
    event_type: String,
    occurred_at: DateTime<Utc>,
    /// The item the event is about, for the event types this build knows.
    item: Option<ItemId>,
}

/// Why a message can never be processed.
#[derive(Debug, thiserror::Error)]
enum Unprocessable {
    #[error("body is not an event envelope: {0}")]
    Body(serde_json::Error),
    #[error("unknown schema_version {0}")]
    SchemaVersion(u32),
    #[error("{event_type} data does not parse: {source}")]
    Data {
        event_type: String,
        source: serde_json::Error,
    },
}

fn parse(msg: &Incoming) -> Result<Parsed, Unprocessable> {
    let envelope: Envelope = msg.envelope().map_err(Unprocessable::Body)?;
    if envelope.schema_version != SCHEMA_VERSION {
        return Err(Unprocessable::SchemaVersion(envelope.schema_version));
    }
    let item = match envelope.event_type.as_str() {
        items::CREATED => {
            let event: ItemCreated =
                serde_json::from_value(envelope.data.clone()).map_err(|source| {
                    Unprocessable::Data {
                        event_type: envelope.event_type.clone(),
                        source,
                    }
                })?;
            Some(event.item_id)
        }
        _ => None,
    };
    // The property is the convention; the envelope's id is the same value, and a fallback
    // for a producer that forgot the property.
    let message_id = msg
        .message_id
        .clone()
        .unwrap_or_else(|| envelope.id.to_string());
    Ok(Parsed {
        message_id,
        event_type: envelope.event_type,
        occurred_at: envelope.occurred_at,
        item,
    })
}

/// What handling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// First delivery: the item's history has one more entry.
    Recorded,
    /// First delivery of an event type this build does not know: inbox row only.
    Ignored,
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
        Ok(Effect::Recorded | Effect::Ignored) => Outcome::Ack,
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

/// The one transaction: the inbox row, then (first delivery only) the effect.
async fn apply(pool: &PgPool, parsed: &Parsed) -> Result<Effect, PgError> {
    let mut tx = pool.begin().await?;
    if !inbox::try_record(&mut tx, CONSUMER, &parsed.message_id).await? {
        tx.commit().await?;
        return Ok(Effect::Duplicate);
    }
    let effect = match parsed.item {
        Some(item_id) => {
            store::insert(
                &mut tx,
                &store::NewEntry {
                    source_message_id: &parsed.message_id,
                    item_id,
                    event_type: &parsed.event_type,
                    occurred_at: parsed.occurred_at,
                },
            )
            .await?;
            Effect::Recorded
        }
        None => Effect::Ignored,
    };
    tx.commit().await?;
    Ok(effect)
}
