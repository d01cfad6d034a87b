//! The `items` table (migrations/0002): one function per statement, each taking the
//! connection or pool it runs on, so the caller decides the transaction.
//!
//! Must not break: [`insert`] runs inside the caller's transaction, next to the outbox event
//! and the idempotency key's answer; it never opens a transaction of its own.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Item, ItemId, NewItem};

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    name: String,
    quantity: i32,
    created_at: DateTime<Utc>,
}

impl From<Row> for Item {
    fn from(r: Row) -> Self {
        Self {
            id: ItemId(r.id),
            name: r.name,
            quantity: r.quantity,
            created_at: r.created_at,
        }
    }
}

/// Inserts `item` as `id` (inside the caller's transaction) and returns it as stored.
pub async fn insert(
    conn: &mut PgConnection,
    id: ItemId,
    item: &NewItem,
) -> Result<Item, sqlx::Error> {
    let row: Row = sqlx::query_as(
        "INSERT INTO items (id, name, quantity) VALUES ($1, $2, $3)
         RETURNING id, name, quantity, created_at",
    )
    .bind(id.0)
    .bind(item.name())
    .bind(item.quantity())
    .fetch_one(conn)
    .await?;
    Ok(row.into())
}

/// The item `id`, if it exists.
pub async fn get(pool: &PgPool, id: ItemId) -> Result<Option<Item>, sqlx::Error> {
    let row: Option<Row> =
        sqlx::query_as("SELECT id, name, quantity, created_at FROM items WHERE id = $1")
            .bind(id.0)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(Item::from))
}
