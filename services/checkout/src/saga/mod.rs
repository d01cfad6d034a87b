//! The order saga: an orchestrator with compensation (P04), run as jobs on keel-pg's
//! Postgres job queue (P08). Written by hand because the saga engine is the lesson.
//!
//! An order touches stock (here) and money (billing, over gRPC). No transaction spans both,
//! so the journey is a sequence of local steps, each committed on its own, with a
//! compensating step for each one that a later failure must undo:
//!
//! | saga state   | step                          | on success  | on failure                                        |
//! |--------------|-------------------------------|-------------|---------------------------------------------------|
//! | PENDING      | reserve stock (SKU order)     | RESERVED    | out of stock → REJECTED (`out_of_stock`)          |
//! | RESERVED     | `Authorize` (gRPC)            | AUTHORIZED  | declined → COMPENSATING → PAYMENT_DECLINED         |
//! |              |                               |             | final error / deadline → COMPENSATING → PAYMENT_FAILED |
//! | AUTHORIZED   | `Capture` (gRPC), then commit stock reserved → sold | CONFIRMED | final error / deadline → COMPENSATING (void) → PAYMENT_FAILED |
//! | COMPENSATING | `Void` if an authorization may exist, then release stock | the target final state | retried with backoff, no deadline, within `saga.max_attempts` |
//!
//! Retryable errors (billing down, timeouts) do not change the state: the job is rescheduled
//! with backoff ([`Outcome::RetryAfter`]) while the saga's deadline (`saga.deadline` from the
//! order's creation) holds; after it, the saga compensates and ends PAYMENT_FAILED
//! (`deadline_exceeded`). The state diagram is in `docs/journey-states.md`.
//!
//! What makes it safe to crash anywhere (a worker dies; its lease expires; another worker
//! runs the same job again from the persisted state):
//! - each step's state change, the order's history row and its outbox event commit in one
//!   transaction that first locks the saga row and re-checks the state the step started
//!   from ([`store::lock_state`]): a step that already happened is not applied again;
//! - stock changes are idempotent (`crate::stock`: a reservation row per order and SKU, whose
//!   state guards release and commit);
//! - every billing call carries the idempotency key `"{saga_id}:{step}"`, so repeating a call
//!   whose answer was lost returns the first answer instead of charging twice.
//!
//! `Void` names the payment when the saga knows its id, and otherwise (an Authorize that
//! timed out, so its answer and the payment id were lost) the order: billing then voids
//! whatever of that order still holds money, and voiding nothing is a success.
//!
//! Compensation is also forward-safe: if `Void` is refused because the capture went through
//! after all (a capture whose answer timed out), the saga asks billing, and if the payment
//! is captured it rolls *forward* to CONFIRMED rather than leaving a paid, failed order.
//!
//! Must not break: lock order (saga row, then stock rows by SKU, then the order row) and the
//! idempotency key format `"{saga_id}:{step}"`.

pub mod billing;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_contracts::billing_v1::PaymentStatus;
use keel_pg::jobs::{self, Job, Outcome, WorkerConfig};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use self::billing::{Billing, CallError, status_of};
use self::store::SagaRow;
use crate::config::SagaConfig;
use crate::orders::{self, OrderId, OrderState};
use crate::stock::{self, Reserve};
use keel_events::{Currency, Money};

/// The job queue saga jobs run on.
pub const SAGA_QUEUE: &str = "saga";

/// Most steps one job run takes before yielding (a full journey takes at most six); a bound
/// so a bug that loops between states cannot keep a worker slot forever.
const MAX_STEPS_PER_RUN: usize = 16;

/// A saga's id (also the id of its job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct SagaId(pub Uuid);

impl std::fmt::Display for SagaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaState {
    Pending,
    Reserved,
    Authorized,
    /// Undoing what was done (void, release) before ending in `compensate_to`.
    Compensating,
    Confirmed,
    Rejected,
    PaymentDeclined,
    PaymentFailed,
}

