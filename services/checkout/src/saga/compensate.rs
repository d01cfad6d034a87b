//! Compensation (P04): COMPENSATING → void at billing if the decision says so → release the
//! stock → the final state the decision named; or, if the payment turns out captured, roll
//! *forward* to CONFIRMED.
//!
//! `Void` names the payment when the saga knows its id, and otherwise the order
//! ([`VoidTarget`]): an Authorize whose answer was lost left the saga without the id, and
//! billing then voids whatever of that order still holds money (voiding nothing is a
//! success). A void refused because the capture went through after all (a capture whose
//! answer timed out) makes the saga ask billing; a captured payment confirms the order rather
//! than leaving it paid and failed.
//!
//! Compensation has no deadline — it must finish — but each call keeps its own bound, and a
//! refusal no retry can fix ([`Step::Stuck`]) fails the job for an operator. Must not break:
//! `voided` is recorded before the stock is released, and both only from COMPENSATING.

use keel_contracts::billing_v1::PaymentStatus;

use super::Saga;
use super::billing::{CallError, VoidTarget, status_of};
use super::forward::Entry;
use super::state::{Action, Reason, SagaError, SagaId, SagaState, Step, StepOutcome};
use super::store::{self, SagaRow};
use crate::orders::{self, OrderId};
use crate::stock;

impl Saga {
    /// COMPENSATING: void first if needed, then release the stock and end in the target state.
    pub(super) async fn compensate(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let target = saga
            .compensate_to
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
        store::set_state(&mut tx, id, final_state).await?;
        orders::store::change_state(
            &mut tx,
            OrderId(saga.order_id),
            target,
            saga.reason.as_deref(),
        )
        .await?;
        let detail = format!("{released} reservations released");
        store::log_step(&mut tx, id, Action::Release, StepOutcome::Ok, &detail).await?;
        tx.commit().await?;
        Self::finished(saga, final_state);
        Ok(Step::Done)
    }

    async fn void(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let billing = &self.inner.billing;
        // Compensation has no deadline: it must finish. Each call still has its bound.
        let budget = billing.call_timeout();
        let target = match &saga.payment_id {
            Some(p) => VoidTarget::Payment(p.clone()),
            None => VoidTarget::Order(saga.order_id.to_string()),
        };
        let what = match &target {
            VoidTarget::Payment(p) => format!("payment {p}"),
            VoidTarget::Order(o) => format!("order {o}"),
        };
        let call = billing.void(Action::Void.idempotency_key(id), target, budget);
        let status = match call.await {
            Ok(p) => status_of(&p),
            Err(CallError::Final {
                code: tonic::Code::NotFound,
                ..
            }) => {
                return self
                    .voided(id, StepOutcome::Skipped, &format!("billing has no {what}"))
                    .await;
            }
            // Refused: most likely the capture went through after all. Ask billing.
            Err(CallError::Final {
                code: tonic::Code::FailedPrecondition,
                message,
            }) if saga.payment_id.is_some() => {
                let pid = saga.payment_id.clone().unwrap_or_default();
                match billing.get_payment(pid, budget).await {
                    Ok(p) => {
                        tracing::info!(refusal = %message, "void refused; payment state checked");
                        status_of(&p)
                    }
                    Err(e @ CallError::Retryable { .. }) => {
                        self.log(id, Action::Void, StepOutcome::Retry, &e.to_string())
                            .await?;
                        let delay = self.retry_delay(attempt);
                        return Ok(Step::Wait(delay, format!("void: {e}")));
                    }
                    Err(e) => return Ok(Step::Stuck(format!("void refused ({message}); {e}"))),
                }
            }
            Err(e @ CallError::Final { .. }) => {
                self.log(id, Action::Void, StepOutcome::Failed, &e.to_string())
                    .await?;
                return Ok(Step::Stuck(format!("void of {what} refused: {e}")));
            }
            Err(e @ CallError::Retryable { .. }) => {
                self.log(id, Action::Void, StepOutcome::Retry, &e.to_string())
                    .await?;
                return Ok(Step::Wait(self.retry_delay(attempt), format!("void: {e}")));
            }
        };
        match status {
            PaymentStatus::Voided | PaymentStatus::Declined => {
                self.voided(id, StepOutcome::Ok, &format!("{what} {status:?}"))
                    .await
            }
            // The capture happened: roll forward, the customer has paid.
            PaymentStatus::CapturePending | PaymentStatus::Captured => {
                let detail = format!("{what} is {status:?}; confirming instead");
                let entry = Entry {
                    action: Action::Void,
                    outcome: StepOutcome::Captured,
                    detail: &detail,
                };
                self.confirm(
                    saga,
                    SagaState::Compensating,
                    Some(Reason::CapturedBeforeVoid),
                    entry,
                )
                .await
            }
            other => {
                let detail = format!("{what} is {other:?} after void");
                self.log(id, Action::Void, StepOutcome::Retry, &detail)
                    .await?;
                Ok(Step::Wait(self.retry_delay(attempt), detail))
            }
        }
    }

    /// Records that nothing at billing holds money any more (or never did).
    async fn voided(
        &self,
        id: SagaId,
        outcome: StepOutcome,
        detail: &str,
    ) -> Result<Step, SagaError> {
        let Some(mut tx) = self.begin_from(id, SagaState::Compensating).await? else {
            return Ok(Step::Continue);
        };
        store::mark_voided(&mut tx, id).await?;
        store::log_step(&mut tx, id, Action::Void, outcome, detail).await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }
}
