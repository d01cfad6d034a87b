//! The card API billing calls: authorize, capture, void and read an authorization.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/authorizations` | 201 authorized (+ `Location`); 402 declined; 400 bad body or unknown token; 503 / 504 by token or fault knob |
//! | `POST /v1/authorizations/{id}/capture` | 202 `capture_pending`, then a `payment.captured` webhook; 404; 409 unless `authorized` |
//! | `POST /v1/authorizations/{id}/void` | 200 `voided`; 404; 409 unless `authorized` |
//! | `GET /v1/authorizations/{id}` | 200 current state; 404 |
//!
//! Every `POST` needs an `Idempotency-Key` (P13, see [`crate::idempotency`]): the fingerprint
//! of "the same request" is the operation plus its parsed body or path id, so a key reused on
//! another endpoint is a mismatch (422), never a silent replay of the wrong answer.
//!
//! States: `authorized` → `capture_pending` → `captured` (when the sender picks the webhook
//! up: the simulated settlement), or `authorized` → `voided`. Any other transition is 409 with
//! the current `status` in the problem, so billing can tell "already done" from "wrong state".
//! What must not break: a capture changes state only after a place on the webhook queue is
//! reserved, so no capture is ever left without its webhook.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, FieldError};
use crate::faults::{self, Faults, Token};
use crate::idempotency::{IdempotencyKey, IdempotencyStore, Reply};
use crate::model::Status;
use crate::store::{BoundedMap, StoreConfig, lock};
use crate::webhooks::{CapturedEvent, Webhooks};

/// Longest `reference` accepted (billing sends its payment id).
const MAX_REFERENCE_LEN: usize = 128;

/// An authorization as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Authorization {
    /// `auth_<uuid, simple form>`.
    pub id: String,
    pub status: Status,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: String,
}

/// The body of `POST /v1/authorizations`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub amount_minor: i64,
    pub currency: String,
    pub token: String,
    pub reference: String,
}

impl AuthorizeRequest {
    /// Checks every field and returns the outcome the token asks for.
    fn validate(&self) -> Result<Token, ApiError> {
        let mut errors = Vec::new();
        if self.amount_minor < 1 {
            errors.push(FieldError::new("amount_minor", "must be at least 1"));
        }
        if !(self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            errors.push(FieldError::new(
                "currency",
                "must be an ISO 4217 code (three capital letters)",
            ));
        }
        if self.reference.is_empty() || self.reference.len() > MAX_REFERENCE_LEN {
            errors.push(FieldError::new(
                "reference",
                format!("must be 1 to {MAX_REFERENCE_LEN} bytes"),
            ));
        }
        let token = Token::parse(&self.token);
        if token.is_none() {
            errors.push(FieldError::new(
                "token",
                "unknown token (tok_approve, tok_ok*, tok_decline, tok_insufficient_funds, \
                 tok_slow, tok_flaky, tok_timeout)",
            ));
        }
        match token {
            Some(token) if errors.is_empty() => Ok(token),
            _ => Err(ApiError::InvalidRequest(errors)),
        }
    }
}

/// What makes two requests with one idempotency key "the same request".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Authorize(AuthorizeRequest),
    Capture(String),
    Void(String),
}

/// The authorizations the simulator remembers (`store.max_authorizations`, oldest forgotten).
#[derive(Debug)]
pub struct Authorizations {
    map: Mutex<BoundedMap<String, Authorization>>,
}

impl Authorizations {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::new(BoundedMap::new("authorizations", capacity)),
        }
    }

    fn create(&self, req: &AuthorizeRequest) -> Authorization {
        let auth = Authorization {
            id: format!("auth_{}", uuid::Uuid::new_v4().simple()),
            status: Status::Authorized,
            amount_minor: req.amount_minor,
            currency: req.currency.clone(),
            reference: req.reference.clone(),
        };
        lock(&self.map).insert(auth.id.clone(), auth.clone());
        auth
    }

    pub fn get(&self, id: &str) -> Option<Authorization> {
        lock(&self.map).get(id).cloned()
    }

    /// Moves `id` from `authorized` to `to`, or says why not.
    fn transition(
        &self,
        id: &str,
        action: &'static str,
        to: Status,
    ) -> Result<Authorization, ApiError> {
        let mut map = lock(&self.map);
        let auth = map.get_mut(id).ok_or(ApiError::NotFound)?;
        if auth.status != Status::Authorized {
            return Err(ApiError::InvalidState {
                action,
                status: auth.status,
            });
        }
        auth.status = to;
        Ok(auth.clone())
    }

    /// The simulated settlement: a pending capture is done.
    fn settle_capture(&self, id: &str) {
        if let Some(auth) = lock(&self.map).get_mut(id)
            && auth.status == Status::CapturePending
        {
            auth.status = Status::Captured;
        }
    }
}

