//! What a payment command can fail with, and how the failures below it (the ledger, the
//! database, the provider) are classified into it; [`super::grpc`] maps each to a gRPC code.
//!
//! The classification is the contract with checkout's saga, which retries only transient
//! failures: an overloaded or unreachable dependency is `Unavailable` (retry with the same
//! key), a provider that is too slow is `DeadlineExceeded`, a provider refusal is
//! `FailedPrecondition` or `InvalidArgument` (do not retry). Must not break: `Internal` never
//! carries internals to the caller; [`super::grpc`] logs them once and answers a bare status.

use crate::ledger::LedgerError;
use crate::psp::PspError;

/// What a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("payment not found")]
    NotFound,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or a broken database; details are logged, not returned.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<LedgerError> for PaymentError {
    fn from(e: LedgerError) -> Self {
        match e {
            // The pool could not give a connection in time: overload or a database outage,
            // both worth a retry.
            LedgerError::Db(sqlx::Error::PoolTimedOut) => {
                Self::Unavailable("database unavailable".to_owned())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for PaymentError {
    fn from(e: sqlx::Error) -> Self {
        LedgerError::Db(e).into()
    }
}

impl From<keel_pg::PgError> for PaymentError {
    fn from(e: keel_pg::PgError) -> Self {
        match e {
            keel_pg::PgError::Sqlx(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<PspError> for PaymentError {
    fn from(e: PspError) -> Self {
        match e {
            PspError::Declined { code } => {
                Self::FailedPrecondition(format!("declined by the provider: {code}"))
            }
            PspError::Conflict { .. } => Self::FailedPrecondition(
                "the payment provider refused the change in the authorization's state".to_owned(),
            ),
            PspError::NotFound => {
                Self::Internal("the provider does not know the authorization".to_owned())
            }
            PspError::Rejected { status } => Self::InvalidArgument(format!(
                "the payment provider rejected the request (HTTP {status})"
            )),
            PspError::Unavailable { .. } | PspError::CircuitOpen { .. } | PspError::Protocol(_) => {
                Self::Unavailable("the payment provider is unavailable".to_owned())
            }
            PspError::Timeout => {
                Self::DeadlineExceeded("the payment provider timed out".to_owned())
            }
            PspError::DeadlineExceeded => Self::DeadlineExceeded(
                "deadline exceeded waiting for the payment provider".to_owned(),
            ),
        }
    }
}

/// A command that cannot run in the payment's current state.
pub(super) fn wrong_state(operation: &str, status: crate::ledger::PaymentStatus) -> PaymentError {
    PaymentError::FailedPrecondition(format!(
        "cannot {operation} a payment in state {}",
        status.as_str()
    ))
}

/// The payment kept changing under the command (version races lost [`super::MAX_CONFLICTS`]
/// times): transient, the caller retries with the same key.
pub(super) fn busy() -> PaymentError {
    PaymentError::Unavailable("the payment is changing concurrently; retry".to_owned())
}
