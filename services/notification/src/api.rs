//! The HTTP API: `GET /v1/notifications?order_id=<uuid>` → `{"notifications": [...]}`, oldest
//! first, at most `api.list_limit`.
//!
//! A missing or malformed `order_id` is a 400 problem (`invalid-query`); an order with no
//! notification (yet) is an empty list, not a 404: notifications arrive asynchronously
//! (P03), and a client polling for one must be able to tell "not yet" from "broken request".
//!
//! Must not break: handlers return [`ApiError`]; it alone turns failures into problem
//! documents and logs their cause, once.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::customer_notifications::{Notification, store};
use crate::error::{ApiError, FieldError};

/// What the API's handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub pool: PgPool,
    /// Most notifications returned for one order (`api.list_limit`).
    pub list_limit: i64,
}

/// The API's routes, inside the Keel HTTP stack once handed to `Service::http`.
pub fn routes(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/v1/notifications", get(list))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct List {
    notifications: Vec<Notification>,
}

async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<List>, ApiError> {
    let raw = query.ok().and_then(|Query(q)| q.order_id);
    let order_id = raw
        .as_deref()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            ApiError::InvalidQuery(vec![FieldError::new("order_id", "must be a UUID")])
        })?;
    let notifications = store::for_order(&state.pool, order_id, state.list_limit).await?;
    Ok(Json(List { notifications }))
}
