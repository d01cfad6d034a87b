//! The `notifications` table (migrations/0002, `emailed_at` from 0004): one function per
//! statement, each taking the connection or pool it runs on, so the caller decides the
//! transaction.
//!
//! Must not break: [`insert`] runs inside the consumer's transaction, next to the inbox row
//! and the outbox event (P03, P02); it never opens a transaction of its own. What a customer
//! was told is never rewritten: the only later write is [`mark_emailed`], of `emailed_at`, the
//! one column the runtime role may update (migrations/0004).

use chrono::{DateTime, Utc};
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

/// A notification and whether it was emailed: what the email worker
/// ([`crate::email`]) loads.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ForEmail {
    #[sqlx(flatten)]
    pub notification: Notification,
    /// When the SMTP server accepted its email; `None`: not yet.
    pub emailed_at: Option<DateTime<Utc>>,
}

/// Notification `id` with its `emailed_at`, if it exists.
pub async fn for_email(pool: &PgPool, id: Uuid) -> Result<Option<ForEmail>, sqlx::Error> {
    sqlx::query_as::<_, ForEmail>(
        "SELECT id, order_id, customer_id, kind, message, source_message_id, created_at,
                emailed_at
           FROM notifications WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Records that notification `id`'s email was accepted, once: `false` if it already was (or
/// the notification does not exist), and the first time is kept.
pub async fn mark_emailed(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE notifications SET emailed_at = now() WHERE id = $1 AND emailed_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
