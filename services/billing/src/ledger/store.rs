//! The event store: `payment_events`, append-only (P10).
//!
//! A stream is one payment; its events are numbered 1, 2, 3, … with `PRIMARY KEY (stream_id,
//! version)`. [`append`] writes at `expected_version + 1 ..` and succeeds only if the stream is
//! still at `expected_version`: a writer that decided on a stale view gets
//! [`LedgerError::Conflict`] — its events are rejected, and nobody else's are lost or
//! overwritten. Two writers racing for the same version meet at the primary key: the second
//! waits for the first to commit and then fails with a unique violation (`23505`), which is
//! turned into the same `Conflict`.
//!
//! Append-only is enforced by the database, not by convention: migration 0002 revokes UPDATE,
//! DELETE and TRUNCATE on `payment_events` from `billing_app` (P14), so not even a bug in this
//! service can rewrite history. Must not break: never add an UPDATE/DELETE here; corrections
//! are new events.

use serde_json::Value;
use sqlx::PgConnection;

use super::model::{FoldError, Payment, PaymentEvent, PaymentId, Recorded, fold};

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The stream is no longer at the version the writer decided on. Reload and decide again.
    #[error("payment stream {stream_id} is no longer at version {expected_version}")]
    Conflict {
        stream_id: PaymentId,
        expected_version: i64,
    },
    /// A caller asked to record no events (a bug).
    #[error("nothing to append to payment stream {0}")]
    Empty(PaymentId),
    #[error(transparent)]
    Fold(#[from] FoldError),
    #[error("payment stream {stream_id} version {version} cannot be decoded: {source}")]
    Decode {
        stream_id: PaymentId,
        version: i64,
        source: serde_json::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Pg(#[from] keel_pg::PgError),
}

/// A row of `payment_events` as read back.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub stream_id: uuid::Uuid,
    pub version: i64,
    pub event_type: String,
    pub data: Value,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

impl EventRow {
    pub(crate) fn decode(self) -> Result<Recorded, LedgerError> {
        let stream_id = PaymentId(self.stream_id);
        let event: PaymentEvent = serde_json::from_value(serde_json::json!({
            "event_type": self.event_type,
            "data": self.data,
        }))
        .map_err(|source| LedgerError::Decode {
            stream_id,
            version: self.version,
            source,
        })?;
        Ok(Recorded {
            stream_id,
            version: self.version,
            event,
            recorded_at: self.recorded_at,
        })
    }
}

/// A stream's events in order (empty if the stream does not exist).
pub async fn load_stream(
    conn: &mut PgConnection,
    stream_id: PaymentId,
) -> Result<Vec<Recorded>, LedgerError> {
    sqlx::query_as::<_, EventRow>(
        "SELECT stream_id, version, event_type, data, recorded_at
           FROM payment_events WHERE stream_id = $1 ORDER BY version",
    )
    .bind(stream_id.0)
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(EventRow::decode)
    .collect()
}

/// The payment as the fold of its stream: what commands decide on (not the projection,
/// which is a read model).
pub async fn load(
    conn: &mut PgConnection,
    stream_id: PaymentId,
) -> Result<Option<Payment>, LedgerError> {
    let events = load_stream(conn, stream_id).await?;
    Ok(fold(&events)?)
}

/// Appends `events` to `stream_id` if it is still at `expected_version` (0 = the stream must
/// not exist yet). `metadata` (causation: idempotency key, webhook id, …) is stored with each
/// event. Returns the events as recorded. Call inside the caller's transaction; after a
/// `Conflict` that transaction is aborted and must be rolled back.
pub async fn append(
    conn: &mut PgConnection,
    stream_id: PaymentId,
    expected_version: i64,
    events: &[PaymentEvent],
    metadata: &Value,
) -> Result<Vec<Recorded>, LedgerError> {
    let mut types = Vec::with_capacity(events.len());
    let mut datas = Vec::with_capacity(events.len());
    for e in events {
        types.push(e.event_type().to_owned());
        let mut v = serde_json::to_value(e).map_err(|source| LedgerError::Decode {
            stream_id,
            version: expected_version,
            source,
        })?;
        datas.push(v.get_mut("data").map(Value::take).unwrap_or_default());
    }
    // The WHERE clause refuses a writer whose view is behind (or ahead of) the committed
    // stream; the primary key refuses the one that loses a race for the same version.
    let inserted = sqlx::query_as::<_, (i64, chrono::DateTime<chrono::Utc>)>(
        "INSERT INTO payment_events (stream_id, version, event_type, data, metadata)
         SELECT $1, $2 + e.ord, e.event_type, e.data, $5
           FROM UNNEST($3::text[], $4::jsonb[]) WITH ORDINALITY AS e(event_type, data, ord)
          WHERE (SELECT COALESCE(max(version), 0) FROM payment_events WHERE stream_id = $1) = $2
         RETURNING version, recorded_at",
    )
    .bind(stream_id.0)
    .bind(expected_version)
    .bind(&types)
    .bind(&datas)
    .bind(metadata)
    .fetch_all(conn)
    .await;
    let conflict = LedgerError::Conflict {
        stream_id,
        expected_version,
    };
    let mut rows = match inserted {
        Ok(rows) if rows.len() == events.len() => rows,
        Ok(_) => return Err(conflict),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            return Err(conflict);
        }
        Err(e) => return Err(e.into()),
    };
    rows.sort_by_key(|(v, _)| *v);
    Ok(rows
        .into_iter()
        .zip(events)
        .map(|((version, recorded_at), event)| Recorded {
            stream_id,
            version,
            event: event.clone(),
            recorded_at,
        })
        .collect())
}
