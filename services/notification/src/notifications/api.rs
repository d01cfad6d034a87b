//! `GET /v1/notifications?order_id=<uuid>` → `{"notifications": [...]}`, oldest first.
//!
//! A missing or malformed `order_id` is a 400 problem (`invalid-query`); an order with no
//! notification (yet) is an empty list, not a 404: notifications arrive asynchronously, and a
//! client polling for one must be able to tell "not yet" from "broken request".
//!
//! Must not break: database errors are logged here once and answered 503/500 without detail.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_http::Problem;
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

/// State of the notifications API.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub pool: PgPool,
    /// Most notifications returned for one order (`api.list_limit`).
    pub list_limit: i64,
}

/// The API's routes.
pub fn routes(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/v1/notifications", get(list))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
}

async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let raw = query.ok().and_then(|Query(q)| q.order_id);
    let Some(order_id) = raw.as_deref().and_then(|s| Uuid::parse_str(s).ok()) else {
        return Problem::new(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query")
            .with_detail("`order_id` must be a UUID")
            .with(
                "errors",
                serde_json::json!([{"field": "order_id", "message": "must be a UUID"}]),
            )
            .into_response();
    };
    match super::for_order(&state.pool, order_id, state.list_limit).await {
        Ok(notifications) => {
            Json(serde_json::json!({ "notifications": notifications })).into_response()
        }
        Err(e @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)) => {
            tracing::warn!(error = %e, "database unavailable");
            Problem::for_status(StatusCode::SERVICE_UNAVAILABLE)
                .with_detail("the service is temporarily unavailable; retry later")
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "listing notifications failed");
            Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR).into_response()
        }
    }
}
