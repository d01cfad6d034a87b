//! The webhook admin routes, for the replay demo and for tests (P32): list what was sent with
//! every attempt, and redeliver one — the same id and body with a fresh timestamp and
//! signature, the duplicate a receiver must absorb.
//!
//! Unauthenticated, like every psp-sim admin route: they are served only on the admin listener
//! (`[admin]`, loopback by default), never on the card API's. Must not break: a listing is bounded
//! ([`MAX_LIST_LIMIT`]) however many webhooks are kept.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{WebhookRecord, Webhooks};
use crate::error::ApiError;

/// Webhooks listed when the query names no `limit`.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Most webhooks one listing returns: a response stays small however many are kept.
const MAX_LIST_LIMIT: usize = 1_000;

/// `GET /admin/webhooks[?authorization_id=..&limit=..]` (newest first, default 100, at most
/// 1000) and `POST /admin/webhooks/{id}/redeliver`.
pub fn admin_routes(webhooks: Arc<Webhooks>) -> Router {
    Router::new()
        .route("/admin/webhooks", get(list))
        .route("/admin/webhooks/{webhook_id}/redeliver", post(redeliver))
        .with_state(webhooks)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    authorization_id: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct WebhookList {
    webhooks: Vec<WebhookRecord>,
}

async fn list(
    State(webhooks): State<Arc<Webhooks>>,
    Query(q): Query<ListQuery>,
) -> Json<WebhookList> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT);
    Json(WebhookList {
        webhooks: webhooks.list(q.authorization_id.as_deref(), limit),
    })
}

async fn redeliver(
    State(webhooks): State<Arc<Webhooks>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let record = webhooks.redeliver(&id)?;
    tracing::info!(webhook_id = %id, delivery = record.deliveries, "webhook redelivery queued");
    Ok((StatusCode::ACCEPTED, Json(record)))
}
