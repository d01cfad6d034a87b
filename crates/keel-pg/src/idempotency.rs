//! Idempotency keys, stored with the effect (P13).
//!
//! A client that retries after a timeout cannot know whether its first request took effect.
//! With an idempotency key the server remembers the first answer and gives it again, so a
//! retry never creates or charges twice. The `idempotency_keys` table is a platform table
//! (`crates/keel-pg/migrations/0005_idempotency_keys.sql`): every service's database gets it
//! from [`crate::migrate`], see [`crate::schema`].
//!
//! Two ways to use it:
//! - **one transaction** (checkout's `POST /v1/orders`): [`begin`], write the effect,
//!   [`complete`], commit. A concurrent request with the same key blocks on the primary key
//!   until the first commits and then replays its answer; if it waits longer than `wait` it
//!   gets [`Begin::InProgress`] (the caller answers 409 and must roll back).
//! - **two phases** (an effect that calls out, like billing → provider): [`begin`] and commit
//!   (the in-progress row is visible), call out, then [`complete`] with the effect. A
//!   concurrent caller sees [`Begin::InProgress`]; a row left in progress by a crashed
//!   process longer than `stale_after` is taken over, which is safe only if the outbound call
//!   is itself idempotent (billing passes the key on to the provider).
//!
//! Expired keys are treated as absent and removed in batches by [`purge_expired`].

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::PgError;
use crate::millis;

/// The outcome of [`begin`].
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// First use of the key: do the work, then [`complete`].
    New,
    /// The key was used with the same request: answer with this, do nothing.
    Replay {
        status_code: i32,
        response: serde_json::Value,
    },
    /// The key was used with a different request (a client bug): reject (HTTP 422).
    Mismatch,
    /// Another request with this key is still running: answer 409 (and roll back).
    InProgress,
}

/// Timing of [`begin`].
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// How long to wait for a concurrent request holding the key (one-transaction use).
    pub wait: Duration,
    /// After how long an in-progress row (two-phase use) counts as abandoned.
    pub stale_after: Duration,
}

/// A stable fingerprint of a request: SHA-256 over its parts, length-prefixed so that
/// `["ab", "c"]` and `["a", "bc"]` differ.
pub fn fingerprint(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().to_vec()
}

/// Claims `key` in `scope` for a request with fingerprint `request_hash`. Call inside a
/// transaction on `conn`.
pub async fn begin(
    conn: &mut PgConnection,
    scope: &str,
    key: &str,
    request_hash: &[u8],
    timing: Timing,
) -> Result<Begin, PgError> {
    // Bound the wait behind a concurrent holder of the same key, in the same statement as
    // the insert (one round trip, not three): the CTE sets `lock_timeout` for this
    // transaction before the INSERT can wait on the key. The bound then stays for the rest
    // of the transaction, which suits the short write transactions idempotency wraps.
    let inserted = sqlx::query(
        "WITH bound AS (SELECT set_config('lock_timeout', $5, true))
         INSERT INTO idempotency_keys (scope, key, request_hash, expires_at)
         SELECT $1, $2, $3, now() + make_interval(secs => $4::float8 / 1000) FROM bound
         ON CONFLICT DO NOTHING",
    )
    .bind(scope)
    .bind(key)
    .bind(request_hash)
    .bind(millis(timing.ttl))
    .bind(format!("{}ms", millis(timing.wait).max(1)))
    .execute(&mut *conn)
    .await;
    let inserted = match inserted {
        Ok(r) => r.rows_affected() == 1,
        // 55P03 lock_not_available: a concurrent request holds the key beyond `wait`.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            return Ok(Begin::InProgress);
        }
        Err(e) => return Err(e.into()),
    };
    if inserted {
        return Ok(Begin::New);
    }

    #[derive(sqlx::FromRow)]
    struct Row {
        request_hash: Vec<u8>,
        status_code: Option<i32>,
        response: Option<serde_json::Value>,
        expired: bool,
        stale: bool,
    }
    // The row may be locked by a caller deciding about it (taking over an expired key), or
    // have been purged since our insert found it: both are answered as "in progress", and
    // the client's retry finds a settled key.
    let row: Option<Row> = match sqlx::query_as(
        "SELECT request_hash, status_code, response,
                expires_at < now() AS expired,
                created_at < now() - make_interval(secs => $3::float8 / 1000) AS stale
           FROM idempotency_keys WHERE scope = $1 AND key = $2
           FOR UPDATE",
    )
    .bind(scope)
    .bind(key)
    .bind(millis(timing.stale_after))
    .fetch_optional(&mut *conn)
    .await
    {
        Ok(row) => row,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            return Ok(Begin::InProgress);
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = row else {
        return Ok(Begin::InProgress);
    };

    let abandoned = row.status_code.is_none() && row.stale;
    if row.expired || abandoned {
        // Treat as absent: start over under the new request.
        sqlx::query(
            "UPDATE idempotency_keys
                SET request_hash = $3, status_code = NULL, response = NULL, created_at = now(),
                    expires_at = now() + make_interval(secs => $4::float8 / 1000)
              WHERE scope = $1 AND key = $2",
        )
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .bind(millis(timing.ttl))
        .execute(&mut *conn)
        .await?;
        return Ok(Begin::New);
    }
    if row.request_hash != request_hash {
        return Ok(Begin::Mismatch);
    }
    Ok(match (row.status_code, row.response) {
        (Some(status_code), Some(response)) => Begin::Replay {
            status_code,
            response,
        },
        _ => Begin::InProgress,
    })
}

/// Stores the answer for `key` (in the transaction that wrote the effect).
pub async fn complete(
    conn: &mut PgConnection,
    scope: &str,
    key: &str,
    status_code: i32,
    response: &serde_json::Value,
) -> Result<(), PgError> {
    sqlx::query(
        "UPDATE idempotency_keys SET status_code = $3, response = $4
          WHERE scope = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .bind(status_code)
    .bind(response)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes up to `batch` expired keys; returns how many. Small batches keep each delete's
/// locks and WAL short; the caller repeats while the count equals `batch`.
pub async fn purge_expired(conn: &mut PgConnection, batch: i64) -> Result<u64, PgError> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE ctid IN (
             SELECT ctid FROM idempotency_keys WHERE expires_at < now() LIMIT $1)",
    )
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected())
}
