//! The `notifications` table (migrations/0002): one function per statement, each taking the
//! connection or pool it runs on, so the caller decides the transaction.
//!
//! Must not break: [`insert`] runs inside the consumer's transaction, next to the inbox row
//! and the outbox event (P03, P02); it never opens a transaction of its own.

use keel_events::{CustomerId, OrderId};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Announcement, Notification};

/// What a notification is about: the order and customer, and the message that caused it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub order_id: OrderId,
    pub customer_id: &'a CustomerId,
    /// The inbox key of the event that caused the notification.
    pub source_message_id: &'a str,
}

/// Inserts a notification (inside the caller's transaction) and returns its id.
pub async fn insert(
    conn: &mut PgConnection,
    subject: Subject<'_>,
    announcement: &Announcement,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO notifications (id, order_id, customer_id, kind, message, source_message_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(subject.order_id.0)
    .bind(subject.customer_id.as_str())
    .bind(announcement.kind.as_str())
    .bind(&announcement.message)
    .bind(subject.source_message_id)
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
