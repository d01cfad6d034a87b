//! The saga's forward steps (P04): PENDING → reserve stock → RESERVED → authorize →
//! AUTHORIZED → capture → CONFIRMED, and where each failure hands over to compensation.
//!
//! Each step calls out (stock in the step's own transaction; billing before it) and then
//! commits its state change, the order's history and event, and its step-log entry in one
//! transaction that first re-checks the state it started from ([`Saga::begin_from`]): a step
//! another worker already took changes nothing. A billing failure that a retry may fix waits
//! ([`Saga::retry`]); one that it will not fix, or a declined card, starts compensation with a
//! [`Compensation`] that names where the order ends, why, and what must be voided.
//!
//! Must not break: the state change and its step-log entry commit together, and a step that
//! calls billing does so before it locks the saga row (a lock is never held across a call).

use std::time::Instant;

use keel_contracts::billing_v1::PaymentStatus;

use super::Saga;
use super::billing::{CallError, status_of};
use super::state::{
    Action, Compensation, Reason, SagaError, SagaId, SagaState, Step, StepOutcome, VoidPolicy,
};
use super::store::{self, SagaRow};
use crate::orders::{self, OrderId, OrderState};
use crate::stock::{self, Reserve};

/// A step-log entry written in the transaction of the state change it explains.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry<'a> {
    pub action: Action,
    pub outcome: StepOutcome,
    pub detail: &'a str,
}

