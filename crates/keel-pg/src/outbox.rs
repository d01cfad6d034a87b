//! Transactional outbox, the database half (P02).
//!
//! "Write the database, then publish" loses an event when the process dies between the two,
//! and invents one when the publish succeeds but the transaction rolls back. Instead a service
//! [`insert`]s its event into the `outbox` table *in the transaction that changes the state*:
//! both commit or neither does. A relay (`keel_amqp::relay`) later [`claim`]s committed rows,
//! publishes them with publisher confirms and [`mark_sent`]s them only after the broker
//! confirmed. Delivery is therefore at-least-once; consumers dedupe by event id (P03).
//!
//! Ordering guarantee (per aggregate): the events of one aggregate are published in `seq`
//! order, and event *n + 1* is not claimed while event *n* is unsent — even with several
//! relays running — because [`claim`] only takes the oldest unsent event of each aggregate.
//! `seq` is assigned at insert, so writers must lock the aggregate's row before inserting
//! its event (every Keel writer updates the aggregate first); then insert order is commit
//! order. Across aggregates there is no ordering, by design: it would serialise everything.
//!
//! Failures come in two kinds, and only one is the row's fault:
//! - **the path failed** (broker unreachable, a confirm that never came, the database):
//!   [`record_transient`] notes the error; the row is retried as soon as the relay's own
//!   backoff allows and is never parked for it, so an outage only delays the backlog;
//! - **the row was refused** (the broker nacked it, it is larger than the relay will send):
//!   [`record_refusals`] counts an attempt and holds the row back until its `retry_at`; at the
//!   relay's bound the row is **parked** (`parked_at`, the reason in `last_error`) and no
//!   longer claimed. Rows of other aggregates keep flowing; the later rows of the parked
//!   row's own aggregate wait behind it, because publishing them would break that
//!   aggregate's order. An operator lists parked rows ([`parked`]) and returns them to the
//!   relay ([`unpark`], [`unpark_all`]), which `keelctl outbox parked|retry` does.
//!
//! Must not break: [`insert`] takes the caller's connection (its transaction), never a pool;
//! a parked or waiting row still counts as unsent in [`claim`]'s per-aggregate rule.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_events::Envelope;
use serde::Serialize;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use crate::PgError;

/// Version of [`Envelope`] this crate writes: the one `keel_events` decodes.
pub use keel_events::SCHEMA_VERSION;

/// An event to publish once the surrounding transaction commits.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// `order`, `payment`, ... (with `aggregate_id`, the ordering key).
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    /// `<service>.<aggregate>.<event>`: the `type` and the routing key.
    pub event_type: &'a str,
    /// The event's fields (a `keel_events` payload as JSON, from `JourneyEvent::data`).
    pub data: serde_json::Value,
}

/// Writes `event` to the outbox on `conn` (which must be inside the state-changing
/// transaction) and returns its id, which becomes the message id. The current trace context
/// is stored with it so the consumer's span joins the producer's trace (P35).
pub async fn insert(conn: &mut PgConnection, event: &NewEvent<'_>) -> Result<Uuid, PgError> {
    // v7: time-ordered ids keep the primary key index append-mostly.
    let id = Uuid::now_v7();
    let envelope = Envelope {
        id,
        event_type: event.event_type.to_owned(),
        schema_version: SCHEMA_VERSION,
        aggregate_id: event.aggregate_id.to_owned(),
        occurred_at: Utc::now(),
        data: event.data.clone(),
    };
    let payload = serde_json::to_value(&envelope).map_err(|e| PgError::Encode(e.to_string()))?;
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(event.aggregate_type)
    .bind(event.aggregate_id)
    .bind(event.event_type)
    .bind(payload)
    .bind(keel_telemetry::propagation::current_traceparent())
    .execute(conn)
    .await?;
    Ok(id)
}

/// A committed, unsent event, as the relay sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub id: Uuid,
    pub seq: i64,
    pub event_type: String,
    /// The [`Envelope`] JSON: the message body.
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Refusals so far (nacks, too large); the relay parks the row at its bound.
    pub attempts: i32,
}

/// Locks up to `limit` publishable events (the oldest unsent one of each aggregate, oldest
/// first), skipping rows another relay holds, parked rows and rows whose `retry_at` has not
/// come. Call inside a transaction and keep it open until [`mark_sent`]: the row locks are
/// what make two relays safe. A parked or waiting row still holds back the later rows of its
/// aggregate: the `NOT EXISTS` looks at every unsent row, whatever its state.
///
/// The plan is pinned, because the one that matters is the one the statistics get wrong.
/// In steady state almost every row is sent, so the planner expects few unsent rows and
/// likes a hash anti-join over all of them plus a sort; that is fine for ten rows and
/// quadratic for a backlog of a hundred thousand after a broker outage, exactly when the
/// relay must drain fast. With hash joins, bitmap scans and sorts off for this transaction's
/// claim, it walks `outbox_unsent` in `seq` order, probes `outbox_unsent_aggregate` per row
/// and stops at `limit`: O(limit) whatever the statistics say. (Measured here: 15 ms per
/// claim with a fresh 5,000-row backlog before, under 1 ms after.) One round trip: the
/// settings and the query go as one simple-protocol batch, so `limit` is formatted into it.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<Pending>, PgError> {
    let sql = format!(
        "SET LOCAL enable_hashjoin = off;
         SET LOCAL enable_bitmapscan = off;
         SET LOCAL enable_sort = off;
         SELECT o.id, o.seq, o.event_type, o.payload, o.traceparent, o.created_at, o.attempts
           FROM outbox o
          WHERE o.sent_at IS NULL
            AND o.parked_at IS NULL
            AND (o.retry_at IS NULL OR o.retry_at <= now())
            AND NOT EXISTS (
                SELECT 1 FROM outbox e
                 WHERE e.sent_at IS NULL
                   AND e.aggregate_type = o.aggregate_type
                   AND e.aggregate_id = o.aggregate_id
                   AND e.seq < o.seq)
          ORDER BY o.seq
          LIMIT {}
          FOR UPDATE SKIP LOCKED",
        limit.max(1)
    );
    // AssertSqlSafe: the only value formatted in is an integer.
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| Pending::from_row(r).map_err(PgError::from))
        .collect()
}

