//! Webhook deliveries and their attempts (tables `webhook_deliveries`, `webhook_attempts`,
//! migrations/0005) and the `webhook.deliver` job that runs each (keel-pg's queue, P08).
//!
//! [`enqueue`] runs in the consumer's transaction, next to the notification: one delivery row
//! per subscribed endpoint and one job each, whose id is the delivery's; a redelivered event
//! never gets that far (the inbox), and `UNIQUE (endpoint_id, notification_id)` is the second
//! guard. The body is rendered once, here, and sent byte for byte on every attempt.
//!
//! [`record`] is the one transaction that ends an attempt: the attempt row, the delivery's
//! new state, and the endpoint's failing run (set on failure, cleared on success), which may
//! disable it (see [`Recorded::disabled`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_pg::PgError;
use keel_pg::jobs::{self, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The job queue deliveries run on.
pub const WEBHOOK_QUEUE: &str = "webhook.deliver";

/// `max_attempts` of a delivery's job. The job's attempts are not the delivery's: a job also
/// comes back, without an attempt at the endpoint, while its endpoint's breaker is open or its
/// share of the worker is taken. The delivery's own attempts (`webhook_deliveries.attempts`)
/// follow `webhooks.retry_schedule`; this only stops a job that would otherwise never end.
pub const JOB_MAX_ATTEMPTS: i32 = 100_000;

/// The payload of a `webhook.deliver` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryJob {
    pub delivery_id: Uuid,
    /// The delivery's endpoint: the group the worker skips while the endpoint is busy or its
    /// breaker open (see `super::deliver`).
    pub endpoint_id: Uuid,
}

/// What a notification's deliveries carry.
#[derive(Debug, Clone, Serialize)]
pub struct Payload<'a> {
    /// `order.confirmed`, …
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub timestamp: DateTime<Utc>,
    pub data: PayloadData<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PayloadData<'a> {
    pub notification_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub message: &'a str,
}

/// Schedules `payload` to each endpoint in `endpoints`, inside the caller's transaction: two
/// statements however many endpoints (the deliveries, then their jobs), so fanning a
/// notification out to many endpoints keeps the consumer's transaction short.
pub async fn enqueue(
    conn: &mut PgConnection,
    endpoints: &[Uuid],
    payload: &Payload<'_>,
) -> Result<(), PgError> {
    let body = serde_json::to_string(payload).map_err(|e| PgError::Encode(e.to_string()))?;
    let ids: Vec<Uuid> = endpoints.iter().map(|_| Uuid::now_v7()).collect();
    let created: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "INSERT INTO webhook_deliveries (id, endpoint_id, notification_id, event_type, body)
         SELECT id, endpoint_id, $3, $4, $5 FROM unnest($1::uuid[], $2::uuid[]) AS n (id, endpoint_id)
         ON CONFLICT (endpoint_id, notification_id) DO NOTHING
         RETURNING id, endpoint_id",
    )
    .bind(&ids)
    .bind(endpoints)
    .bind(payload.data.notification_id)
    .bind(payload.event_type)
    .bind(&body)
    .fetch_all(&mut *conn)
    .await?;
    let jobs = created
        .into_iter()
        .map(|(delivery_id, endpoint_id)| {
            Ok(NewJob {
                queue: WEBHOOK_QUEUE,
                payload: serde_json::to_value(DeliveryJob {
                    delivery_id,
                    endpoint_id,
                })
                .map_err(|e| PgError::Encode(e.to_string()))?,
                max_attempts: JOB_MAX_ATTEMPTS,
                delay: Duration::ZERO,
                id: Some(delivery_id),
            })
        })
        .collect::<Result<Vec<_>, PgError>>()?;
    jobs::enqueue_many(conn, &jobs).await?;
    Ok(())
}

