//! Signed webhooks from the provider to billing, and the sender that delivers them.
//!
//! This is the *sending* side of P32 (billing's replay-safe receiver is the other half).
//! Signing follows Standard Webhooks: `webhook-id`, `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`, keyed with the
//! base64-decoded part of a `whsec_...` secret ([`SigningKey`], [`sign`]).
//!
//! Delivery is at-least-once, the way real providers do it: a capture puts the webhook on a
//! bounded queue (`webhook.queue_capacity`; full means the capture is refused with 503, never
//! an unbounded backlog); up to `webhook.max_concurrent` deliveries run at once, each
//! retrying non-2xx answers and errors with capped exponential backoff and jitter until a 2xx
//! or `webhook.max_attempts`. Every attempt is recorded for `GET /admin/webhooks`, and
//! `POST /admin/webhooks/{id}/redeliver` sends the *same* id and body again with a fresh
//! timestamp and signature — exactly the duplicate a receiver must absorb.
//!
//! What must not break: the body is serialized once and those exact bytes are signed and
//! sent on every attempt and redelivery (a receiver verifies over the raw body, and dedupes on
//! the id). On shutdown the sender stops with the lifecycle's stop token; queued and retrying
//! deliveries are abandoned (logged with their count), as the simulator keeps no state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::faults::ms;
use crate::store::{BoundedMap, StoreConfig, lock};

/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// `[webhook]`: where webhooks go, how they are signed, and every bound of their delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Billing's receiver.
    pub url: url::Url,
    /// `whsec_<base64 key>`; from `KEEL_WEBHOOK__SECRET` or `KEEL_WEBHOOK__SECRET_FILE` in
    /// anything but a laptop.
    pub secret: SecretString,
    /// Pause after the first failed attempt; doubles per attempt up to `max_backoff`.
    #[serde(with = "keel_config::duration")]
    pub initial_backoff: Duration,
    #[serde(with = "keel_config::duration")]
    pub max_backoff: Duration,
    /// Attempts per delivery, the first included; then the webhook is marked failed.
    pub max_attempts: u32,
    /// Deadline of one attempt (connect, send, and the receiver's answer).
    #[serde(with = "keel_config::duration")]
    pub timeout: Duration,
    /// Deliveries waiting for a sender; a capture finding it full is answered 503.
    pub queue_capacity: usize,
    /// Deliveries in progress at once (each may be waiting out its backoff).
    pub max_concurrent: usize,
}

impl Validate for WebhookConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "webhook.url",
                format!("scheme `{}` is not http or https", self.url.scheme()),
            ));
        }
        SigningKey::parse(&self.secret).map_err(|e| ConfigError::invalid("webhook.secret", e))?;
        let initial = ms(self.initial_backoff);
        ensure_range("webhook.initial_backoff (ms)", initial, 1, 60_000)?;
        ensure_range(
            "webhook.max_backoff (ms)",
            ms(self.max_backoff),
            initial,
            600_000,
        )?;
        ensure_range("webhook.max_attempts", self.max_attempts, 1, 1_000)?;
        ensure_range("webhook.timeout (ms)", ms(self.timeout), 1, 120_000)?;
        ensure_range("webhook.queue_capacity", self.queue_capacity, 1, 1_000_000)?;
        ensure_range("webhook.max_concurrent", self.max_concurrent, 1, 1_024)
    }
}

/// Why a webhook secret is unusable. Never carries the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("must start with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("the part after `{SECRET_PREFIX}` is not standard base64")]
    NotBase64,
    #[error("key is {0} bytes; Standard Webhooks keys are 24 to 64 bytes")]
    Length(usize),
}

/// The HMAC key decoded from a `whsec_` secret. Its `Debug` does not show the key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Decodes `whsec_<base64>` into the key bytes.
    pub fn parse(secret: &SecretString) -> Result<Self, SecretError> {
        let encoded = secret
            .expose_secret()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self(key))
    }
}

/// The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256>` over
/// `"{id}.{timestamp}.{body}"`.
pub fn sign(key: &SigningKey, id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key.0) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The event a capture announces.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedEvent<'a> {
    pub authorization_id: &'a str,
    pub reference: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    #[serde(rename = "type")]
    event_type: &'a str,
    data: T,
}

