//! The payment ledger, event-sourced (P10).
//!
//! The truth about a payment is its stream of events in `payment_events` ([`store`]),
//! appended with optimistic concurrency and never changed. Everything else is derived:
//! - the `payments` projection ([`projection`]), updated in the same transaction as the
//!   append, and rebuildable from the events at any time (`billing rebuild-projections`);
//! - the public `billing.payment.*` events in the outbox (P02), inserted in that same
//!   transaction, after the projection row is written (the relay's per-aggregate ordering
//!   relies on the aggregate row being locked before the outbox insert).
//!
//! [`record`] is the one way the service changes a payment: append + projection + outbox,
//! all or nothing. Must not break: never write `payments` or the outbox for a payment
//! without appending its event in the same transaction.

pub mod model;
pub mod projection;
pub mod store;

use keel_events::JourneyEvent;
use keel_events::payment::{self, PaymentEvent as PublicPaymentEvent};
use keel_pg::outbox::{self, NewEvent};
use sqlx::PgConnection;

pub use model::{
    Currency, Money, OrderId, Payment, PaymentEvent, PaymentId, PaymentStatus, Recorded, apply,
    payment_id_for_authorize_key,
};
pub use projection::{Rebuilt, rebuild};
pub use store::{LedgerError, append, load};

/// The outbox `aggregate_type` of payments.
pub const AGGREGATE: &str = "payment";

/// Appends `events` to the stream of the payment `before` (`None`: a new stream with id
/// `stream_id`), folds them, writes the projection and one outbox row per public event —
/// inside the caller's transaction `tx`. Returns the payment after the events.
///
/// Fails with [`LedgerError::Conflict`] if the stream moved past `before.version` since the
/// caller loaded it; the caller rolls back, reloads and decides again.
pub async fn record(
    tx: &mut PgConnection,
    stream_id: PaymentId,
    before: Option<&Payment>,
    events: &[PaymentEvent],
    metadata: &serde_json::Value,
) -> Result<Payment, LedgerError> {
    if events.is_empty() {
        return Err(LedgerError::Empty(stream_id));
    }
    let expected = before.map_or(0, |p| p.version);
    let recorded = store::append(tx, stream_id, expected, events, metadata).await?;
    let mut state = before.cloned();
    let mut published = Vec::new();
    for r in &recorded {
        let after = apply(state, r)?;
        if let Some(kind) = r.event.public_type() {
            published.push(public_event(kind, &after));
        }
        state = Some(after);
    }
    let Some(after) = state else {
        return Err(LedgerError::Empty(stream_id));
    };
    projection::upsert(tx, &after).await?;
    let aggregate_id = stream_id.to_string();
    for event in published {
        let data = event.data().map_err(|source| LedgerError::Decode {
            stream_id,
            version: after.version,
            source,
        })?;
        outbox::insert(
            tx,
            &NewEvent {
                aggregate_type: AGGREGATE,
                aggregate_id: &aggregate_id,
                event_type: event.event_type(),
                data,
            },
        )
        .await?;
    }
    Ok(after)
}

/// The public `billing.payment.*` event of kind `kind`: the payment as it is after the event
/// (its published status is the one the event leads to, which `apply` gave `p`).
pub fn public_event(kind: payment::EventType, p: &Payment) -> JourneyEvent {
    JourneyEvent::Payment(
        kind,
        PublicPaymentEvent {
            payment_id: p.payment_id,
            order_id: p.order_id,
            amount_minor: p.amount.minor,
            currency: p.amount.currency,
            status: kind.status(),
            reason: p.decline_reason.clone(),
        },
    )
}