impl SagaState {
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Reserved,
        Self::Authorized,
        Self::Compensating,
        Self::Confirmed,
        Self::Rejected,
        Self::PaymentDeclined,
        Self::PaymentFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Reserved => "RESERVED",
            Self::Authorized => "AUTHORIZED",
            Self::Compensating => "COMPENSATING",
            Self::Confirmed => "CONFIRMED",
            Self::Rejected => "REJECTED",
            Self::PaymentDeclined => "PAYMENT_DECLINED",
            Self::PaymentFailed => "PAYMENT_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Confirmed | Self::Rejected | Self::PaymentDeclined | Self::PaymentFailed
        )
    }

    /// The saga state that ends in order state `s` (for the final ones).
    fn ending_in(s: OrderState) -> Option<Self> {
        match s {
            OrderState::Confirmed => Some(Self::Confirmed),
            OrderState::Rejected => Some(Self::Rejected),
            OrderState::PaymentDeclined => Some(Self::PaymentDeclined),
            OrderState::PaymentFailed => Some(Self::PaymentFailed),
            _ => None,
        }
    }
}

/// Why a step could not run (the database, or a saga that does not exist). The job is
/// retried with backoff; nothing was half-done (the step's transaction rolled back).
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Pg(#[from] keel_pg::PgError),
    #[error("saga {0} not found")]
    NotFound(SagaId),
    #[error("saga {0} has an unknown state or target state")]
    Corrupt(SagaId),
}

/// What one step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Progress was made (or another worker made it): take the next step now.
    Continue,
    /// The saga is in a final state.
    Done,
    /// A transient failure: run the job again after this delay.
    Wait(Duration, String),
    /// A failure no retry will fix (billing refused a compensation): the job fails for an
    /// operator, the saga keeps its state and resumes from it when the job is retried.
    Stuck(String),
}

/// The saga orchestrator: cheap to clone, shared by the worker's tasks.
#[derive(Debug, Clone)]
pub struct Saga {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    billing: Billing,
    config: SagaConfig,
}

type Tx = Transaction<'static, Postgres>;