/// Where a webhook's delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Queued, or between attempts.
    Pending,
    /// A 2xx was received.
    Delivered,
    /// `webhook.max_attempts` attempts without a 2xx.
    Failed,
    /// The simulator stopped before the delivery finished.
    Abandoned,
}

/// One attempt to deliver a webhook.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    /// 1 for the original delivery, 2 for the first redelivery, ...
    pub delivery: u32,
    /// 1-based attempt within that delivery.
    pub attempt: u32,
    pub at: DateTime<Utc>,
    /// The `webhook-timestamp` sent.
    pub timestamp: i64,
    /// The receiver's status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why there was no answer (connect error, timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A webhook as `GET /admin/webhooks` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub authorization_id: String,
    pub created_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    /// Deliveries started (1 + redeliveries).
    pub deliveries: u32,
    /// The most recent attempts (at most `webhook.max_attempts` are kept).
    pub attempts: Vec<AttemptRecord>,
    /// The body exactly as sent, parsed for display.
    pub body: serde_json::Value,
    #[serde(skip)]
    raw: Bytes,
}

/// A delivery waiting for a sender.
struct Job {
    id: String,
    body: Bytes,
    delivery: u32,
    /// Runs when the sender picks the job up (the simulated settlement of a capture).
    on_dispatch: Option<Box<dyn FnOnce() + Send>>,
}

/// What a delivery ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Failed,
    Abandoned,
}

/// The webhook side of the simulator: records, the queue and its sender.
#[derive(Debug)]
pub struct Webhooks {
    queue: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    records: Mutex<BoundedMap<String, WebhookRecord>>,
    client: reqwest::Client,
    url: url::Url,
    key: SigningKey,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook.secret: {0}")]
    Secret(#[from] SecretError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Webhooks {
    /// Starts the sender; it runs until `stop` is cancelled. Await the handle at shutdown.
    pub fn spawn(
        config: &WebhookConfig,
        store: &StoreConfig,
        stop: CancellationToken,
    ) -> Result<(Arc<Self>, JoinHandle<()>), WebhookError> {
        let key = SigningKey::parse(&config.secret)?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            // A receiver redirecting a signed POST elsewhere is a misconfiguration to see, not
            // to follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keel-psp-sim/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let shared = Arc::new(Shared {
            records: Mutex::new(BoundedMap::new("webhooks", store.max_webhooks)),
            client,
            url: config.url.clone(),
            key,
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff,
            max_attempts: config.max_attempts,
        });
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let sender = tokio::spawn(run_sender(
            Arc::clone(&shared),
            rx,
            config.max_concurrent,
            stop,
        ));
        Ok((Arc::new(Self { queue, shared }), sender))
    }

    /// Reserves a place on the queue, so a capture changes state only if its webhook can
    /// be sent: 503 when the queue is full or the sender has stopped.
    pub fn reserve(&self) -> Result<Reservation<'_>, ApiError> {
        match self.queue.try_reserve() {
            Ok(permit) => Ok(Reservation {
                permit,
                queue: &self.queue,
                shared: &self.shared,
            }),
            Err(mpsc::error::TrySendError::Full(())) => {
                metrics::counter!("psp_webhook_queue_full_total").increment(1);
                Err(ApiError::Busy)
            }
            Err(mpsc::error::TrySendError::Closed(())) => Err(ApiError::ShuttingDown),
        }
    }

    /// The newest `limit` webhooks, newest first, optionally only those of one authorization.
    pub fn list(&self, authorization_id: Option<&str>, limit: usize) -> Vec<WebhookRecord> {
        lock(&self.shared.records)
            .values()
            .rev()
            .filter(|r| authorization_id.is_none_or(|a| r.authorization_id == a))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Sends webhook `id` again: same id and body, new timestamp and signature.
    pub fn redeliver(&self, id: &str) -> Result<WebhookRecord, ApiError> {
        let reservation = self.reserve()?;
        let (body, delivery, record) = {
            let mut records = lock(&self.shared.records);
            let record = records.get_mut(id).ok_or(ApiError::NotFound)?;
            record.deliveries += 1;
            record.status = DeliveryStatus::Pending;
            (record.raw.clone(), record.deliveries, record.clone())
        };
        reservation.send(Job {
            id: id.to_owned(),
            body,
            delivery,
            on_dispatch: None,
        });
        Ok(record)
    }
}

