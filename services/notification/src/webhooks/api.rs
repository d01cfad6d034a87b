//! The webhook endpoints API on notification's port (8082), for the customer whose API key
//! makes the request (the platform's `keel_service::api_keys`, as checkout's orders API):
//!
//! - `POST /v1/webhook-endpoints` `{"url": ..., "event_types": [...]}` → 201 with the endpoint
//!   and its signing `secret`, shown this once;
//! - `GET /v1/webhook-endpoints` → the caller's endpoints (no secrets);
//! - `GET /v1/webhook-endpoints/{id}` → one, with `failing_since` and `disabled_at`;
//! - `DELETE /v1/webhook-endpoints/{id}` → 204; no more deliveries to it;
//! - `GET /v1/webhook-endpoints/{id}/deliveries?limit=` → its latest deliveries, each with
//!   every attempt (status or error, duration): what a customer debugging a receiver asks.
//!
//! Every failure is a problem document ([`ApiError`]); an endpoint of another customer is a
//! 404, exactly like one that does not exist.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use keel_http::client::EgressPolicy;
use keel_service::api_keys::ApiKey;
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::deliveries::{self, DeliveryWithAttempts};
use super::endpoints::{self, Endpoint, InsertError, RegisterBody, Registered};
use crate::error::{ApiError, FieldError};

/// What the webhook handlers share.
#[derive(Debug, Clone)]
pub struct WebhooksApi {
    pub pool: PgPool,
    /// The SSRF policy registrations are checked against (the deliveries' own).
    pub policy: EgressPolicy,
    pub allow_http: bool,
    pub max_endpoints: i64,
}

impl FromRef<WebhooksApi> for PgPool {
    fn from_ref(state: &WebhooksApi) -> Self {
        state.pool.clone()
    }
}

/// Most deliveries one `…/deliveries` answer lists.
const MAX_DELIVERIES_LISTED: i64 = 100;

pub fn routes(state: WebhooksApi) -> Router {
    Router::new()
        .route("/v1/webhook-endpoints", get(list).post(register))
        .route("/v1/webhook-endpoints/{id}", get(show).delete(remove))
        .route("/v1/webhook-endpoints/{id}/deliveries", get(history))
        .with_state(state)
}

async fn register(
    State(state): State<WebhooksApi>,
    ApiKey(caller): ApiKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    if !keel_http::idempotency::is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body: RegisterBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let new = body
        .validate(state.allow_http)
        .map_err(ApiError::Validation)?;
    new.check_destination(&state.policy)
        .await
        .map_err(|e| ApiError::Validation(vec![e]))?;
    let secret = keel_webhooks::new_secret()
        .map_err(|e| ApiError::Internal(format!("no randomness for a webhook secret: {e}")))?;
    let customer = caller.customer.as_str();
    let endpoint = endpoints::insert(&state.pool, customer, &new, &secret, state.max_endpoints)
        .await
        .map_err(|e| match e {
            InsertError::TooMany(n) => ApiError::TooManyEndpoints(n),
            InsertError::Database(e) => ApiError::Database(e),
        })?;
    tracing::info!(endpoint_id = %endpoint.id, key_id = %caller.key_id, "webhook endpoint registered");
    Ok((StatusCode::CREATED, Json(Registered { endpoint, secret })))
}

#[derive(Debug, serde::Serialize)]
struct EndpointList {
    endpoints: Vec<Endpoint>,
}

async fn list(
    State(state): State<WebhooksApi>,
    ApiKey(caller): ApiKey,
) -> Result<Json<EndpointList>, ApiError> {
    let endpoints =
        endpoints::list(&state.pool, caller.customer.as_str(), state.max_endpoints).await?;
    Ok(Json(EndpointList { endpoints }))
}

fn endpoint_id(raw: &str) -> Result<Uuid, ApiError> {
    // Not a UUID: no endpoint can have that id, so the same 404 as an unknown one.
    Uuid::parse_str(raw).map_err(|_| ApiError::EndpointNotFound)
}

async fn show(
    State(state): State<WebhooksApi>,
    ApiKey(caller): ApiKey,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    endpoints::get(&state.pool, caller.customer.as_str(), endpoint_id(&id)?)
        .await?
        .map(Json)
        .ok_or(ApiError::EndpointNotFound)
}

async fn remove(
    State(state): State<WebhooksApi>,
    ApiKey(caller): ApiKey,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if endpoints::delete(&state.pool, caller.customer.as_str(), endpoint_id(&id)?).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::EndpointNotFound)
    }
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    limit: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
struct History {
    deliveries: Vec<DeliveryWithAttempts>,
}

async fn history(
    State(state): State<WebhooksApi>,
    ApiKey(caller): ApiKey,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    let limit = match query {
        Ok(Query(HistoryQuery { limit: None })) => 20,
        Ok(Query(HistoryQuery { limit: Some(n) })) if (1..=MAX_DELIVERIES_LISTED).contains(&n) => n,
        _ => {
            return Err(ApiError::InvalidQuery(vec![FieldError::new(
                "limit",
                "must be 1 to 100",
            )]));
        }
    };
    let id = endpoint_id(&id)?;
    // Through the owner check first: another customer's endpoint is a 404.
    if endpoints::get(&state.pool, caller.customer.as_str(), id)
        .await?
        .is_none()
    {
        return Err(ApiError::EndpointNotFound);
    }
    let deliveries = deliveries::history(&state.pool, id, limit).await?;
    Ok(Json(History { deliveries }))
}