impl Saga {
    pub fn new(pool: PgPool, billing: Billing, config: SagaConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                billing,
                config,
            }),
        }
    }

    /// Runs saga jobs until `stop`, at most `saga.concurrency` at once, then lets the jobs in
    /// flight finish (the caller bounds that wait).
    pub async fn run_worker(self, worker: String, stop: CancellationToken) {
        let config = WorkerConfig {
            queue: SAGA_QUEUE.to_owned(),
            worker,
            concurrency: self.inner.config.concurrency,
            lease: self.inner.config.lease,
            poll_interval: self.inner.config.poll_interval,
        };
        let pool = self.inner.pool.clone();
        jobs::run_worker(pool, config, stop, move |job| {
            let saga = self.clone();
            async move { saga.handle(job).await }
        })
        .await;
    }

    /// The job handler: takes steps until the saga is final or must wait. Public so tests
    /// (and tools) can run a claimed job by hand, e.g. to simulate a worker that dies.
    pub async fn handle(&self, job: Job) -> Outcome {
        let Some(id) = job
            .payload
            .get("saga_id")
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::parse_str(s).ok())
            .map(SagaId)
        else {
            return Outcome::Fail("job payload has no saga_id".to_owned());
        };
        let span = tracing::info_span!("saga", saga_id = %id, attempt = job.attempts);
        async move {
            for _ in 0..MAX_STEPS_PER_RUN {
                match self.step(id, job.attempts).await {
                    Ok(Step::Continue) => {}
                    Ok(Step::Done) => return Outcome::Done,
                    Ok(Step::Wait(delay, why)) => return Outcome::RetryAfter(delay, why),
                    Ok(Step::Stuck(why)) => {
                        tracing::error!(reason = %why, "saga stuck: needs an operator");
                        return Outcome::Fail(why);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "saga step failed; will retry");
                        return Outcome::RetryAfter(self.backoff(job.attempts), e.to_string());
                    }
                }
            }
            Outcome::RetryAfter(
                self.backoff(job.attempts),
                "step budget of one run used up".to_owned(),
            )
        }
        .instrument(span)
        .await
    }

    /// Takes one step of saga `id` from its persisted state. `attempt` (the job's attempt
    /// number) scales the backoff of a retry.
    pub async fn step(&self, id: SagaId, attempt: i32) -> Result<Step, SagaError> {
        let saga = {
            let mut conn = self.inner.pool.acquire().await?;
            store::load(&mut conn, id)
                .await?
                .ok_or(SagaError::NotFound(id))?
        };
        match SagaState::parse(&saga.state).ok_or(SagaError::Corrupt(id))? {
            SagaState::Pending => self.reserve(&saga).await,
            SagaState::Reserved => self.authorize(&saga, attempt).await,
            SagaState::Authorized => self.capture(&saga, attempt).await,
            SagaState::Compensating => self.compensate(&saga, attempt).await,
            SagaState::Confirmed
            | SagaState::Rejected
            | SagaState::PaymentDeclined
            | SagaState::PaymentFailed => Ok(Step::Done),
        }
    }

    fn backoff(&self, attempt: i32) -> Duration {
        let c = &self.inner.config;
        jobs::backoff(attempt, c.retry_base, c.retry_max)
    }

    /// A transaction holding saga `id`'s row lock, if the saga is still in `from`. `None`:
    /// another worker moved it on; the caller returns [`Step::Continue`] and the next step
    /// starts from the new state.
    async fn begin_from(&self, id: SagaId, from: SagaState) -> Result<Option<Tx>, SagaError> {
        let mut tx = self.inner.pool.begin().await?;
        match store::lock_state(&mut tx, id).await? {
            Some(state) if state == from => Ok(Some(tx)),
            _ => Ok(None),
        }
    }

    /// Logs a step outcome outside any state change (retries).
    async fn log(
        &self,
        id: SagaId,
        step: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), SagaError> {
        let mut conn = self.inner.pool.acquire().await?;
        store::log_step(&mut conn, id, step, outcome, Some(detail)).await?;
        Ok(())
    }

    fn amount(saga: &SagaRow) -> Result<Money, SagaError> {
        let currency = Currency::parse(saga.currency.trim())
            .map_err(|_| SagaError::Corrupt(SagaId(saga.id)))?;
        Ok(Money {
            minor: saga.total_minor,
            currency,
        })
    }

    fn finished(saga: &SagaRow, state: SagaState) {
        metrics::counter!("sagas_finished_total", "state" => state.as_str()).increment(1);
        tracing::info!(order_id = %saga.order_id, state = state.as_str(), "saga finished");
    }

    // ---- PENDING: reserve stock -------------------------------------------------------

    async fn reserve(&self, saga: &SagaRow) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let order = OrderId(saga.order_id);
        let Some(mut tx) = self.begin_from(id, SagaState::Pending).await? else {
            return Ok(Step::Continue);
        };
        let lines = store::order_lines(&mut tx, saga.order_id).await?;
        match stock::reserve(&mut tx, saga.order_id, &lines).await? {
            outcome @ (Reserve::Reserved | Reserve::AlreadyReserved) => {
                store::set_state(&mut tx, id, SagaState::Reserved, None).await?;
                orders::store::change_state(&mut tx, order, OrderState::Reserved, None).await?;
                let detail = if outcome == Reserve::Reserved {
                    format!("{} lines reserved", lines.len())
                } else {
                    "already reserved by an earlier run".to_owned()
                };
                store::log_step(&mut tx, id, "reserve", "ok", Some(&detail)).await?;
                tx.commit().await?;
                Ok(Step::Continue)
            }
            Reserve::OutOfStock {
                sku,
                requested,
                available,
            } => {
                store::set_state(&mut tx, id, SagaState::Rejected, None).await?;
                orders::store::change_state(
                    &mut tx,
                    order,
                    OrderState::Rejected,
                    Some("out_of_stock"),
                )
                .await?;
                let detail = format!("{sku}: requested {requested}, available {available}");
                store::log_step(&mut tx, id, "reserve", "out_of_stock", Some(&detail)).await?;
                tx.commit().await?;
                Self::finished(saga, SagaState::Rejected);
                Ok(Step::Done)
            }
        }
    }

    // ---- RESERVED: authorize ----------------------------------------------------------

    async fn authorize(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let remaining = saga.remaining();
        if remaining.is_zero() {
            return self.deadline_passed(saga, SagaState::Reserved).await;
        }
        let started = Instant::now();
        let result = self
            .inner
            .billing
            .authorize(
                format!("{id}:authorize"),
                saga.order_id.to_string(),
                Self::amount(saga)?,
                saga.payment_token.clone().unwrap_or_default(),
                remaining,
            )
            .await;
        let payment = match result {
            Ok(payment) => payment,
            Err(e @ CallError::Retryable { .. }) => {
                let left = remaining.saturating_sub(started.elapsed());
                return self.retry(id, "authorize", &e, left, attempt).await;
            }
            Err(e @ CallError::Final { .. }) => {
                // Billing refused this request, but an earlier attempt (before a timeout)
                // may have reached it: void by order, which succeeds when there is nothing.
                let Some(mut tx) = self.begin_from(id, SagaState::Reserved).await? else {
                    return Ok(Step::Continue);
                };
                store::begin_compensation(
                    &mut tx,
                    id,
                    OrderState::PaymentFailed,
                    "payment_error",
                    true,
                    None,
                )
                .await?;
                store::log_step(&mut tx, id, "authorize", "failed", Some(&e.to_string())).await?;
                tx.commit().await?;
                return Ok(Step::Continue);
            }
        };
        let Some(mut tx) = self.begin_from(id, SagaState::Reserved).await? else {
            return Ok(Step::Continue);
        };
        let pid = payment.payment_id.as_str();
        match status_of(&payment) {
            // A replayed Authorize may report a later state of the same payment.
            PaymentStatus::Authorized | PaymentStatus::CapturePending | PaymentStatus::Captured => {
                store::set_state(&mut tx, id, SagaState::Authorized, Some(pid)).await?;
                orders::store::change_state(
                    &mut tx,
                    OrderId(saga.order_id),
                    OrderState::Authorized,
                    None,
                )
                .await?;
                store::log_step(
                    &mut tx,
                    id,
                    "authorize",
                    "ok",
                    Some(&format!("payment {pid}")),
                )
                .await?;
            }
            PaymentStatus::Declined => {
                let reason = if payment.decline_reason.is_empty() {
                    "declined"
                } else {
                    payment.decline_reason.as_str()
                };
                store::begin_compensation(
                    &mut tx,
                    id,
                    OrderState::PaymentDeclined,
                    reason,
                    false,
                    Some(pid),
                )
                .await?;
                store::log_step(&mut tx, id, "authorize", "declined", Some(reason)).await?;
            }
            other => {
                store::begin_compensation(
                    &mut tx,
                    id,
                    OrderState::PaymentFailed,
                    "payment_error",
                    false,
                    Some(pid),
                )
                .await?;
                let detail = format!("payment {pid} answered with status {other:?}");
                store::log_step(&mut tx, id, "authorize", "failed", Some(&detail)).await?;
            }
        }
        tx.commit().await?;
        Ok(Step::Continue)
    }

    // ---- AUTHORIZED: capture, then confirm --------------------------------------------

    async fn capture(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let remaining = saga.remaining();
        if remaining.is_zero() {
            return self.deadline_passed(saga, SagaState::Authorized).await;
        }
        let started = Instant::now();
        let pid = saga.payment_id.clone().unwrap_or_default();
        let result = self
            .inner
            .billing
            .capture(format!("{id}:capture"), pid.clone(), remaining)
            .await;
        let (void_needed, detail) = match result {
            Ok(p)
                if matches!(
                    status_of(&p),
                    PaymentStatus::CapturePending | PaymentStatus::Captured
                ) =>
            {
                let detail = format!("payment {pid} {:?}", status_of(&p));
                return self
                    .confirm(
                        saga,
                        SagaState::Authorized,
                        None,
                        ("capture", "ok", &detail),
                    )
                    .await;
            }
            Ok(p) => (
                status_of(&p) != PaymentStatus::Voided,
                format!("payment {pid} answered with status {:?}", status_of(&p)),
            ),
            Err(e @ CallError::Retryable { .. }) => {
                let left = remaining.saturating_sub(started.elapsed());
                return self.retry(id, "capture", &e, left, attempt).await;
            }
            Err(e @ CallError::Final { .. }) => (true, e.to_string()),
        };
        let Some(mut tx) = self.begin_from(id, SagaState::Authorized).await? else {
            return Ok(Step::Continue);
        };
        store::begin_compensation(
            &mut tx,
            id,
            OrderState::PaymentFailed,
            "capture_failed",
            void_needed,
            None,
        )
        .await?;
        store::log_step(&mut tx, id, "capture", "failed", Some(&detail)).await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }

    /// Stock reserved → sold, order and saga CONFIRMED, in one transaction.
    async fn confirm(
        &self,
        saga: &SagaRow,
        from: SagaState,
        reason: Option<&str>,
        (step, outcome, detail): (&str, &str, &str),
    ) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let Some(mut tx) = self.begin_from(id, from).await? else {
            return Ok(Step::Continue);
        };
        store::log_step(&mut tx, id, step, outcome, Some(detail)).await?;
        let sold = stock::commit(&mut tx, saga.order_id).await?;
        store::set_state(&mut tx, id, SagaState::Confirmed, None).await?;
        orders::store::change_state(
            &mut tx,
            OrderId(saga.order_id),
            OrderState::Confirmed,
            reason,
        )
        .await?;
        let detail = format!("{sold} reservations sold");
        store::log_step(&mut tx, id, "confirm", "ok", Some(&detail)).await?;
        tx.commit().await?;
        Self::finished(saga, SagaState::Confirmed);
        Ok(Step::Done)
    }

    // ---- retries and the deadline -----------------------------------------------------

    /// A retryable billing failure: log it and wait (never past the deadline), or, if the
    /// deadline has passed meanwhile, go on at once (the next step compensates).
    async fn retry(
        &self,
        id: SagaId,
        step: &str,
        error: &CallError,
        left: Duration,
        attempt: i32,
    ) -> Result<Step, SagaError> {
        self.log(id, step, "retry", &error.to_string()).await?;
        if left.is_zero() {
            return Ok(Step::Continue);
        }
        let delay = self.backoff(attempt).min(left);
        Ok(Step::Wait(delay, format!("{step}: {error}")))
    }

    /// The saga's deadline passed before payment completed: compensate, end PAYMENT_FAILED.
    async fn deadline_passed(&self, saga: &SagaRow, from: SagaState) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let Some(mut tx) = self.begin_from(id, from).await? else {
            return Ok(Step::Continue);
        };
        // After an Authorize whose answer never came, billing may hold an authorization
        // this saga has no id for: void by order (billing voids whatever of this order
        // still holds money; nothing is a success).
        let (step, void_needed) = match from {
            SagaState::Authorized => ("capture", true),
            // The step log records an Authorize only once its answer came back; a worker
            // that died inside the call left no trace, yet billing may have authorized. From
            // RESERVED an Authorize may always have started, so always void by order.
            SagaState::Reserved => ("authorize", true),
            _ => (
                "authorize",
                store::attempted(&mut tx, id, "authorize").await?,
            ),
        };
        store::begin_compensation(
            &mut tx,
            id,
            OrderState::PaymentFailed,
            "deadline_exceeded",
            void_needed,
            None,
        )
        .await?;
        store::log_step(
            &mut tx,
            id,
            step,
            "deadline_exceeded",
            Some("the saga deadline passed before the payment completed"),
        )
        .await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }

    // ---- COMPENSATING: void, then release ---------------------------------------------

    async fn compensate(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let target = saga
            .compensate_to
            .as_deref()
            .and_then(OrderState::parse)
            .filter(|s| s.is_final())
            .ok_or(SagaError::Corrupt(id))?;
        if saga.void_needed && !saga.voided {
            return self.void(saga, attempt).await;
        }
        let Some(mut tx) = self.begin_from(id, SagaState::Compensating).await? else {
            return Ok(Step::Continue);
        };
        let released = stock::release(&mut tx, saga.order_id).await?;
        let final_state = SagaState::ending_in(target).ok_or(SagaError::Corrupt(id))?;
        store::set_state(&mut tx, id, final_state, None).await?;
        orders::store::change_state(
            &mut tx,
            OrderId(saga.order_id),
            target,
            saga.reason.as_deref(),
        )
        .await?;
        let detail = format!("{released} reservations released");
        store::log_step(&mut tx, id, "release", "ok", Some(&detail)).await?;
        tx.commit().await?;
        Self::finished(saga, final_state);
        Ok(Step::Done)
    }

    async fn void(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let billing = &self.inner.billing;
        // Compensation has no deadline: it must finish. Each call still has its bound.
        let budget = billing.call_timeout();
        // No payment id: the Authorize answer was lost; billing voids by order instead.
        let pid = saga.payment_id.clone();
        let what = pid.as_deref().map_or_else(
            || format!("order {}", saga.order_id),
            |p| format!("payment {p}"),
        );
        let call = billing.void(
            format!("{id}:void"),
            pid.clone(),
            saga.order_id.to_string(),
            budget,
        );
        let status = match call.await {
            Ok(p) => status_of(&p),
            Err(CallError::Final {
                code: tonic::Code::NotFound,
                ..
            }) => {
                return self
                    .voided(id, "skipped", &format!("billing has no {what}"))
                    .await;
            }
            // Refused: most likely the capture went through after all. Ask billing.
            Err(CallError::Final {
                code: tonic::Code::FailedPrecondition,
                message,
            }) if pid.is_some() => match billing
                .get_payment(pid.clone().unwrap_or_default(), budget)
                .await
            {
                Ok(p) => {
                    tracing::info!(refusal = %message, "void refused; payment state checked");
                    status_of(&p)
                }
                Err(e @ CallError::Retryable { .. }) => {
                    self.log(id, "void", "retry", &e.to_string()).await?;
                    return Ok(Step::Wait(self.backoff(attempt), format!("void: {e}")));
                }
                Err(e) => return Ok(Step::Stuck(format!("void refused ({message}); {e}"))),
            },
            Err(e @ CallError::Final { .. }) => {
                self.log(id, "void", "failed", &e.to_string()).await?;
                return Ok(Step::Stuck(format!("void of {what} refused: {e}")));
            }
            Err(e @ CallError::Retryable { .. }) => {
                self.log(id, "void", "retry", &e.to_string()).await?;
                return Ok(Step::Wait(self.backoff(attempt), format!("void: {e}")));
            }
        };
        match status {
            PaymentStatus::Voided | PaymentStatus::Declined => {
                self.voided(id, "ok", &format!("{what} {status:?}")).await
            }
            // The capture happened: roll forward, the customer has paid.
            PaymentStatus::CapturePending | PaymentStatus::Captured => {
                let detail = format!("{what} is {status:?}; confirming instead");
                self.confirm(
                    saga,
                    SagaState::Compensating,
                    Some("captured_before_void"),
                    ("void", "captured", &detail),
                )
                .await
            }
            other => {
                let detail = format!("{what} is {other:?} after void");
                self.log(id, "void", "retry", &detail).await?;
                Ok(Step::Wait(self.backoff(attempt), detail))
            }
        }
    }

    async fn voided(&self, id: SagaId, outcome: &str, detail: &str) -> Result<Step, SagaError> {
        let Some(mut tx) = self.begin_from(id, SagaState::Compensating).await? else {
            return Ok(Step::Continue);
        };
        store::mark_voided(&mut tx, id).await?;
        store::log_step(&mut tx, id, "void", outcome, Some(detail)).await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saga_states_round_trip_and_end_in_order_states() {
        for s in SagaState::ALL {
            assert_eq!(SagaState::parse(s.as_str()), Some(s));
        }
        for s in OrderState::ALL {
            let saga = SagaState::ending_in(s);
            assert_eq!(saga.is_some(), s.is_final(), "{s}");
            if let Some(saga) = saga {
                assert_eq!(saga.as_str(), s.as_str());
                assert!(saga.is_final());
            }
        }
    }
}
