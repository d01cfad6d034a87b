//! The idempotent consumer (P03): journey events in, customer notifications out.
//!
//! notification's durable quorum queue (`consumer.queue`, `notification.events`) is bound to
//! `checkout.order.*` and `billing.payment.*` on `keel.events`. For each message, in **one
//! transaction**:
//! 1. `inbox::try_record("notification", message_id)` — a redelivery (lost ack, relay
//!    republish) finds its row and skips step 2;
//! 2. for a final order state (`keel_contracts::events::order::FINAL`): insert the customer
//!    notification and its `notification.notification.recorded` event into the outbox;
//!
//! then commit, and only then answer [`Outcome::Ack`]. A crash before the commit leaves the
//! message unacked and the broker redelivers it; a crash after the commit but before the ack
//! redelivers a message whose inbox row exists: one effect either way.
//!
//! Non-final order events and payment events are recorded in the inbox only (they are part of
//! the journey's audit trail; step 3 may turn some into notifications of their own).
//!
//! Failure handling, by kind:
//! - unparseable body, unknown `schema_version`, malformed order data: [`Outcome::Reject`]
//!   (logged once, here; dropped now, dead-lettered from step 3) — redelivering cannot fix it;
//! - database unreachable, serialization/deadlock conflicts: [`Outcome::Retry`] — the consumer
//!   holds the message and tries again after a backoff, so an outage does not burn the
//!   queue's delivery limit;
//! - any other database error: [`Outcome::Requeue`] — it counts towards the delivery limit,
//!   so a message that always fails this way is eventually given up on.
//!
//! Must not break: the answer is `Ack` only after the commit returned `Ok`.

use keel_amqp::{Incoming, Outcome};
use keel_contracts::events::Envelope;
use keel_contracts::events::order::{FINAL, OrderEvent};
use keel_pg::outbox::{self, NewEvent};
use keel_pg::{PgError, inbox};
use sqlx::PgPool;
use uuid::Uuid;

/// The inbox's consumer name for this service's queue.
pub const CONSUMER: &str = "notification";

/// What notification's queue is bound to on `keel.events`.
pub const BINDINGS: [&str; 2] = ["checkout.order.*", "billing.payment.*"];

/// Schema versions of `Envelope` this consumer understands.
const KNOWN_SCHEMA_VERSIONS: [u32; 1] = [1];

/// A message understood well enough to act on.
#[derive(Debug)]
struct Parsed {
    /// The inbox key: the AMQP message id (= the event id by convention).
    message_id: String,
    envelope: Envelope,
    /// The order event's data, for final order events only.
    final_order: Option<OrderEvent>,
}

/// Why a message can never be processed.
#[derive(Debug, thiserror::Error)]
enum Unprocessable {
    #[error("body is not an event envelope: {0}")]
    Body(serde_json::Error),
    #[error("unknown schema_version {0}")]
    SchemaVersion(u32),
    #[error("order event data does not parse: {0}")]
    OrderData(serde_json::Error),
}

fn parse(msg: &Incoming) -> Result<Parsed, Unprocessable> {
    let envelope = msg.envelope().map_err(Unprocessable::Body)?;
    if !KNOWN_SCHEMA_VERSIONS.contains(&envelope.schema_version) {
        return Err(Unprocessable::SchemaVersion(envelope.schema_version));
    }
    let final_order = if FINAL.contains(&envelope.event_type.as_str()) {
        Some(
            serde_json::from_value::<OrderEvent>(envelope.data.clone())
                .map_err(Unprocessable::OrderData)?,
        )
    } else {
        None
    };
    // The property is the convention; the envelope's id is the same value, and a fallback
    // for a producer that forgot the property.
    let message_id = msg
        .message_id
        .clone()
        .unwrap_or_else(|| envelope.id.to_string());
    Ok(Parsed {
        message_id,
        envelope,
        final_order,
    })
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
        Err(reason) => {
            tracing::warn!(
                %reason,
                routing_key = %msg.routing_key,
                message_id = msg.message_id.as_deref().unwrap_or_default(),
                "rejecting a message that can never be processed"
            );
            return Outcome::Reject;
        }
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
        Err(e) if is_transient(&e) => {
            // Expected during an outage; the consumer's retry counter shows it.
            tracing::debug!(error = %e, "database unavailable; will retry");
            Outcome::Retry
        }
        Err(e) => {
            tracing::error!(error = %e, message_id = %parsed.message_id, "handling failed; requeueing");
            Outcome::Requeue
        }
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
    let effect = match parsed.final_order.as_ref().and_then(|event| {
        super::for_order_event(&parsed.envelope.event_type, event).map(|n| (event, n))
    }) {
        Some((event, (kind, message))) => {
            let id = super::insert(&mut tx, event, &kind, &message, &parsed.message_id).await?;
            outbox::insert(
                &mut tx,
                &NewEvent {
                    aggregate_type: "notification",
                    aggregate_id: &id.to_string(),
                    event_type: super::RECORDED,
                    data: serde_json::json!({
                        "notification_id": id,
                        "order_id": event.order_id,
                        "customer_id": event.customer_id,
                        "kind": kind,
                    }),
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

/// Failures that go away by themselves: the database (or pgbouncer) is unreachable, the pool
/// is exhausted, or a conflict that a retry resolves.
fn is_transient(e: &PgError) -> bool {
    let PgError::Sqlx(e) = e else {
        return false;
    };
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 40001/40P01: serialization failure, deadlock;
            // 53: insufficient resources; 57P01-03: shutdown / cannot connect now.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}
