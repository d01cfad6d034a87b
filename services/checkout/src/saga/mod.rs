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
//! - every billing call carries the idempotency key `"{saga_id}:{step}"`
//!   ([`state::Action::idempotency_key`]), so repeating a call whose answer was lost returns
//!   the first answer instead of charging twice.
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
//!
//! The modules, by concern:
//! - [`state`]: the vocabulary — states, steps, outcomes, reasons, what to void — as enums and
//!   named structs stored through one mapping;
//! - [`job`]: the saga's job and its typed payload;
//! - `forward`: the steps that move the order on (reserve, authorize, capture, confirm);
//! - `compensate`: the steps that undo them (void, release), and the roll-forward;
//! - `retry`: what a transient failure and the deadline do, and the retry delay;
//! - [`store`]: the saga's SQL; [`billing`]: its gRPC client of billing.

pub mod billing;
mod compensate;
mod forward;
pub mod job;
mod retry;
pub mod state;
pub mod store;

use std::sync::Arc;

use keel_pg::jobs::{self, Job, Outcome, WorkerConfig};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::billing::Billing;
use self::state::{Action, StepOutcome};
use self::store::SagaRow;
use crate::config::SagaConfig;
use keel_events::{Currency, Money};

pub use self::job::{SAGA_QUEUE, SagaJob};
pub use self::state::{SagaError, SagaId, SagaState, Step};

/// Most steps one job run takes before yielding (a full journey takes at most six); a bound
/// so a bug that loops between states cannot keep a worker slot forever.
const MAX_STEPS_PER_RUN: usize = 16;

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
        let id = match SagaJob::from_job(&job) {
            Ok(payload) => payload.saga_id,
            Err(e) => return Outcome::Fail(e.to_string()),
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
                        return Outcome::RetryAfter(self.retry_delay(job.attempts), e.to_string());
                    }
                }
            }
            Outcome::RetryAfter(
                self.retry_delay(job.attempts),
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
        match saga.state {
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
        action: Action,
        outcome: StepOutcome,
        detail: &str,
    ) -> Result<(), SagaError> {
        let mut conn = self.inner.pool.acquire().await?;
        store::log_step(&mut conn, id, action, outcome, detail).await?;
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
}
