//! Signed webhooks from the provider to billing: what is kept about them, and their bounds.
//!
//! This is the *sending* side of P32 (billing's replay-safe receiver is the other half).
//! Signing follows Standard Webhooks and is done by `keel_webhooks` (the same code billing
//! verifies with): `webhook-id`, `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`, keyed with the
//! base64-decoded part of the `whsec_...` secret in `webhook.secret`.
//!
//! Delivery is at-least-once, the way real providers do it:
//! - [`queue`]: a capture reserves a place on a bounded queue (`webhook.queue_capacity`; full
//!   means the capture is refused with 503, never an unbounded backlog) and records the
//!   webhook; a redelivery queues the *same* id and body again;
//! - [`dispatch`]: up to `webhook.max_concurrent` deliveries run at once, each retrying
//!   non-2xx answers and errors with capped exponential backoff and jitter until a 2xx or
//!   `webhook.max_attempts`, signing each attempt afresh for its own timestamp;
//! - [`admin`]: `GET /admin/webhooks` shows every attempt, and
//!   `POST /admin/webhooks/{id}/redeliver` sends the same id and body again with a fresh
//!   timestamp and signature — exactly the duplicate a receiver must absorb.
//!
//! What must not break: the body is serialized once and those exact bytes are signed and
//! sent on every attempt and redelivery (a receiver verifies over the raw body, and dedupes on
//! the id). On shutdown the sender stops with the lifecycle's stop token; queued and retrying
//! deliveries are abandoned (logged with their count), as the simulator keeps no state.

pub mod admin;
pub mod dispatch;
pub mod queue;

use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, millis as ms};
use keel_webhooks::{SecretError, SigningKey};
use serde::{Deserialize, Serialize};

pub use admin::admin_routes;
pub use queue::{CapturedEvent, Reservation, Sender, Webhooks};

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

impl WebhookConfig {
    /// The signing key parsed from `secret` (validated at start-up, so a bad one exits 78).
    pub fn signing_key(&self) -> Result<SigningKey, SecretError> {
        SigningKey::parse(self.secret.expose_secret())
    }
}

impl Validate for WebhookConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "webhook.url",
                format!("scheme `{}` is not http or https", self.url.scheme()),
            ));
        }
        self.signing_key()
            .map_err(|e| ConfigError::invalid("webhook.secret", e))?;
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

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook.secret: {0}")]
    Secret(#[from] SecretError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
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
    /// The bytes signed and sent on every attempt (see the module docs).
    #[serde(skip)]
    raw: Bytes,
}
