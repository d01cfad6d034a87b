//! What a transient failure and the saga's deadline do (P04 with P24's backoff).
//!
//! A retryable billing failure (billing down, a timeout) does not change the saga's state:
//! it is logged and the job is rescheduled after [`Saga::retry_delay`], never past the
//! deadline (`saga.deadline` from the order's creation). Once the deadline has passed, the
//! payment step compensates instead ([`Saga::deadline_passed`]) and the order ends
//! PAYMENT_FAILED. Compensation itself has no deadline: its retries are bounded by the job's
//! `saga.max_attempts`.
//!
//! Must not break: [`Saga::retry_delay`] is the one place the saga's retry delay is
//! computed, so the backoff policy changes in one line.

use std::time::Duration;

use keel_pg::jobs;

use super::Saga;
use super::billing::CallError;
use super::state::{
    Action, Compensation, Reason, SagaError, SagaId, SagaState, Step, StepOutcome, VoidPolicy,
};
use super::store::{self, SagaRow};
use crate::orders::OrderState;

impl Saga {
    /// The pause before the job's next run after attempt `attempt` failed: Keel's job backoff
    /// (exponential, capped at `saga.retry_max`, jittered).
    pub(super) fn retry_delay(&self, attempt: i32) -> Duration {
        let c = &self.inner.config;
        jobs::backoff(attempt, c.retry_base, c.retry_max)
    }

    /// A retryable billing failure of `action`: log it and wait (never past the deadline, of
    /// which `left` remains), or, if the deadline has passed meanwhile, go on at once (the
    /// next step compensates).
    pub(super) async fn retry(
        &self,
        id: SagaId,
        action: Action,
        error: &CallError,
        left: Duration,
        attempt: i32,
    ) -> Result<Step, SagaError> {
        self.log(id, action, StepOutcome::Retry, &error.to_string())
            .await?;
        if left.is_zero() {
            return Ok(Step::Continue);
        }
        let delay = self.retry_delay(attempt).min(left);
        Ok(Step::Wait(delay, format!("{}: {error}", action.as_str())))
    }

    /// The saga's deadline passed in `from` (RESERVED or AUTHORIZED) before the payment
    /// completed: compensate, end PAYMENT_FAILED.
    pub(super) async fn deadline_passed(
        &self,
        saga: &SagaRow,
        from: SagaState,
    ) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let Some(mut tx) = self.begin_from(id, from).await? else {
            return Ok(Step::Continue);
        };
        let (action, void) = match from {
            // Authorized: the saga has the payment's id.
            SagaState::Authorized => (Action::Capture, VoidPolicy::Payment),
            // The step log records an Authorize only once its answer came back; a worker that
            // died inside the call left no trace, yet billing may have authorized. Before
            // AUTHORIZED an Authorize may always have started, so void by order (billing voids
            // whatever of this order still holds money; nothing is a success).
            _ => (Action::Authorize, VoidPolicy::ByOrder),
        };
        let compensation = Compensation {
            ends_in: OrderState::PaymentFailed,
            reason: Reason::DeadlineExceeded,
            void,
            payment_id: None,
        };
        store::begin_compensation(&mut tx, id, &compensation).await?;
        store::log_step(
            &mut tx,
            id,
            action,
            StepOutcome::DeadlineExceeded,
            "the saga deadline passed before the payment completed",
        )
        .await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }
}