/// What the `/v1` handlers share.
#[derive(Debug, Clone)]
pub struct Api {
    pub authorizations: Arc<Authorizations>,
    pub idempotency: Arc<IdempotencyStore<Operation>>,
    pub faults: Arc<Faults>,
    pub webhooks: Arc<Webhooks>,
}

impl Api {
    pub fn new(store: &StoreConfig, faults: Arc<Faults>, webhooks: Arc<Webhooks>) -> Self {
        Self {
            authorizations: Arc::new(Authorizations::new(store.max_authorizations)),
            idempotency: Arc::new(IdempotencyStore::new(store.max_idempotency_keys)),
            faults,
            webhooks,
        }
    }
}

/// The `/v1` routes, behind the fault knobs.
pub fn routes(api: Api) -> Router {
    let faults = Arc::clone(&api.faults);
    Router::new()
        .route("/v1/authorizations", post(authorize))
        .route("/v1/authorizations/{id}", get(read))
        .route("/v1/authorizations/{id}/capture", post(capture))
        .route("/v1/authorizations/{id}/void", post(void))
        // route_layer: only matched routes get the knobs; a 404 is not slowed or failed.
        .route_layer(middleware::from_fn_with_state(faults, faults::inject))
        .with_state(api)
}

async fn authorize(
    State(api): State<Api>,
    key: IdempotencyKey,
    Json(req): Json<AuthorizeRequest>,
) -> Result<Response, ApiError> {
    // Invalid bodies are refused before the key is claimed: nothing to store for them.
    let token = req.validate()?;
    let fingerprint = Operation::Authorize(req.clone());
    let response = api
        .idempotency
        .run(key, fingerprint, |attempt| async move {
            api.faults.play(token, attempt).await?;
            let auth = api.authorizations.create(&req);
            tracing::info!(authorization_id = %auth.id, reference = %auth.reference, "authorized");
            let location = format!("/v1/authorizations/{}", auth.id);
            Ok(Reply::json(StatusCode::CREATED, &auth).with_location(location))
        })
        .await;
    Ok(response)
}

async fn capture(State(api): State<Api>, Path(id): Path<String>, key: IdempotencyKey) -> Response {
    let fingerprint = Operation::Capture(id.clone());
    api.idempotency
        .run(key, fingerprint, |_| async move {
            let reservation = api.webhooks.reserve()?;
            let auth = api
                .authorizations
                .transition(&id, "captured", Status::CapturePending)?;
            let authorizations = Arc::clone(&api.authorizations);
            let settled_id = auth.id.clone();
            let webhook_id = reservation.send_captured(
                &CapturedEvent {
                    authorization_id: &auth.id,
                    reference: &auth.reference,
                    amount_minor: auth.amount_minor,
                    currency: &auth.currency,
                },
                move || authorizations.settle_capture(&settled_id),
            );
            tracing::info!(authorization_id = %auth.id, %webhook_id, "capture accepted");
            Ok(Reply::json(StatusCode::ACCEPTED, &auth))
        })
        .await
}

async fn void(State(api): State<Api>, Path(id): Path<String>, key: IdempotencyKey) -> Response {
    let fingerprint = Operation::Void(id.clone());
    api.idempotency
        .run(key, fingerprint, |_| async move {
            let auth = api
                .authorizations
                .transition(&id, "voided", Status::Voided)?;
            tracing::info!(authorization_id = %auth.id, "voided");
            Ok(Reply::json(StatusCode::OK, &auth))
        })
        .await
}

async fn read(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Authorization>, ApiError> {
    api.authorizations
        .get(&id)
        .map(Json)
        .ok_or(ApiError::NotFound)
}
