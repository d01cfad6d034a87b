//! Idempotent consumer, the database half (P03).
//!
//! Brokers deliver at least once: a redelivery after a lost ack, a relay that published twice.
//! A consumer calls [`try_record`] *in the transaction that applies the message's effect*:
//! the first delivery inserts `(consumer, message_id)` and applies the effect; a duplicate
//! finds the row and skips the effect. Both then commit and ack. A concurrent duplicate waits
//! on the primary key until the first commits, so exactly one applies the effect.
//!
//! Must not break: record and effect share one transaction, and the ack follows the commit.

use sqlx::PgConnection;

use crate::PgError;

/// Records `message_id` for `consumer`; `true` the first time, `false` for a duplicate.
pub async fn try_record(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> Result<bool, PgError> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
