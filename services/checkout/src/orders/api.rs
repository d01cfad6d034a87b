//! The orders API handlers.
//!
//! `POST /v1/orders` with an `Idempotency-Key` (P13), in one transaction (keel-pg's
//! one-transaction idempotency mode):
//!
//! 1. `idempotency::begin` inserts the key. A concurrent request with the same key blocks on
//!    the key's primary key until the first commits, then replays its answer; after
//!    `orders.idempotency_wait` it gets 409 instead.
//! 2. The order is priced against the catalogue (422 with per-field errors, nothing written).
//! 3. Order, lines, history, saga, saga job, outbox event; then `idempotency::complete`
//!    stores the answer; commit. Any error before the commit rolls everything back, key
//!    included, so a retry with the same key starts afresh.
//!
//! Both routes take an [`ApiKey`] caller (the platform's extractor, `keel_service::api_keys`):
//! a request without a valid API key is a 401 before its body is read. The order is placed for the key's customer,
//! and `GET` shows an order only to that customer (another customer's order is the same 404 as
//! a nonexistent one).
//!
//! An idempotency key's scope is the route and the customer ([`idempotency_scope`]): two
//! customers who happen to pick the same key never see each other's answers, and one customer
//! retrying with another of its API keys (after a rotation) still gets its stored answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use keel_events::CustomerId;
use keel_http::idempotency::KeyError;
use keel_pg::idempotency::{self, Begin, Timing};
use sqlx::PgPool;
use uuid::Uuid;

use super::OrderId;
use super::request::{self, Limits};
use super::store::{self, NewOrder};
use crate::api_keys::{ApiKey, Authenticated};
use crate::config::{OrdersConfig, SagaConfig};
use crate::error::ApiError;
use crate::routes::Routes;
use crate::{catalogue, saga};

/// The idempotency scope of order placement for `customer`: per customer, so one customer's
/// key never replays (or blocks, or mismatches) another's request.
pub fn idempotency_scope(customer: &CustomerId) -> String {
    // The route part is fixed, so distinct customer ids always give distinct scopes.
    format!("POST /v1/orders customer={customer}")
}

/// What the handlers need.
#[derive(Debug, Clone)]
pub struct OrdersState {
    pub pool: PgPool,
    pub orders: OrdersConfig,
    pub saga: SagaConfig,
}

/// The [`ApiKey`] extractor looks keys up through the pool.
impl FromRef<OrdersState> for PgPool {
    fn from_ref(state: &OrdersState) -> Self {
        state.pool.clone()
    }
}

/// The orders routes.
pub fn routes(state: OrdersState) -> Routes {
    Routes::new()
        .post("/v1/orders", place)
        .get("/v1/orders/{id}", get_order)
        .with_state(state)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if keel_http::idempotency::is_json(headers) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    keel_http::idempotency::key(headers).map_err(|e| {
        ApiError::IdempotencyKey(match e {
            KeyError::Missing => {
                "send an Idempotency-Key header: a unique value per order, e.g. a UUID, reused on retries"
            }
            KeyError::Unusable => KeyError::UNUSABLE,
        })
    })
}

/// Where an accepted order's answer came from: `Idempotent-Replayed: true` says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Placed by this request.
    Fresh,
    /// The stored answer of an earlier request with the same key (P13).
    Replayed,
}

/// 202 with `Location`, from a fresh or a stored order body.
fn accepted(status: StatusCode, body: serde_json::Value, answer: Answer) -> Response {
    let location = body
        .get("id")
        .and_then(|id| id.as_str())
        .and_then(|id| HeaderValue::from_str(&format!("/v1/orders/{id}")).ok());
    let mut response = (status, Json(body)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if answer == Answer::Replayed {
        keel_http::idempotency::mark_replayed(&mut response);
    }
    response
}

async fn place(
    ApiKey(caller): ApiKey,
    State(state): State<OrdersState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let key = idempotency_key(&headers)?;
    let limits = Limits {
        max_lines: state.orders.max_lines,
        max_quantity: state.orders.max_quantity,
    };
    let order = request::parse(&body, limits)?;
    match place_order(&state, &caller, &order, key).await? {
        Placed::New(body) => {
            metrics::counter!("orders_placed_total").increment(1);
            Ok(accepted(StatusCode::ACCEPTED, body, Answer::Fresh))
        }
        Placed::Replay(status, body) => {
            metrics::counter!("orders_idempotent_replays_total").increment(1);
            Ok(accepted(status, body, Answer::Replayed))
        }
    }
}

/// What [`place_order`] did.
#[derive(Debug, Clone)]
pub enum Placed {
    /// A new order; its representation (state PENDING).
    New(serde_json::Value),
    /// The key was used before with the same request: the stored answer.
    Replay(StatusCode, serde_json::Value),
}

/// The placement transaction (steps 1–3 of the module doc) for a parsed `order` of `caller`'s
/// customer under idempotency `key`. Public so `make bench` can measure it against a bare
/// insert on the same pool.
pub async fn place_order(
    state: &OrdersState,
    caller: &Authenticated,
    order: &request::PlaceOrder,
    key: &str,
) -> Result<Placed, ApiError> {
    let timing = Timing {
        ttl: state.orders.idempotency_ttl,
        wait: state.orders.idempotency_wait,
        // Only for two-phase use; here an in-progress key is never visible to others.
        stale_after: state.orders.idempotency_ttl,
    };

    let scope = idempotency_scope(&caller.customer);
    // Every `?` below drops `tx` uncommitted: Postgres rolls back, nothing is half-written.
    let mut tx = state.pool.begin().await?;
    let begin =
        idempotency::begin(&mut tx, &scope, key, &order.fingerprint(&scope), timing).await?;
    match begin {
        Begin::New => {}
        Begin::Replay {
            status_code,
            response,
        } => {
            tx.rollback().await?;
            let status = StatusCode::from_u16(u16::try_from(status_code).unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(Placed::Replay(status, response));
        }
        Begin::Mismatch => return Err(ApiError::IdempotencyMismatch),
        Begin::InProgress => return Err(ApiError::IdempotencyInProgress),
    }

    let prices = catalogue::prices(&mut tx, &order.skus()).await?;
    let (lines, total) = request::price(order, &prices)?;
    let id = OrderId::new();
    let view = store::insert(
        &mut tx,
        &NewOrder {
            id,
            customer_id: caller.customer.as_str(),
            total,
            lines: &lines,
        },
    )
    .await?;
    saga::store::create(&mut tx, id, &order.payment_token, &state.saga).await?;
    let body = serde_json::to_value(&view).map_err(|e| keel_pg::PgError::Encode(e.to_string()))?;
    idempotency::complete(
        &mut tx,
        &scope,
        key,
        i32::from(StatusCode::ACCEPTED.as_u16()),
        &body,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        order_id = %id,
        customer_id = %caller.customer,
        api_key_id = caller.key_id,
        total_minor = total.minor,
        "order placed"
    );
    Ok(Placed::New(body))
}

async fn get_order(
    ApiKey(caller): ApiKey,
    State(state): State<OrdersState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Anything that is not a UUID names no order: 404, like an unknown UUID.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::OrderNotFound)?;
    let mut conn = state.pool.acquire().await?;
    let view = store::load_for_customer(&mut conn, OrderId(id), &caller.customer)
        .await?
        .ok_or(ApiError::OrderNotFound)?;
    Ok(Json(view).into_response())
}
