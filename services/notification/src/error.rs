//! notification's one HTTP error type: every failure a handler returns becomes an RFC 9457
//! `application/problem+json` document with a stable `type` slug (the same shape and slugs as
//! checkout's, so a client handles both services' errors with one switch).
//!
//! Must not break: internal causes (SQL errors, pool state) are logged once, here, and never
//! reach the client; the client gets the slug, a title and a client-facing detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_http::Problem;
use serde::Serialize;

/// One invalid field of a request: `{"field": "order_id", "message": "must be a UUID"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's name in the query string or body.
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

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid-query`: the query string breaks the rules; one entry per broken field.
    #[error("invalid query")]
    InvalidQuery(Vec<FieldError>),
    /// 415 `unsupported-media-type`: the body is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 400 `malformed-json`: the body is not JSON of the expected shape (an unknown member
    /// included: it is refused, not ignored).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// 422 `validation-failed`: well-formed, but fields break the rules; one entry each.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 409 `too-many-endpoints`: the customer has `webhooks.max_endpoints_per_customer`.
    #[error("too many webhook endpoints")]
    TooManyEndpoints(i64),
    /// 404 `webhook-endpoint-not-found`: none with this id belongs to the caller (whether it
    /// exists for another customer is not told).
    #[error("webhook endpoint not found")]
    EndpointNotFound,
    /// 500 `internal`: something that is no client's fault and no database's (the cause is
    /// logged here, never returned).
    #[error("internal: {0}")]
    Internal(String),
    /// 503 `unavailable` for an outage (the client may retry), 500 otherwise.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::InvalidQuery(errors) => {
                let detail = errors
                    .iter()
                    .map(|e| format!("`{}` {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                Problem::new(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query")
                    .with_detail(detail)
                    .with(
                        "errors",
                        serde_json::to_value(errors).unwrap_or(serde_json::Value::Null),
                    )
            }
            Self::UnsupportedMediaType => Problem::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                .with_detail("send the body as application/json"),
            Self::MalformedJson(why) => {
                Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON")
                    .with_detail(why.clone())
            }
            Self::Validation(errors) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-failed",
                "Validation failed",
            )
            .with_detail(
                errors
                    .iter()
                    .map(|e| format!("`{}` {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
            .with(
                "errors",
                serde_json::to_value(errors).unwrap_or(serde_json::Value::Null),
            ),
            Self::TooManyEndpoints(n) => Problem::new(
                StatusCode::CONFLICT,
                "too-many-endpoints",
                "Too many webhook endpoints",
            )
            .with_detail(format!(
                "this customer has {n} endpoints, the most allowed; delete one first"
            )),
            Self::EndpointNotFound => Problem::new(
                StatusCode::NOT_FOUND,
                "webhook-endpoint-not-found",
                "Webhook endpoint not found",
            ),
            Self::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Self::Database(e) => keel_service::problem::database(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let retry = problem.status == StatusCode::SERVICE_UNAVAILABLE.as_u16();
        let mut response = problem.into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_outage_is_a_retryable_503_without_internal_detail() {
        let response = ApiError::Database(sqlx::Error::PoolTimedOut).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = body(response).await;
        assert_eq!(body["type"], "https://keel.dev/problems/unavailable");
        assert!(!body.to_string().contains("pool"), "{body}");
    }

    #[tokio::test]
    async fn any_other_database_error_is_a_500_that_says_nothing_of_its_cause() {
        let response = ApiError::Database(sqlx::Error::RowNotFound).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
        let body = body(response).await;
        assert_eq!(body["type"], "https://keel.dev/problems/internal");
        assert!(!body.to_string().to_lowercase().contains("row"), "{body}");
    }
}
