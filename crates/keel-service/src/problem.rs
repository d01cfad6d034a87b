//! What a failed database call looks like to an HTTP client: one mapping for every service's
//! `ApiError`, so no service answers an outage with a 500.
//!
//! A transient failure (`keel_pg::is_transient`: unreachable, restarting, pool exhausted,
//! serialization conflict) is a 503 `unavailable` the client may retry (services add
//! `Retry-After`); anything else is a 500 that says nothing of its cause. Either way the cause
//! is logged here, once, with the request's span.

use http::StatusCode;
use keel_http::Problem;

/// The problem document for a failed database call (module docs).
pub fn database(e: &sqlx::Error) -> Problem {
    if keel_pg::is_transient(e) {
        tracing::warn!(error = %e, "database unavailable");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        )
        .with_detail("the service is temporarily unavailable; retry later")
    } else {
        tracing::error!(error = %e, "database query failed");
        Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR)
    }
}