/// A delivery as its worker needs it: the row, and its endpoint's URL, secret and state.
/// `Debug` leaves the secret and the body out.
#[derive(Clone, sqlx::FromRow)]
pub struct Due {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub customer_id: String,
    pub url: String,
    pub secret: String,
    pub body: String,
    pub state: String,
    pub attempts: i32,
    pub failing_since: Option<DateTime<Utc>>,
    pub endpoint_gone: bool,
}

impl std::fmt::Debug for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Due")
            .field("id", &self.id)
            .field("endpoint_id", &self.endpoint_id)
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "delivery {} to endpoint {}", self.id, self.endpoint_id)
    }
}

/// Loads delivery `id` with its endpoint.
pub async fn load(pool: &PgPool, id: Uuid) -> Result<Option<Due>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.id, d.endpoint_id, e.customer_id, e.url, e.secret, d.body, d.state,
                d.attempts, e.failing_since,
                (e.deleted_at IS NOT NULL OR e.disabled_at IS NOT NULL) AS endpoint_gone
           FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
          WHERE d.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Ends a pending delivery without another attempt, saying why (its endpoint was deleted or
/// disabled, or its job gave up).
pub async fn abandon(pool: &PgPool, id: Uuid, why: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_deliveries
            SET state = 'failed', last_error = $2, finished_at = now()
          WHERE id = $1 AND state = 'pending'",
    )
    .bind(id)
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// How one attempt went.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

/// What the attempt does to the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    /// Failed; another attempt follows after this pause (the schedule's, jittered once).
    Retry(Duration),
    /// Failed for good: the schedule is over, or the destination can never be delivered to.
    Failed,
}

/// What [`record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// This attempt disabled the endpoint (it had failed for `disable_after`): its owner is
    /// to be told.
    pub disabled: bool,
    /// The attempt's outcome was recorded (false: another worker had already recorded this
    /// attempt number; nothing changed).
    pub recorded: bool,
}