/// A place on the webhook queue, held while the caller changes state.
#[derive(Debug)]
pub struct Reservation<'a> {
    permit: mpsc::Permit<'a, Job>,
    queue: &'a mpsc::Sender<Job>,
    shared: &'a Shared,
}

impl Reservation<'_> {
    /// Records and queues a `payment.captured` webhook; `on_dispatch` runs when a sender
    /// picks it up. Returns the webhook id.
    pub fn send_captured(
        self,
        event: &CapturedEvent<'_>,
        on_dispatch: impl FnOnce() + Send + 'static,
    ) -> String {
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let envelope = Envelope {
            event_type: "payment.captured",
            data: event,
        };
        // Serialized once: these exact bytes are signed and sent on every attempt.
        let raw = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
        let record = WebhookRecord {
            id: id.clone(),
            event_type: "payment.captured",
            authorization_id: event.authorization_id.to_owned(),
            created_at: Utc::now(),
            status: DeliveryStatus::Pending,
            deliveries: 1,
            attempts: Vec::new(),
            body: serde_json::from_slice(&raw).unwrap_or_default(),
            raw: raw.clone(),
        };
        lock(&self.shared.records).insert(id.clone(), record);
        self.send(Job {
            id: id.clone(),
            body: raw,
            delivery: 1,
            on_dispatch: Some(Box::new(on_dispatch)),
        });
        id
    }

    fn send(self, job: Job) {
        let queue = self.queue;
        self.permit.send(job);
        metrics::gauge!("psp_webhook_queue_depth")
            .set((queue.max_capacity() - queue.capacity()) as f64);
    }
}

/// The sender: takes jobs off the queue, runs up to `max_concurrent` deliveries, and on stop
/// abandons what is left.
async fn run_sender(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Job>,
    max_concurrent: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_concurrent));
    let mut deliveries = JoinSet::new();
    let mut abandoned = 0_usize;
    loop {
        // Reap finished deliveries so the set does not grow.
        while deliveries.try_join_next().is_some() {}
        // A free slot first, then a job: a job waits *on the queue* (where `queue_capacity`
        // bounds it and a full queue refuses captures), not in this loop.
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break }; // the semaphore is never closed
        let job = tokio::select! {
            () = stop.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        metrics::gauge!("psp_webhook_queue_depth").set(rx.len() as f64);
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        deliveries.spawn(async move {
            metrics::gauge!("psp_webhook_deliveries_in_flight").increment(1.0);
            let outcome = deliver(&shared, job, &stop).await;
            metrics::gauge!("psp_webhook_deliveries_in_flight").decrement(1.0);
            drop(slot);
            outcome
        });
    }
    // No new jobs; jobs already behind a reserved permit still arrive, so drain to the end.
    rx.close();
    while let Some(job) = rx.recv().await {
        shared.set_status(&job.id, DeliveryStatus::Abandoned);
        abandoned += 1;
    }
    // Running deliveries watch the same token and end at their next await.
    while let Some(outcome) = deliveries.join_next().await {
        if matches!(outcome, Ok(Outcome::Abandoned)) {
            abandoned += 1;
        }
    }
    if abandoned > 0 {
        // Not an error (the simulator keeps no state by design), but webhooks billing will
        // never get: worth a warning.
        tracing::warn!(
            abandoned,
            "webhook sender stopped; pending deliveries abandoned"
        );
    } else {
        tracing::info!(abandoned, "webhook sender stopped; nothing pending");
    }
}

