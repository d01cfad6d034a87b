//! checkout's one HTTP error type: every failure a handler returns becomes an RFC 9457
//! `application/problem+json` document with a stable `type` slug (see `openapi.yaml`).
//!
//! Must not break: internal causes (SQL errors, pool state) are logged once, here, and never
//! reach the client; the client gets the slug, a title and a client-facing detail.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use keel_http::Problem;
use serde::Serialize;

/// One invalid field of a request: `{"field": "lines[0].sku", "message": "unknown SKU"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's path in the request body (`currency`, `lines[2].quantity`).
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a request failed. Not authentication: a request without a valid API key is answered
/// by the platform's extractor before a handler runs (`keel_service::api_keys::AuthRejection`,
/// the same 401 in every service).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 415: the body is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 400: the `Idempotency-Key` header is missing or unusable.
    #[error("idempotency key: {0}")]
    IdempotencyKey(&'static str),
    /// 400: the body is not JSON, or not a JSON object.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// 400: the body has members the API does not define; one entry per unknown member.
    #[error("unknown fields")]
    UnknownFields(Vec<FieldError>),
    /// 422: the body is JSON but breaks the rules; one entry per broken field.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 422: the idempotency key was used before with a different request.
    #[error("idempotency key reused with a different request")]
    IdempotencyMismatch,
    /// 409: another request with this idempotency key is still running.
    #[error("idempotency key in use")]
    IdempotencyInProgress,
    /// 404: no such order.
    #[error("order not found")]
    OrderNotFound,
    /// 503 or 500, depending on the cause.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Pg(#[from] keel_pg::PgError),
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::UnsupportedMediaType => Problem::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                .with_detail("send the body as application/json"),
            Self::IdempotencyKey(why) => Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-required",
                "Idempotency-Key header required",
            )
            .with_detail(*why),
            Self::MalformedJson(why) => {
                Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON")
                    .with_detail(why.clone())
            }
            Self::UnknownFields(errors) => {
                let names: Vec<String> = errors.iter().map(|e| format!("`{}`", e.field)).collect();
                Problem::new(StatusCode::BAD_REQUEST, "unknown-field", "Unknown field")
                    .with_detail(format!(
                        "the body has members the API does not define: {}",
                        names.join(", ")
                    ))
                    .with(
                        "errors",
                        serde_json::to_value(errors).unwrap_or(serde_json::Value::Null),
                    )
            }
            Self::Validation(errors) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-failed",
                "The request is invalid",
            )
            .with_detail("see `errors` for each invalid field")
            .with(
                "errors",
                serde_json::to_value(errors).unwrap_or(serde_json::Value::Null),
            ),
            Self::IdempotencyMismatch => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
            )
            .with_detail("this key was used with a different request; use a new key"),
            Self::IdempotencyInProgress => Problem::new(
                StatusCode::CONFLICT,
                "idempotency-in-progress",
                "Request in progress",
            )
            .with_detail("a request with this key is still being processed; retry shortly"),
            Self::OrderNotFound => {
                Problem::new(StatusCode::NOT_FOUND, "order-not-found", "Order not found")
            }
            Self::Database(e) => keel_service::problem::database(e),
            Self::Pg(keel_pg::PgError::Sqlx(e)) => keel_service::problem::database(e),
            Self::Pg(e) => {
                tracing::error!(error = %e, "request failed");
                Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let retry = matches!(self, Self::IdempotencyInProgress)
            || problem.status == StatusCode::SERVICE_UNAVAILABLE.as_u16();
        let mut response = problem.into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