/// Records attempt `due.attempts + 1` and its verdict, and the endpoint's failing run, in one
/// transaction. An endpoint whose failing run reaches `disable_after` is disabled here, with
/// its pending deliveries failed, and `email_owner` enqueues the owner's email in the same
/// transaction.
pub async fn record(
    pool: &PgPool,
    due: &Due,
    attempt: &Attempt,
    verdict: Verdict,
    disable_after: Duration,
) -> Result<Recorded, PgError> {
    let number = due.attempts + 1;
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO webhook_attempts
                (delivery_id, attempt, started_at, duration_ms, status_code, error)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(due.id)
    .bind(number)
    .bind(attempt.started_at)
    .bind(i32::try_from(attempt.duration.as_millis()).unwrap_or(i32::MAX))
    .bind(attempt.status_code.map(i32::from))
    .bind(attempt.error.as_deref())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Recorded {
            disabled: false,
            recorded: false,
        });
    }
    let state = match verdict {
        Verdict::Succeeded => "succeeded",
        Verdict::Retry(_) => "pending",
        Verdict::Failed => "failed",
    };
    // Only from the state this attempt started in: a delivery failed meanwhile (its endpoint
    // disabled) stays failed, whatever this attempt's answer.
    let moved = sqlx::query(
        "UPDATE webhook_deliveries
            SET attempts = $2, state = $3, last_error = $4,
                finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END
          WHERE id = $1 AND state = 'pending' AND attempts = $2 - 1",
    )
    .bind(due.id)
    .bind(number)
    .bind(state)
    .bind(attempt.error.as_deref())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        // Recorded as an attempt, but the delivery had moved on: nothing else changes.
        tx.commit().await?;
        return Ok(Recorded {
            disabled: false,
            recorded: false,
        });
    }
    let mut disabled = false;
    if verdict == Verdict::Succeeded {
        sqlx::query(
            "UPDATE webhook_endpoints
                SET failing_since = NULL, last_success_at = greatest(last_success_at, $2)
              WHERE id = $1",
        )
        .bind(due.endpoint_id)
        .bind(attempt.started_at)
        .execute(&mut *tx)
        .await?;
    } else {
        let reason = format!(
            "every delivery attempt failed for {} (the last: {})",
            humantime_like(disable_after),
            attempt.error.as_deref().unwrap_or("no answer")
        );
        // The failing run starts with this attempt unless one is going on: started, and the
        // last failure no longer ago than disable_after (a quiet week between two failures is
        // not a week of failing). A failure of an attempt that started before the last
        // success says nothing about now: it neither starts a run nor disables. The row is
        // locked from here to commit, so two workers' attempts to one endpoint queue here.
        let (failing_since, already_disabled): (Option<DateTime<Utc>>, bool) = sqlx::query_as(
            "UPDATE webhook_endpoints
                SET failing_since = CASE
                        WHEN last_success_at IS NOT NULL AND last_success_at > $2 THEN failing_since
                        WHEN failing_since IS NULL
                          OR last_failure_at < $2 - make_interval(secs => $3::float8 / 1000) THEN $2
                        ELSE failing_since END,
                    last_failure_at = greatest(last_failure_at, $2)
              WHERE id = $1 RETURNING failing_since, disabled_at IS NOT NULL",
        )
        .bind(due.endpoint_id)
        .bind(attempt.started_at)
        .bind(keel_config::millis(disable_after) as f64)
        .fetch_one(&mut *tx)
        .await?;
        let failing_for = failing_since
            .and_then(|since| (Utc::now() - since).to_std().ok())
            .unwrap_or_default();
        if !already_disabled && failing_since.is_some() && failing_for >= disable_after {
            disabled = sqlx::query(
                "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $2
                  WHERE id = $1 AND disabled_at IS NULL",
            )
            .bind(due.endpoint_id)
            .bind(&reason)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
        }
        if disabled {
            // Nothing more goes to it: its pending deliveries end now (their jobs find them
            // finished), and its owner is told, in this transaction.
            sqlx::query(
                "UPDATE webhook_deliveries
                    SET state = 'failed', last_error = 'endpoint disabled', finished_at = now()
                  WHERE endpoint_id = $1 AND state = 'pending'",
            )
            .bind(due.endpoint_id)
            .execute(&mut *tx)
            .await?;
            crate::email::enqueue_endpoint_disabled(&mut tx, due.endpoint_id).await?;
        }
    }
    tx.commit().await?;
    Ok(Recorded {
        disabled,
        recorded: true,
    })
}

/// `3600000 ms` as `1h`, for the reason an owner reads.
fn humantime_like(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{} ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// One attempt, as the deliveries API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
}

/// One delivery with its attempts, oldest attempt first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct DeliveryWithAttempts {
    pub id: Uuid,
    pub notification_id: Uuid,
    pub event_type: String,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[sqlx(json)]
    pub attempt_log: Vec<AttemptRow>,
}

/// An endpoint's latest `limit` deliveries, newest first, each with its attempts.
pub async fn history(
    pool: &PgPool,
    endpoint: Uuid,
    limit: i64,
) -> Result<Vec<DeliveryWithAttempts>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.id, d.notification_id, d.event_type, d.state, d.attempts, d.last_error,
                d.created_at, d.finished_at,
                coalesce((SELECT json_agg(json_build_object(
                                 'attempt', a.attempt, 'started_at', a.started_at,
                                 'duration_ms', a.duration_ms, 'status_code', a.status_code,
                                 'error', a.error) ORDER BY a.attempt)
                            FROM webhook_attempts a WHERE a.delivery_id = d.id),
                         '[]'::json) AS attempt_log
           FROM webhook_deliveries d
          WHERE d.endpoint_id = $1
          ORDER BY d.created_at DESC, d.id DESC
          LIMIT $2",
    )
    .bind(endpoint)
    .bind(limit)
    .fetch_all(pool)
    .await
}