/// One delivery: attempts until a 2xx, `max_attempts`, or stop.
async fn deliver(shared: &Shared, job: Job, stop: &CancellationToken) -> Outcome {
    if let Some(settle) = job.on_dispatch {
        settle();
    }
    for attempt in 1..=shared.max_attempts {
        let timestamp = Utc::now().timestamp();
        let signature = sign(&shared.key, &job.id, timestamp, &job.body);
        let request = shared
            .client
            .post(shared.url.clone())
            .header("webhook-id", &job.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(job.body.clone())
            .send();
        let result = tokio::select! {
            r = request => r,
            () = stop.cancelled() => {
                shared.set_status(&job.id, DeliveryStatus::Abandoned);
                return Outcome::Abandoned;
            }
        };
        let (status_code, error) = match &result {
            Ok(response) => (Some(response.status().as_u16()), None),
            // Without the URL: it is ours, and the error is about the attempt.
            Err(e) => (None, Some(error_kind(e))),
        };
        let delivered = status_code.is_some_and(|s| (200..300).contains(&s));
        metrics::counter!(
            "psp_webhook_attempts_total",
            "outcome" => if delivered { "2xx" } else if error.is_some() { "error" } else { "non_2xx" }
        )
        .increment(1);
        shared.record_attempt(
            &job.id,
            AttemptRecord {
                delivery: job.delivery,
                attempt,
                at: Utc::now(),
                timestamp,
                status_code,
                error,
            },
        );
        if delivered {
            shared.set_status(&job.id, DeliveryStatus::Delivered);
            tracing::info!(webhook_id = %job.id, attempt, "webhook delivered");
            return Outcome::Delivered;
        }
        if attempt == shared.max_attempts {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(shared.backoff(attempt)) => {}
            () = stop.cancelled() => {
                shared.set_status(&job.id, DeliveryStatus::Abandoned);
                return Outcome::Abandoned;
            }
        }
    }
    shared.set_status(&job.id, DeliveryStatus::Failed);
    tracing::warn!(
        webhook_id = %job.id,
        attempts = shared.max_attempts,
        "webhook not delivered; giving up"
    );
    Outcome::Failed
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connect".to_owned()
    } else {
        "request".to_owned()
    }
}

impl Shared {
    /// The pause after failed attempt `attempt` (1-based): `initial * 2^(attempt-1)`, capped
    /// at `max_backoff`, then "equal jitter" — a random point in its upper half — so
    /// webhooks that failed together do not all come back at the same instant, while the
    /// pause still grows.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2_u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max_backoff);
        let half = exp / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    fn set_status(&self, id: &str, status: DeliveryStatus) {
        if let Some(r) = lock(&self.records).get_mut(id) {
            r.status = status;
        }
    }

    fn record_attempt(&self, id: &str, attempt: AttemptRecord) {
        if let Some(r) = lock(&self.records).get_mut(id) {
            // Keep the most recent attempts only: redeliveries must not grow a record forever.
            let keep = self.max_attempts as usize;
            if r.attempts.len() >= keep {
                r.attempts.remove(0);
            }
            r.attempts.push(attempt);
        }
    }
}

/// `GET /admin/webhooks[?authorization_id=..&limit=..]` (newest first, default 100, at most
/// 1000) and `POST /admin/webhooks/{id}/redeliver`.
pub fn admin_routes(webhooks: Arc<Webhooks>) -> Router {
    Router::new()
        .route("/admin/webhooks", get(list))
        .route("/admin/webhooks/{webhook_id}/redeliver", post(redeliver))
        .with_state(webhooks)
}

/// Webhooks listed when the query names no `limit`.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Most webhooks one listing returns: a response stays small however many are kept.
const MAX_LIST_LIMIT: usize = 1_000;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_must_be_whsec_base64_of_a_sane_length() {
        let parse = |s: &str| SigningKey::parse(&SecretString::from(s.to_owned()));
        assert!(parse("whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6").is_ok());
        assert!(matches!(
            parse("S2vWrImrY1hJwx70XjbtZeu65l4ixwO6"),
            Err(SecretError::MissingPrefix)
        ));
        assert!(matches!(
            parse("whsec_not base64!"),
            Err(SecretError::NotBase64)
        ));
        assert!(matches!(
            parse("whsec_c2hvcnQ="),
            Err(SecretError::Length(5))
        ));
    }

    #[test]
    fn signature_matches_the_standard_webhooks_reference_vector() {
        // The test vector from the Standard Webhooks specification's reference libraries.
        let key = SigningKey::parse(&SecretString::from(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
        ))
        .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
