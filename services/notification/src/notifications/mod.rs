//! Customer notifications: what a customer is told when their order reaches a final state.
//!
//! - [`events`]: the idempotent consumer (P03) that turns journey events into notifications:
//!   inbox row, notification and outbox event in one transaction, ack after commit.
//! - [`api`]: `GET /v1/notifications?order_id=` for customers (and the demo and the audit).
//! - This file: the `notifications` table, its SQL and its domain event.
//!
//! Must not break: a notification is only ever written together with the inbox row of the
//! message that caused it (and `source_message_id` is unique as a second guard).

pub mod api;
pub mod events;

use chrono::{DateTime, Utc};
use keel_contracts::events::order::{self, OrderEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The event notification publishes (through its outbox) after recording a notification.
pub const RECORDED: &str = "notification.notification.recorded";

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

/// The notification a final order event calls for, or `None` for any other event.
pub fn for_order_event(event_type: &str, event: &OrderEvent) -> Option<(String, String)> {
    let id = event.order_id;
    let because = event
        .reason
        .as_deref()
        .map(|r| format!(" ({})", r.replace('_', " ")))
        .unwrap_or_default();
    let message = match event_type {
        order::CONFIRMED => format!("Your order {id} is confirmed."),
        order::REJECTED => format!("Your order {id} could not be placed{because}."),
        order::PAYMENT_DECLINED => {
            format!("Your payment for order {id} was declined{because}; you have not been charged.")
        }
        order::PAYMENT_FAILED => {
            format!("We could not take payment for order {id}; you have not been charged.")
        }
        _ => return None,
    };
    Some((event.state.clone(), message))
}

/// Inserts a notification (inside the caller's transaction) and returns its id.
pub async fn insert(
    conn: &mut PgConnection,
    event: &OrderEvent,
    kind: &str,
    message: &str,
    source_message_id: &str,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO notifications (id, order_id, customer_id, kind, message, source_message_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(event.order_id)
    .bind(&event.customer_id)
    .bind(kind)
    .bind(message)
    .bind(source_message_id)
    .execute(conn)
    .await?;
    Ok(id)
}

/// An order's notifications, oldest first, at most `limit`.
pub async fn for_order(
    pool: &PgPool,
    order_id: Uuid,
    limit: i64,
) -> Result<Vec<Notification>, sqlx::Error> {
    sqlx::query_as::<_, Notification>(
        "SELECT id, order_id, customer_id, kind, message, source_message_id, created_at
           FROM notifications WHERE order_id = $1
          ORDER BY created_at, id
          LIMIT $2",
    )
    .bind(order_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}
