//! The `item_history` table (migrations/0002): what the consumer recorded, one function per
//! statement.
//!
//! Must not break: [`insert`] runs inside the consumer's transaction, next to the inbox row
//! of the message it records; it never opens a transaction of its own.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::items::ItemId;

/// One event the consumer recorded about an item, as served in `GET /v1/items/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub event_type: String,
    /// When the producer wrote the event.
    pub occurred_at: DateTime<Utc>,
    /// When this service recorded it: the gap is the event's trip through outbox and broker.
    pub recorded_at: DateTime<Utc>,
}

/// A history row to write.
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    /// The inbox key of the message recorded.
    pub source_message_id: &'a str,
    pub item_id: ItemId,
    pub event_type: &'a str,
    pub occurred_at: DateTime<Utc>,
}

/// Records one event (inside the caller's transaction).
pub async fn insert(conn: &mut PgConnection, entry: &NewEntry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO item_history (source_message_id, item_id, event_type, occurred_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(entry.source_message_id)
    .bind(entry.item_id.0)
    .bind(entry.event_type)
    .bind(entry.occurred_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// An item's history, oldest first, at most `limit` entries.
pub async fn for_item(
    pool: &PgPool,
    item_id: ItemId,
    limit: i64,
) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    sqlx::query_as::<_, HistoryEntry>(
        "SELECT event_type, occurred_at, recorded_at
           FROM item_history WHERE item_id = $1
          ORDER BY occurred_at, source_message_id
          LIMIT $2",
    )
    .bind(item_id.0)
    .bind(limit)
    .fetch_all(pool)
    .await
}
