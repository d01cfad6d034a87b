//! psp-sim's one HTTP error type: everything a client of the simulator can be told went
//! wrong, each with a stable problem `type` (RFC 9457, [`keel_http::Problem`]).
//!
//! The split a client (billing) must be able to rely on, and so the thing not to break:
//! 4xx answers are final for that request (a retry with the same idempotency key gets the
//! same answer back), 5xx answers are retryable (the key is released, a retry runs again).
//! [`ApiError::is_retryable`] is what the idempotency store uses to tell them apart.
//!
//! It sits low in the module graph (see [`crate::model`]): it imports only the values it
//! speaks of, never a handler, so every other module can return it.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use keel_http::Problem;
use serde::Serialize;
use serde_json::json;

use crate::model::{DeclineCode, Status};

/// One field of a request that failed validation.
#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Every error psp-sim answers with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A mutating call came without `Idempotency-Key` (or with an unusable one).
    #[error("idempotency key missing or malformed")]
    IdempotencyKeyInvalid(&'static str),
    /// The key was used before with a different request (P13: never guess which one to run).
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// The first request with this key is still running.
    #[error("idempotency key in use by a request in progress")]
    IdempotencyKeyInUse,
    /// The body parsed but a field is out of its domain.
    #[error("invalid request")]
    InvalidRequest(Vec<FieldError>),
    /// The card was declined (the `tok_decline` / `tok_insufficient_funds` tokens).
    #[error("card declined")]
    CardDeclined(DeclineCode),
    #[error("not found")]
    NotFound,
    /// The authorization is not in a state that allows `action`.
    #[error("authorization cannot be {action} in state {status:?}")]
    InvalidState {
        action: &'static str,
        status: Status,
    },
    /// A simulated provider outage (`tok_flaky`, the `error_rate` knob).
    #[error("provider unavailable")]
    Unavailable,
    /// `tok_timeout` held the request for `faults.timeout_hold` and gives up.
    #[error("provider timed out")]
    Timeout,
    /// The webhook queue is full: capture later.
    #[error("webhook queue full")]
    Busy,
    /// The simulator is stopping; held requests are let go with this.
    #[error("shutting down")]
    ShuttingDown,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::IdempotencyKeyInvalid(_) | Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyKeyInUse | Self::InvalidState { .. } => StatusCode::CONFLICT,
            Self::CardDeclined(_) => StatusCode::PAYMENT_REQUIRED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unavailable | Self::Busy | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether a retry with the same idempotency key should run the request again.
    pub fn is_retryable(&self) -> bool {
        self.status().is_server_error()
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        match self {
            Self::IdempotencyKeyInvalid(why) => Problem::new(
                status,
                "idempotency-key-required",
                "Idempotency-Key required",
            )
            .with_detail(*why),
            Self::IdempotencyKeyReused => Problem::new(
                status,
                "idempotency-key-reused",
                "Idempotency-Key reused with a different request",
            )
            .with_detail("use a new key for a new request"),
            Self::IdempotencyKeyInUse => Problem::new(
                status,
                "idempotency-key-in-use",
                "A request with this Idempotency-Key is in progress",
            )
            .with_detail("retry later with the same key to get its answer"),
            Self::InvalidRequest(errors) => {
                Problem::new(status, "invalid-request", "Invalid request")
                    .with("errors", json!(errors))
            }
            Self::CardDeclined(code) => Problem::new(status, "card-declined", "Card declined")
                .with("decline_code", json!(code)),
            Self::NotFound => Problem::for_status(status),
            Self::InvalidState {
                action,
                status: current,
            } => Problem::new(
                status,
                "invalid-state",
                "Authorization is in the wrong state",
            )
            .with_detail(format!("cannot be {action}"))
            .with("status", json!(current)),
            Self::Unavailable => Problem::new(
                status,
                "provider-unavailable",
                "Payment provider unavailable",
            ),
            Self::Timeout => Problem::new(status, "provider-timeout", "Payment provider timed out"),
            Self::Busy => Problem::new(status, "provider-busy", "Payment provider busy")
                .with_detail("too many captures pending; retry later"),
            Self::ShuttingDown => {
                Problem::new(status, "shutting-down", "Payment provider restarting")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}
