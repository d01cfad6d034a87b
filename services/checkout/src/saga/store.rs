//! The saga's persistence: the `sagas` row (where the saga is), the `saga_steps` log (what
//! happened, step by step) and the saga's job on the `saga` queue.
//!
//! Every state change of a saga happens in a transaction that first locks its row
//! ([`lock_state`]) and checks it is still in the state the step started from. That is what
//! makes a step safe to run twice: a second worker running the same step (a resumed saga
//! whose first worker is still alive) finds the state moved on and changes nothing.

use std::time::Duration;

use keel_pg::PgError;
use keel_pg::jobs::{self, NewJob};
use keel_pg::millis;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{SAGA_QUEUE, SagaId, SagaState};
use crate::config::SagaConfig;
use crate::orders::{OrderId, OrderState};

/// Creates the saga of order `order_id` (state PENDING, deadline `config.deadline` from now)
/// and enqueues its job. The job's id is the saga's id: one job per saga, and operators find
/// one from the other.
pub async fn create(
    conn: &mut PgConnection,
    order_id: OrderId,
    payment_token: &str,
    config: &SagaConfig,
) -> Result<SagaId, PgError> {
    let id = SagaId(Uuid::now_v7());
    sqlx::query(
        "INSERT INTO sagas (id, order_id, state, payment_token, deadline)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8 / 1000))",
    )
    .bind(id.0)
    .bind(order_id.0)
    .bind(SagaState::Pending.as_str())
    .bind(payment_token)
    .bind(millis(config.deadline))
    .execute(&mut *conn)
    .await?;
    jobs::enqueue(
        conn,
        &NewJob {
            queue: SAGA_QUEUE,
            payload: serde_json::json!({ "saga_id": id.0 }),
            max_attempts: config.max_attempts,
            delay: Duration::ZERO,
            id: Some(id.0),
        },
    )
    .await?;
    Ok(id)
}

/// A saga as a step sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SagaRow {
    pub id: Uuid,
    pub order_id: Uuid,
    pub state: String,
    pub compensate_to: Option<String>,
    pub reason: Option<String>,
    pub payment_token: Option<String>,
    pub payment_id: Option<String>,
    pub void_needed: bool,
    pub voided: bool,
    /// Milliseconds left until the saga's deadline (0 once it passed), by the database clock.
    pub remaining_ms: i64,
    pub total_minor: i64,
    pub currency: String,
}

impl SagaRow {
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.remaining_ms).unwrap_or(0))
    }
}

/// Loads saga `id` (no lock: the step that acts on it locks and re-checks).
pub async fn load(conn: &mut PgConnection, id: SagaId) -> Result<Option<SagaRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.id, s.order_id, s.state, s.compensate_to, s.reason, s.payment_token,
                s.payment_id, s.void_needed, s.voided,
                GREATEST(0, (EXTRACT(EPOCH FROM (s.deadline - now())) * 1000))::bigint
                    AS remaining_ms,
                o.total_minor, o.currency
           FROM sagas s JOIN orders o ON o.id = s.order_id
          WHERE s.id = $1",
    )
    .bind(id.0)
    .fetch_optional(conn)
    .await
}

/// Locks saga `id`'s row and returns its state (`None`: no such saga). Hold the lock for the
/// rest of the transaction; lock order everywhere is saga, then stock rows by SKU, then order.
pub async fn lock_state(
    conn: &mut PgConnection,
    id: SagaId,
) -> Result<Option<SagaState>, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM sagas WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(conn)
            .await?;
    Ok(state.as_deref().and_then(SagaState::parse))
}

/// Moves saga `id` to `to`, recording `payment_id` if given. Final states also forget the
/// payment token, which is needed only until authorization.
pub async fn set_state(
    conn: &mut PgConnection,
    id: SagaId,
    to: SagaState,
    payment_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sagas SET state = $2, payment_id = COALESCE($3, payment_id),
                          payment_token = CASE WHEN $4 THEN NULL ELSE payment_token END,
                          updated_at = now()
          WHERE id = $1",
    )
    .bind(id.0)
    .bind(to.as_str())
    .bind(payment_id)
    .bind(to.is_final())
    .execute(conn)
    .await?;
    Ok(())
}

/// Starts compensation: the saga will end in `to` (a final order state) for `reason`, after
/// voiding the authorization if `void_needed`.
pub async fn begin_compensation(
    conn: &mut PgConnection,
    id: SagaId,
    to: OrderState,
    reason: &str,
    void_needed: bool,
    payment_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sagas SET state = $2, compensate_to = $3, reason = $4, void_needed = $5,
                          payment_id = COALESCE($6, payment_id), updated_at = now()
          WHERE id = $1",
    )
    .bind(id.0)
    .bind(SagaState::Compensating.as_str())
    .bind(to.as_str())
    .bind(reason)
    .bind(void_needed)
    .bind(payment_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records that the authorization is voided (or that there is nothing to void).
pub async fn mark_voided(conn: &mut PgConnection, id: SagaId) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sagas SET voided = true, updated_at = now() WHERE id = $1")
        .bind(id.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends a row to the saga's step log.
pub async fn log_step(
    conn: &mut PgConnection,
    id: SagaId,
    step: &str,
    outcome: &str,
    detail: Option<&str>,
) -> Result<(), sqlx::Error> {
    metrics::counter!("saga_steps_total", "step" => step.to_owned(), "outcome" => outcome.to_owned())
        .increment(1);
    sqlx::query("INSERT INTO saga_steps (saga_id, step, outcome, detail) VALUES ($1, $2, $3, $4)")
        .bind(id.0)
        .bind(step)
        .bind(outcome)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// The order's lines, as stock reservations need them.
pub async fn order_lines(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<crate::stock::Line>, sqlx::Error> {
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT sku, quantity FROM order_lines WHERE order_id = $1")
            .bind(order_id)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, quantity)| crate::stock::Line { sku, quantity })
        .collect())
}

/// Whether saga `id` ever attempted `step` (any outcome).
pub async fn attempted(
    conn: &mut PgConnection,
    id: SagaId,
    step: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM saga_steps WHERE saga_id = $1 AND step = $2)")
        .bind(id.0)
        .bind(step)
        .fetch_one(conn)
        .await
}
