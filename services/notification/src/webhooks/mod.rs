//! Customer webhooks (P33): a customer registers an endpoint (a URL and the event types it
//! wants) and every notification of those types is POSTed to it, signed the Standard Webhooks
//! way, retried on a documented schedule, with each endpoint isolated from the others.
//!
//! - [`endpoints`]: registration's rules (https, the SSRF guard at registration, known event
//!   types) and the `webhook_endpoints` table; [`api`]: the HTTP API on 8082, behind the
//!   platform's API keys (`keel_service::api_keys`);
//! - [`deliveries`]: one delivery per (endpoint, notification), enqueued with the notification
//!   in the consumer's transaction as a `webhook.deliver` job (P08), and every attempt
//!   recorded;
//! - [`deliver`]: the worker, with a circuit breaker (P25) and a bulkhead per endpoint, so a
//!   dead or slow endpoint never delays the others; [`schedule`]: the retry schedule.
//!
//! An endpoint whose attempts have all failed for `webhooks.disable_after` is disabled, its
//! pending deliveries are failed, and its owner is emailed (in the transaction that disables
//! it: `crate::email`'s second kind of job).
//!
//! Left for later, on purpose: the signing secret is stored as it is (every delivery needs
//! it; encrypting it under a key held outside the database would protect a stolen backup),
//! a registered endpoint is not verified by a challenge, and a disabled endpoint is not
//! re-enabled in place (its owner registers it again).

pub mod api;
pub mod deliver;
pub mod deliveries;
pub mod endpoints;
pub mod schedule;

use chrono::{DateTime, Utc};
use keel_pg::PgError;
use sqlx::PgConnection;
use uuid::Uuid;

pub use self::deliver::Deliverer;
pub use self::deliveries::WEBHOOK_QUEUE;

/// A recorded notification, as its webhooks carry it.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    pub notification_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub state: keel_events::order::State,
    pub message: &'a str,
    pub at: DateTime<Utc>,
}

/// Schedules the deliveries of `notification` to its customer's endpoints subscribed to its
/// type, inside the consumer's transaction (never one of its own). Returns how many.
pub async fn enqueue_for(
    conn: &mut PgConnection,
    notification: Recorded<'_>,
) -> Result<usize, PgError> {
    let event_type = endpoints::event_type_for(notification.state);
    let targets = endpoints::subscribed(conn, notification.customer_id, &event_type).await?;
    if targets.is_empty() {
        return Ok(0);
    }
    let payload = deliveries::Payload {
        event_type: &event_type,
        timestamp: notification.at,
        data: deliveries::PayloadData {
            notification_id: notification.notification_id,
            order_id: notification.order_id,
            customer_id: notification.customer_id,
            message: notification.message,
        },
    };
    deliveries::enqueue(conn, &targets, &payload).await?;
    Ok(targets.len())
}