impl Saga {
    /// PENDING: reserve every line (in SKU order), or reject the order out of stock.
    pub(super) async fn reserve(&self, saga: &SagaRow) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let order = OrderId(saga.order_id);
        let Some(mut tx) = self.begin_from(id, SagaState::Pending).await? else {
            return Ok(Step::Continue);
        };
        let lines = store::order_lines(&mut tx, saga.order_id).await?;
        match stock::reserve(&mut tx, saga.order_id, &lines).await? {
            outcome @ (Reserve::Reserved | Reserve::AlreadyReserved) => {
                store::set_state(&mut tx, id, SagaState::Reserved).await?;
                orders::store::change_state(&mut tx, order, OrderState::Reserved, None).await?;
                let detail = if outcome == Reserve::Reserved {
                    format!("{} lines reserved", lines.len())
                } else {
                    "already reserved by an earlier run".to_owned()
                };
                store::log_step(&mut tx, id, Action::Reserve, StepOutcome::Ok, &detail).await?;
                tx.commit().await?;
                Ok(Step::Continue)
            }
            Reserve::OutOfStock {
                sku,
                requested,
                available,
            } => {
                store::set_state(&mut tx, id, SagaState::Rejected).await?;
                let reason = Reason::OutOfStock.as_str();
                orders::store::change_state(&mut tx, order, OrderState::Rejected, Some(reason))
                    .await?;
                let detail = format!("{sku}: requested {requested}, available {available}");
                store::log_step(
                    &mut tx,
                    id,
                    Action::Reserve,
                    StepOutcome::OutOfStock,
                    &detail,
                )
                .await?;
                tx.commit().await?;
                Self::finished(saga, SagaState::Rejected);
                Ok(Step::Done)
            }
        }
    }

    /// RESERVED: authorize the order's total with billing, within the saga's deadline.
    pub(super) async fn authorize(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
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
                Action::Authorize.idempotency_key(id),
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
                return self.retry(id, Action::Authorize, &e, left, attempt).await;
            }
            Err(e @ CallError::Final { .. }) => {
                // Billing refused this request, but an earlier attempt (before a timeout)
                // may have reached it: void by order, which succeeds when there is nothing.
                let Some(mut tx) = self.begin_from(id, SagaState::Reserved).await? else {
                    return Ok(Step::Continue);
                };
                let compensation = Compensation {
                    ends_in: OrderState::PaymentFailed,
                    reason: Reason::PaymentError,
                    void: VoidPolicy::ByOrder,
                    payment_id: None,
                };
                store::begin_compensation(&mut tx, id, &compensation).await?;
                let detail = e.to_string();
                store::log_step(&mut tx, id, Action::Authorize, StepOutcome::Failed, &detail)
                    .await?;
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
                store::set_authorized(&mut tx, id, pid).await?;
                orders::store::change_state(
                    &mut tx,
                    OrderId(saga.order_id),
                    OrderState::Authorized,
                    None,
                )
                .await?;
                let detail = format!("payment {pid}");
                store::log_step(&mut tx, id, Action::Authorize, StepOutcome::Ok, &detail).await?;
            }
            PaymentStatus::Declined => {
                let code = if payment.decline_reason.is_empty() {
                    "declined"
                } else {
                    payment.decline_reason.as_str()
                };
                let compensation = Compensation {
                    ends_in: OrderState::PaymentDeclined,
                    reason: Reason::Declined(code),
                    // A declined card holds no money.
                    void: VoidPolicy::Skip,
                    payment_id: Some(pid),
                };
                store::begin_compensation(&mut tx, id, &compensation).await?;
                store::log_step(&mut tx, id, Action::Authorize, StepOutcome::Declined, code)
                    .await?;
            }
            other => {
                let compensation = Compensation {
                    ends_in: OrderState::PaymentFailed,
                    reason: Reason::PaymentError,
                    // Billing answered, and not with an authorization: nothing holds money.
                    void: VoidPolicy::Skip,
                    payment_id: Some(pid),
                };
                store::begin_compensation(&mut tx, id, &compensation).await?;
                let detail = format!("payment {pid} answered with status {other:?}");
                store::log_step(&mut tx, id, Action::Authorize, StepOutcome::Failed, &detail)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Step::Continue)
    }

    /// AUTHORIZED: capture the payment, then confirm; a capture that cannot happen voids it.
    pub(super) async fn capture(&self, saga: &SagaRow, attempt: i32) -> Result<Step, SagaError> {
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
            .capture(Action::Capture.idempotency_key(id), pid.clone(), remaining)
            .await;
        let (void, detail) = match result {
            Ok(p)
                if matches!(
                    status_of(&p),
                    PaymentStatus::CapturePending | PaymentStatus::Captured
                ) =>
            {
                let detail = format!("payment {pid} {:?}", status_of(&p));
                let entry = Entry {
                    action: Action::Capture,
                    outcome: StepOutcome::Ok,
                    detail: &detail,
                };
                return self.confirm(saga, SagaState::Authorized, None, entry).await;
            }
            Ok(p) => {
                let status = status_of(&p);
                // Already voided at billing: nothing left to release there.
                let void = if status == PaymentStatus::Voided {
                    VoidPolicy::Skip
                } else {
                    VoidPolicy::Payment
                };
                (
                    void,
                    format!("payment {pid} answered with status {status:?}"),
                )
            }
            Err(e @ CallError::Retryable { .. }) => {
                let left = remaining.saturating_sub(started.elapsed());
                return self.retry(id, Action::Capture, &e, left, attempt).await;
            }
            Err(e @ CallError::Final { .. }) => (VoidPolicy::Payment, e.to_string()),
        };
        let Some(mut tx) = self.begin_from(id, SagaState::Authorized).await? else {
            return Ok(Step::Continue);
        };
        let compensation = Compensation {
            ends_in: OrderState::PaymentFailed,
            reason: Reason::CaptureFailed,
            void,
            payment_id: None,
        };
        store::begin_compensation(&mut tx, id, &compensation).await?;
        store::log_step(&mut tx, id, Action::Capture, StepOutcome::Failed, &detail).await?;
        tx.commit().await?;
        Ok(Step::Continue)
    }

    /// Stock reserved → sold, order and saga CONFIRMED, in one transaction with `entry`, the
    /// log of what showed the payment captured.
    pub(super) async fn confirm(
        &self,
        saga: &SagaRow,
        from: SagaState,
        reason: Option<Reason<'_>>,
        entry: Entry<'_>,
    ) -> Result<Step, SagaError> {
        let id = SagaId(saga.id);
        let Some(mut tx) = self.begin_from(id, from).await? else {
            return Ok(Step::Continue);
        };
        store::log_step(&mut tx, id, entry.action, entry.outcome, entry.detail).await?;
        let sold = stock::commit(&mut tx, saga.order_id).await?;
        store::set_state(&mut tx, id, SagaState::Confirmed).await?;
        orders::store::change_state(
            &mut tx,
            OrderId(saga.order_id),
            OrderState::Confirmed,
            reason.map(|r| r.as_str()),
        )
        .await?;
        let detail = format!("{sold} reservations sold");
        store::log_step(&mut tx, id, Action::Confirm, StepOutcome::Ok, &detail).await?;
        tx.commit().await?;
        Self::finished(saga, SagaState::Confirmed);
        Ok(Step::Done)
    }
}
