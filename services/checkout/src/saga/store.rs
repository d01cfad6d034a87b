//! The saga's persistence: the `sagas` row (where the saga is), the `saga_steps` log (what
//! happened, step by step) and the saga's job on the `saga` queue.
//!
//! Every state change of a saga happens in a transaction that first locks its row
//! ([`lock_state`]) and checks it is still in the state the step started from. That is what
//! makes a step safe to run twice: a second worker running the same step (a resumed saga
//! whose first worker is still alive) finds the state moved on and changes nothing.
//!
//! States, steps and outcomes are bound and decoded as their enums ([`super::state`]): no
//! state is spelled as a string in this SQL.

use std::time::Duration;

use keel_pg::PgError;
use keel_pg::jobs;
use keel_pg::millis;
use sqlx::PgConnection;
use uuid::Uuid;

use super::job::SagaJob;
use super::state::{Action, Compensation, SagaId, SagaState, StepOutcome};
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
    .bind(SagaState::Pending)
    .bind(payment_token)
    .bind(millis(config.deadline))
    .execute(&mut *conn)
    .await?;
    let job = SagaJob { saga_id: id }
        .to_new_job(config.max_attempts)
        .map_err(|e| PgError::Encode(e.to_string()))?;
    jobs::enqueue(conn, &job).await?;
    Ok(id)
}

/// A saga as a step sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SagaRow {
    pub id: Uuid,
    pub order_id: Uuid,
    pub state: SagaState,
    /// While COMPENSATING: the final order state compensation ends in.
    pub compensate_to: Option<OrderState>,
    /// While COMPENSATING: why (the stored text of a [`super::state::Reason`]).
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
    sqlx::query_scalar("SELECT state FROM sagas WHERE id = $1 FOR UPDATE")
        .bind(id.0)
        .fetch_optional(conn)
        .await
}

/// Moves saga `id` to `to`. Final states also forget the payment token, which is needed only
/// until authorization.
pub async fn set_state(
    conn: &mut PgConnection,
    id: SagaId,
    to: SagaState,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sagas SET state = $2,
                          payment_token = CASE WHEN $3 THEN NULL ELSE payment_token END,
                          updated_at = now()
          WHERE id = $1",
    )
    .bind(id.0)
    .bind(to)
    .bind(to.is_final())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves saga `id` to AUTHORIZED with billing's `payment_id`, which capture and void name.
pub async fn set_authorized(
    conn: &mut PgConnection,
    id: SagaId,
    payment_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sagas SET state = $2, payment_id = $3, updated_at = now() WHERE id = $1")
        .bind(id.0)
        .bind(SagaState::Authorized)
        .bind(payment_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Starts compensation as `c` decides: the saga is COMPENSATING until it ends in
/// `c.ends_in` (a final order state) for `c.reason`, voiding first as `c.void` says.
pub async fn begin_compensation(
    conn: &mut PgConnection,
    id: SagaId,
    c: &Compensation<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sagas SET state = $2, compensate_to = $3, reason = $4, void_needed = $5,
                          payment_id = COALESCE($6, payment_id), updated_at = now()
          WHERE id = $1",
    )
    .bind(id.0)
    .bind(SagaState::Compensating)
    .bind(c.ends_in)
    .bind(c.reason.as_str())
    .bind(c.void.needs_void())
    .bind(c.payment_id)
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

/// Appends a row to the saga's step log: `action` ended with `outcome`, because `detail`.
pub async fn log_step(
    conn: &mut PgConnection,
    id: SagaId,
    action: Action,
    outcome: StepOutcome,
    detail: &str,
) -> Result<(), sqlx::Error> {
    metrics::counter!("saga_steps_total", "step" => action.as_str(), "outcome" => outcome.as_str())
        .increment(1);
    sqlx::query("INSERT INTO saga_steps (saga_id, step, outcome, detail) VALUES ($1, $2, $3, $4)")
        .bind(id.0)
        .bind(action)
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
