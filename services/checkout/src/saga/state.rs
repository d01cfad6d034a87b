//! The saga's vocabulary (P04): where a saga is, which step it takes, how a step ended, why
//! it compensates and what compensation must void — each an enum or a struct with named
//! fields, stored through one mapping (`keel_pg::text_column!`).
//!
//! Named, not positional, because a saga's decisions are the lesson: a reader of
//! `Compensation { ends_in: PaymentFailed, reason: DeadlineExceeded, void: ByOrder, .. }` sees
//! what happens, where `(…, "deadline_exceeded", true, None)` made them look it up.
//!
//! Must not break: the texts (`as_str`) are stored in `sagas` and `saga_steps` and appear in
//! metrics; [`Action`] is also part of billing's idempotency key `"{saga_id}:{action}"`, so
//! renaming one would let a resumed saga charge twice.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::orders::OrderState;
use keel_pg::text_column;

/// A saga's id (also the id of its job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

text_column!(SagaState, "saga state");

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

    /// The stored text (the one mapping).
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
    pub fn ending_in(s: OrderState) -> Option<Self> {
        match s {
            OrderState::Confirmed => Some(Self::Confirmed),
            OrderState::Rejected => Some(Self::Rejected),
            OrderState::PaymentDeclined => Some(Self::PaymentDeclined),
            OrderState::PaymentFailed => Some(Self::PaymentFailed),
            _ => None,
        }
    }
}

/// A step of the saga, as its log (`saga_steps.step`), its metrics and billing's idempotency
/// keys name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Reserve,
    Authorize,
    Capture,
    Confirm,
    Void,
    Release,
}

text_column!(Action, "saga step");

impl Action {
    pub const ALL: [Self; 6] = [
        Self::Reserve,
        Self::Authorize,
        Self::Capture,
        Self::Confirm,
        Self::Void,
        Self::Release,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Confirm => "confirm",
            Self::Void => "void",
            Self::Release => "release",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The idempotency key of this step's billing call: `"{saga_id}:{action}"`. A re-run step
    /// (a retry, or a saga resumed after a crash) repeats the same key, and billing answers
    /// with the first call's result instead of charging twice (P13).
    pub fn idempotency_key(self, saga: SagaId) -> String {
        format!("{saga}:{}", self.as_str())
    }
}

/// How one step ended, as the step log (`saga_steps.outcome`) and the metrics record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepOutcome {
    Ok,
    /// A transient failure; the job runs again after a backoff.
    Retry,
    Failed,
    Declined,
    OutOfStock,
    DeadlineExceeded,
    /// Nothing to do (billing has no such payment to void).
    Skipped,
    /// A void found the payment captured: the saga confirms instead.
    Captured,
}

text_column!(StepOutcome, "saga step outcome");

impl StepOutcome {
    pub const ALL: [Self; 8] = [
        Self::Ok,
        Self::Retry,
        Self::Failed,
        Self::Declined,
        Self::OutOfStock,
        Self::DeadlineExceeded,
        Self::Skipped,
        Self::Captured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retry => "retry",
            Self::Failed => "failed",
            Self::Declined => "declined",
            Self::OutOfStock => "out_of_stock",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Skipped => "skipped",
            Self::Captured => "captured",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// Why an order ended where it did (the order's `reason`, in its event and history). Only
/// what the saga writes: the reason of a compensating saga is read back as stored text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason<'a> {
    /// Some line could not be reserved.
    OutOfStock,
    /// The card was declined; billing's decline code (`card_declined`, …).
    Declined(&'a str),
    /// billing refused the Authorize, or answered with a status the saga cannot act on.
    PaymentError,
    CaptureFailed,
    /// The saga's deadline passed before the payment completed.
    DeadlineExceeded,
    /// Compensation found the payment captured after all and confirmed the order.
    CapturedBeforeVoid,
}

impl<'a> Reason<'a> {
    pub fn as_str(&self) -> &'a str {
        match *self {
            Self::OutOfStock => "out_of_stock",
            Self::Declined(code) => code,
            Self::PaymentError => "payment_error",
            Self::CaptureFailed => "capture_failed",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::CapturedBeforeVoid => "captured_before_void",
        }
    }
}

/// What compensation must release at billing before it releases the stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoidPolicy {
    /// Nothing holds money: the card was declined, or billing answered without an
    /// authorization (or with one already voided).
    Skip,
    /// Void the authorization the saga recorded (it reached AUTHORIZED, so it has the id).
    Payment,
    /// Void whatever of the order still holds money: an Authorize may have reached billing
    /// but its answer, and so the payment id, was lost. Voiding nothing is a success.
    ByOrder,
}

impl VoidPolicy {
    /// Stored as `sagas.void_needed`: the void step names the payment when the saga knows
    /// its id, and the order otherwise ([`crate::saga::billing::VoidTarget`]).
    pub fn needs_void(self) -> bool {
        !matches!(self, Self::Skip)
    }
}

/// The decision to compensate: where the order ends, why, and what to void on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compensation<'a> {
    /// The final order state the saga ends in once compensation is done.
    pub ends_in: OrderState,
    pub reason: Reason<'a>,
    pub void: VoidPolicy,
    /// The payment billing answered with, if any: recorded for the void and for operators.
    pub payment_id: Option<&'a str>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_texts_round_trip() {
        for s in SagaState::ALL {
            assert_eq!(SagaState::parse(s.as_str()), Some(s));
        }
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        for o in StepOutcome::ALL {
            assert_eq!(StepOutcome::parse(o.as_str()), Some(o));
        }
    }

    #[test]
    fn final_saga_states_end_in_the_order_state_of_the_same_name() {
        for s in OrderState::ALL {
            let saga = SagaState::ending_in(s);
            assert_eq!(saga.is_some(), s.is_final(), "{s}");
            if let Some(saga) = saga {
                assert_eq!(saga.as_str(), s.as_str());
                assert!(saga.is_final());
            }
        }
    }

    #[test]
    fn idempotency_keys_are_saga_and_action() {
        let id = SagaId(Uuid::nil());
        assert_eq!(
            Action::Authorize.idempotency_key(id),
            "00000000-0000-0000-0000-000000000000:authorize"
        );
    }
}
