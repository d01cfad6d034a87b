//! `POST /v1/items` and `GET /v1/items/{id}`.
//!
//! `POST /v1/items` needs an `Idempotency-Key` (P13) and runs in one transaction (keel-pg's
//! one-transaction idempotency mode):
//!
//! 1. `idempotency::begin` inserts the key. A retry with the same key and body gets the first
//!    answer again (`Idempotent-Replayed: true`); the same key with another body is a 422; a
//!    concurrent request with the same key waits for the first to commit, up to
//!    `items.idempotency_wait`, then gets a 409.
//! 2. The item and its `skeleton.item.created` outbox event (P02) are written.
//! 3. `idempotency::complete` stores the answer; commit. Any error before the commit rolls
//!    everything back, key included, so a retry with the same key starts afresh.
//!
//! The key's scope is the route: the template has no callers to tell apart. A service with
//! API keys scopes by the caller instead, so two clients that pick the same key never see
//! each other's answers.
//!
//! `GET /v1/items/{id}` returns the item and what the history consumer recorded about it
//! (`history`), which fills in shortly after the `POST`: the event travels through the outbox,
//! the broker and the consumer's inbox first.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_http::idempotency::KeyError;
use keel_pg::idempotency::{self, Begin, Timing};
use keel_pg::outbox::{self, NewEvent};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{AGGREGATE, CREATED, Invalid, Item, ItemCreated, ItemId, NewItem, store};
use crate::config::ItemsConfig;
use crate::error::ApiError;
use crate::history::{self, HistoryEntry};

/// The idempotency scope of item creation (see the module docs).
pub const IDEMPOTENCY_SCOPE: &str = "POST /v1/items";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ItemsState {
    pub pool: PgPool,
    pub config: ItemsConfig,
}

/// The items routes.
pub fn routes(state: ItemsState) -> Router {
    Router::new()
        .route("/v1/items", post(create))
        .route("/v1/items/{id}", get(show))
        .with_state(state)
}

/// The client's `Idempotency-Key`: 1 to 255 visible ASCII characters. An extractor, so a
/// handler that needs one says so in its signature and never parses headers itself.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match keel_http::idempotency::key(&parts.headers) {
            Ok(key) => Ok(Self(key.to_owned())),
            Err(KeyError::Missing) => Err(ApiError::IdempotencyKey(
                "send an Idempotency-Key header: a unique value per item, e.g. a UUID, reused on retries",
            )),
            Err(KeyError::Unusable) => Err(ApiError::IdempotencyKey(KeyError::UNUSABLE)),
        }
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if keel_http::idempotency::is_json(headers) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Where a created item's answer came from: `Idempotent-Replayed: true` says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Created by this request.
    Fresh,
    /// The stored answer of an earlier request with the same key (P13).
    Replayed,
}

/// 201 with `Location`, from a fresh or a stored answer.
fn created(status: StatusCode, body: serde_json::Value, answer: Answer) -> Response {
    let location = body
        .get("id")
        .and_then(|id| id.as_str())
        .and_then(|id| HeaderValue::from_str(&format!("/v1/items/{id}")).ok());
    let mut response = (status, Json(body)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if answer == Answer::Replayed {
        keel_http::idempotency::mark_replayed(&mut response);
    }
    response
}

async fn create(
    State(state): State<ItemsState>,
    IdempotencyKey(key): IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let item = NewItem::parse(&body).map_err(|e| match e {
        Invalid::Malformed(why) => ApiError::MalformedJson(why),
        Invalid::Fields(errors) => ApiError::Validation(errors),
    })?;
    let timing = Timing {
        ttl: state.config.idempotency_ttl,
        wait: state.config.idempotency_wait,
        // Only for two-phase use; here an in-progress key is never visible to others.
        stale_after: state.config.idempotency_ttl,
    };

    // Every `?` below drops `tx` uncommitted: Postgres rolls back, nothing is half-written.
    let mut tx = state.pool.begin().await?;
    let fingerprint = item.fingerprint(IDEMPOTENCY_SCOPE);
    match idempotency::begin(&mut tx, IDEMPOTENCY_SCOPE, &key, &fingerprint, timing).await? {
        Begin::New => {}
        Begin::Replay {
            status_code,
            response,
        } => {
            tx.rollback().await?;
            metrics::counter!("items_idempotent_replays_total").increment(1);
            let status = u16::try_from(status_code)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(created(status, response, Answer::Replayed));
        }
        Begin::Mismatch => return Err(ApiError::IdempotencyMismatch),
        Begin::InProgress => return Err(ApiError::IdempotencyInProgress),
    }

    let id = ItemId::new();
    let stored = store::insert(&mut tx, id, &item).await?;
    let event = ItemCreated {
        item_id: id,
        name: stored.name.clone(),
        quantity: stored.quantity,
    };
    outbox::insert(
        &mut tx,
        &NewEvent {
            aggregate_type: AGGREGATE,
            aggregate_id: &id.to_string(),
            event_type: CREATED,
            data: encode(&event)?,
        },
    )
    .await?;
    let body = encode(&stored)?;
    idempotency::complete(
        &mut tx,
        IDEMPOTENCY_SCOPE,
        &key,
        i32::from(StatusCode::CREATED.as_u16()),
        &body,
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("items_created_total").increment(1);
    Ok(created(StatusCode::CREATED, body, Answer::Fresh))
}

fn encode(value: &impl Serialize) -> Result<serde_json::Value, ApiError> {
    // Our own types always serialize; an error here is a bug, reported as a 500.
    serde_json::to_value(value).map_err(|e| keel_pg::PgError::Encode(e.to_string()).into())
}

/// An item and what the history consumer recorded about it.
#[derive(Debug, Serialize)]
struct ItemView {
    #[serde(flatten)]
    item: Item,
    history: Vec<HistoryEntry>,
}

async fn show(
    State(state): State<ItemsState>,
    Path(id): Path<String>,
) -> Result<Json<ItemView>, ApiError> {
    // Not a UUID cannot be an item: the same 404 as an unknown one.
    let id = Uuid::parse_str(&id)
        .map(ItemId)
        .map_err(|_| ApiError::ItemNotFound)?;
    let item = store::get(&state.pool, id)
        .await?
        .ok_or(ApiError::ItemNotFound)?;
    let history =
        history::store::for_item(&state.pool, id, i64::from(state.config.history_limit)).await?;
    Ok(Json(ItemView { item, history }))
}