/// Marks `ids` sent (after the broker confirmed them).
pub async fn mark_sent(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64, PgError> {
    Ok(
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(ids)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

/// Notes `error` on `ids` after a failure of the path, not of the rows (broker unreachable,
/// no confirm in time, the database): operators see it in `last_error`; `attempts` does not
/// move, so an outage never parks a row.
pub async fn record_transient(
    conn: &mut PgConnection,
    ids: &[Uuid],
    error: &str,
) -> Result<(), PgError> {
    sqlx::query("UPDATE outbox SET last_error = $2 WHERE id = ANY($1) AND sent_at IS NULL")
        .bind(ids)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// The broker (or the relay's own bound) refused one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Uuid,
    /// Why: kept in `last_error`, shown by `keelctl outbox parked`.
    pub reason: String,
    /// `Some(delay)`: try again no sooner than `delay` from now. `None`: park the row.
    pub retry_in: Option<Duration>,
}

/// Records refused rows: one more attempt each, the reason in `last_error`, and either a
/// `retry_at` or, for those the caller decided to park, `parked_at`. Returns how many were
/// parked. Call in the transaction that claimed them (their locks keep `attempts` current).
pub async fn record_refusals(
    conn: &mut PgConnection,
    refusals: &[Refusal],
) -> Result<u64, PgError> {
    if refusals.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = refusals.iter().map(|r| r.id).collect();
    let reasons: Vec<&str> = refusals.iter().map(|r| r.reason.as_str()).collect();
    // Milliseconds, -1 meaning "park": one array per column keeps this one statement.
    let retry_ms: Vec<i64> = refusals
        .iter()
        .map(|r| {
            r.retry_in
                .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
        .collect();
    let parked: i64 = sqlx::query_scalar(
        "WITH r AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[]) AS r(id, reason, ms)),
              u AS (
                UPDATE outbox o
                   SET attempts = o.attempts + 1,
                       last_error = r.reason,
                       parked_at = CASE WHEN r.ms < 0 THEN now() END,
                       retry_at = CASE WHEN r.ms >= 0
                                       THEN now() + r.ms * interval '1 millisecond' END
                  FROM r
                 WHERE o.id = r.id AND o.sent_at IS NULL
             RETURNING o.parked_at)
         SELECT count(*) FILTER (WHERE parked_at IS NOT NULL) FROM u",
    )
    .bind(&ids)
    .bind(&reasons)
    .bind(&retry_ms)
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(parked).unwrap_or(0))
}

/// A parked row, as an operator lists it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Parked {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    /// Why it was parked (the last refusal).
    pub reason: Option<String>,
    pub parked_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Parked rows, oldest parked first, at most `limit`. Needs `SELECT` on `outbox` only.
pub async fn parked(conn: &mut PgConnection, limit: i64) -> Result<Vec<Parked>, PgError> {
    Ok(sqlx::query_as::<_, Parked>(
        "SELECT id, aggregate_type, aggregate_id, event_type, attempts,
                last_error AS reason, parked_at, created_at
           FROM outbox
          WHERE parked_at IS NOT NULL AND sent_at IS NULL
          ORDER BY parked_at, seq
          LIMIT $1",
    )
    .bind(limit.max(1))
    .fetch_all(conn)
    .await?)
}

/// Returns parked row `id` to the relay with a fresh set of attempts; `false` if no such row
/// is parked. Its `last_error` stays as the record of why it was parked until the relay
/// publishes it or refuses it again. Needs `UPDATE (parked_at, attempts)` and `SELECT` on
/// `outbox` (the `WHERE` reads `id`, `parked_at`, `sent_at`).
pub async fn unpark(conn: &mut PgConnection, id: Uuid) -> Result<bool, PgError> {
    let rows = sqlx::query(
        "UPDATE outbox SET parked_at = NULL, attempts = 0
          WHERE id = $1 AND parked_at IS NOT NULL AND sent_at IS NULL",
    )
    .bind(id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(rows == 1)
}

/// Returns every parked row to the relay ([`unpark`] for all); how many it returned.
pub async fn unpark_all(conn: &mut PgConnection) -> Result<u64, PgError> {
    Ok(sqlx::query(
        "UPDATE outbox SET parked_at = NULL, attempts = 0
          WHERE parked_at IS NOT NULL AND sent_at IS NULL",
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// What an operator (and the metrics) want to know about the backlog.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct Backlog {
    /// Unsent rows the relay will still try (parked ones are counted in `parked`).
    pub unsent: i64,
    /// Age of the oldest of those in seconds (0 when none).
    pub oldest_unsent_seconds: f64,
    /// Rows parked for an operator.
    pub parked: i64,
}

/// The unsent backlog and the parked rows (one pass over the unsent rows' index).
pub async fn backlog(conn: &mut PgConnection) -> Result<Backlog, PgError> {
    Ok(sqlx::query_as::<_, Backlog>(
        "SELECT count(*) FILTER (WHERE parked_at IS NULL) AS unsent,
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL)),
                         0)::float8 AS oldest_unsent_seconds,
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked
           FROM outbox WHERE sent_at IS NULL",
    )
    .fetch_one(conn)
    .await?)
}
