//! The payment provider's webhook receiver, replay-safe (P32): `POST /v1/webhooks/psp`.
//!
//! Standard Webhooks: the provider signs `"{webhook-id}.{webhook-timestamp}.{body}"` with
//! HMAC-SHA256 and sends `webhook-signature: v1,<base64>` (several, space-separated, while it
//! rotates). The checks are `keel_webhooks::Verifier`'s, the same code psp-sim signs with;
//! this module reads the headers and turns each refusal into its answer. A request is
//! applied only if
//! 1. its headers are present and well-formed (else 400),
//! 2. its timestamp is within `webhook.tolerance` of now (else 401: a captured request
//!    replayed later is refused even with a valid signature),
//! 3. one of its signatures verifies under one of `webhook.secrets` (else 401). Two live
//!    secrets make rotation possible without downtime: add the new one, switch the sender,
//!    drop the old one. Verification runs over the **raw body bytes** as received — never a
//!    re-serialised JSON value, which would not be byte-identical — and compares in constant
//!    time, so timing reveals nothing about the expected signature,
//! 4. its body is a JSON event (else 400).
//!
//! Then, in **one transaction**: insert its `webhook-id` into `webhook_receipts` (`ON
//! CONFLICT DO NOTHING`); if it was already there this is a replay → 200, no effect.
//! Otherwise append `PaymentCaptured` to the payment's stream, update the projection, write
//! the outbox row, commit, 200. A concurrent duplicate waits on the receipt's primary key and
//! then sees it. Must not break: the receipt and the effect commit together — a receipt
//! without its effect would swallow the event; an effect without its receipt would apply
//! twice.
//!
//! Answers the provider acts on (it retries every non-2xx, with backoff, a bounded number of
//! times): an unknown payment reference is **404 and not recorded**, so a redelivery can still
//! apply once billing knows the payment, and an operator sees the failing delivery at the
//! provider. A capture that contradicts the ledger (another authorization, amount, or a
//! voided/declined payment) is 409, logged, not recorded. Event types billing does not handle
//! are recorded and acknowledged (200) so the provider stops sending them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range};
use keel_http::Problem;
use keel_webhooks::{
    ID_HEADER, SIGNATURE_HEADER, Signed, SigningKey, TIMESTAMP_HEADER, VerifyError,
};
use serde::{Deserialize, Deserializer};
use sqlx::PgPool;

use crate::ledger::{self, LedgerError, PaymentEvent, PaymentId, PaymentStatus};

/// The route.
pub const PATH: &str = "/v1/webhooks/psp";

/// `[webhook]`: the secrets billing accepts and how old a delivery may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `whsec_<base64>` secrets, any of which may sign. A TOML list, or (from the
    /// environment or a `KEEL_WEBHOOK__SECRETS_FILE`) one string of secrets separated by
    /// spaces or commas.
    #[serde(deserialize_with = "secret_list")]
    pub secrets: Vec<SecretString>,
    /// How far a delivery's timestamp may be from billing's clock, either way.
    #[serde(with = "keel_config::duration")]
    pub tolerance: Duration,
    /// How long a receipt is kept before the platform's retention purges it (through
    /// `purge_webhook_receipts`, migration 0004). The provider redelivers with a fresh
    /// timestamp for days, and only the receipt stops such a delivery from applying twice:
    /// at least 7 days, which the function enforces too; 90 by default.
    #[serde(with = "keel_config::duration", default = "receipts_kept")]
    pub receipts_kept: Duration,
}

/// Receipts are kept this long unless `webhook.receipts_kept` says otherwise.
fn receipts_kept() -> Duration {
    Duration::from_secs(90 * 86_400)
}

fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(s) => s
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    Ok(list.into_iter().map(SecretString::from).collect())
}

/// Longest accepted secret list (rotation needs two; a few more is a mistake).
const MAX_SECRETS: usize = 4;

impl WebhookConfig {
    /// The signing keys parsed from `secrets`. The error names the key, never a secret.
    fn keys(&self) -> Result<Vec<SigningKey>, ConfigError> {
        self.secrets
            .iter()
            .map(|s| SigningKey::parse(s.expose_secret()))
            .collect::<Result<_, _>>()
            .map_err(|e| ConfigError::invalid("webhook.secrets", format!("each secret {e}")))
    }
}

impl Validate for WebhookConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "webhook.secrets (count)",
            self.secrets.len(),
            1,
            MAX_SECRETS,
        )?;
        self.keys()?;
        let secs = self.tolerance.as_secs();
        ensure_range("webhook.tolerance (s)", secs, 1, 3600)?;
        let days = self.receipts_kept.as_secs() / 86_400;
        ensure_range("webhook.receipts_kept (days)", days, 7, 3650)
    }
}

/// Why a delivery is refused before it is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("missing or malformed header {0}")]
    Header(&'static str),
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no valid signature")]
    Signature,
}

/// Verifies deliveries' Standard Webhooks headers with any of several keys.
#[derive(Debug)]
pub struct Verifier(keel_webhooks::Verifier);

/// The most bytes of `webhook-id` accepted (the provider's are ~36).
const MAX_ID_LEN: usize = 128;

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Rejected> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or(Rejected::Header(name))
}

impl Verifier {
    /// From validated config (secrets were checked by `Validate`).
    pub fn new(config: &WebhookConfig) -> Result<Self, ConfigError> {
        Ok(Self(keel_webhooks::Verifier::new(
            config.keys()?,
            config.tolerance,
        )))
    }

    /// Checks headers, timestamp and signature of a delivery with `body` received at
    /// `now_unix` (seconds). Returns the webhook id.
    pub fn verify<'h>(
        &self,
        headers: &'h HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<&'h str, Rejected> {
        let id = header(headers, ID_HEADER)?;
        if id.len() > MAX_ID_LEN {
            return Err(Rejected::Header(ID_HEADER));
        }
        let signed = Signed {
            id,
            timestamp: header(headers, TIMESTAMP_HEADER)?,
            signature: header(headers, SIGNATURE_HEADER)?,
        };
        self.0
            .verify(&signed, body, now_unix)
            .map_err(|e| match e {
                VerifyError::Timestamp => Rejected::Header(TIMESTAMP_HEADER),
                VerifyError::TooOld | VerifyError::TooNew => Rejected::Stale,
                VerifyError::Signature => Rejected::Signature,
            })?;
        Ok(id)
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    event_type: String,
    data: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Captured {
    authorization_id: String,
    reference: String,
    amount_minor: i64,
    currency: String,
}

/// What the route needs.
#[derive(Debug, Clone)]
pub struct WebhookState {
    pool: PgPool,
    verifier: Arc<Verifier>,
}

/// The webhook route, ready to merge into the service's router.
pub fn router(pool: PgPool, verifier: Verifier) -> Router {
    Router::new()
        .route(PATH, post(receive))
        .with_state(WebhookState {
            pool,
            verifier: Arc::new(verifier),
        })
}

fn problem(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Response {
    Problem::new(status, slug, title)
        .with_detail(detail)
        .into_response()
}

/// How often one delivery is re-applied after losing a version race with a command.
const MAX_CONFLICTS: usize = 3;

async fn receive(State(state): State<WebhookState>, headers: HeaderMap, body: Bytes) -> Response {
    let id = match state
        .verifier
        .verify(&headers, &body, keel_webhooks::unix_now())
    {
        Ok(id) => id.to_owned(),
        Err(Rejected::Header(name)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "webhook-malformed",
                "Malformed webhook",
                format!("missing or malformed header {name}"),
            );
        }
        Err(Rejected::Stale) => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "webhook-stale",
                "Webhook timestamp outside the tolerance",
                "the webhook-timestamp is too far from the receiver's clock",
            );
        }
        Err(Rejected::Signature) => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "webhook-signature",
                "Invalid webhook signature",
                "no webhook-signature verifies with an active secret",
            );
        }
    };
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "webhook-malformed",
            "Malformed webhook",
            "the body is not a JSON event with `type` and `data`",
        );
    };
    let captured = if envelope.event_type == "payment.captured" {
        match serde_json::from_value::<Captured>(envelope.data) {
            Ok(c) => Some(c),
            Err(_) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "webhook-malformed",
                    "Malformed webhook",
                    "payment.captured needs authorization_id, reference, amount_minor, currency",
                );
            }
        }
    } else {
        None
    };
    let payment_id = match &captured {
        Some(c) => match c.reference.parse::<PaymentId>() {
            Ok(p) => Some(p),
            Err(_) => return unknown_reference(),
        },
        None => None,
    };

    for _ in 0..MAX_CONFLICTS {
        match apply(
            &state.pool,
            &id,
            &envelope.event_type,
            payment_id,
            captured.as_ref(),
        )
        .await
        {
            Ok(outcome) => return outcome.into_response(),
            Err(LedgerError::Conflict { .. }) => continue,
            Err(e) => {
                tracing::error!(webhook_id = %id, error = %e, "webhook not applied");
                return Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR).into_response();
            }
        }
    }
    // Lost the race three times: let the provider retry.
    Problem::for_status(StatusCode::SERVICE_UNAVAILABLE).into_response()
}

fn unknown_reference() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "webhook-unknown-payment",
        "Unknown payment",
        "no payment matches the webhook's reference",
    )
}

/// The result of applying a verified delivery.
#[derive(Debug)]
enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    UnknownPayment,
    Contradicts(&'static str),
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let ok = |status: &str| {
            (StatusCode::OK, Json(serde_json::json!({"status": status}))).into_response()
        };
        match self {
            Outcome::Applied => ok("applied"),
            Outcome::Duplicate => ok("duplicate"),
            Outcome::Ignored => ok("ignored"),
            Outcome::UnknownPayment => unknown_reference(),
            Outcome::Contradicts(why) => problem(
                StatusCode::CONFLICT,
                "webhook-conflict",
                "Webhook contradicts the ledger",
                why,
            ),
        }
    }
}

/// One transaction: receipt, then the effect (see the module docs).
async fn apply(
    pool: &PgPool,
    webhook_id: &str,
    event_type: &str,
    payment_id: Option<PaymentId>,
    captured: Option<&Captured>,
) -> Result<Outcome, LedgerError> {
    let mut tx = pool.begin().await?;
    let first = sqlx::query(
        "INSERT INTO webhook_receipts (webhook_id, event_type, payment_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(webhook_id)
    .bind(event_type)
    .bind(payment_id.map(|p| p.0))
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !first {
        return Ok(Outcome::Duplicate);
    }
    let (Some(id), Some(c)) = (payment_id, captured) else {
        tx.commit().await?;
        tracing::info!(
            webhook_id,
            event_type,
            "webhook type not handled; acknowledged"
        );
        return Ok(Outcome::Ignored);
    };
    // Rolling back (dropping `tx`) also removes the receipt: a refused delivery may come again.
    let Some(current) = ledger::load(&mut tx, id).await? else {
        tracing::warn!(webhook_id, payment_id = %id, "capture webhook for an unknown payment");
        return Ok(Outcome::UnknownPayment);
    };
    let contradiction = if current.psp_authorization_id.as_deref() != Some(&c.authorization_id) {
        Some("the authorization does not match the payment's")
    } else if current.amount.minor != c.amount_minor
        || current.amount.currency.as_str() != c.currency
    {
        Some("the amount does not match the payment's")
    } else {
        match current.status {
            // The webhook may overtake billing's own CaptureRequested (the provider answers
            // 202 and sends the webhook right away): the provider's word settles it.
            PaymentStatus::Authorized | PaymentStatus::CapturePending => None,
            PaymentStatus::Captured => {
                // Another delivery id for the same capture: nothing more to do.
                tx.commit().await?;
                return Ok(Outcome::Applied);
            }
            _ => Some("the payment is not in a capturable state"),
        }
    };
    if let Some(why) = contradiction {
        tracing::error!(webhook_id, payment_id = %id, status = current.status.as_str(), why,
            "capture webhook contradicts the ledger");
        return Ok(Outcome::Contradicts(why));
    }
    let meta = serde_json::json!({"webhook_id": webhook_id});
    let event = PaymentEvent::PaymentCaptured {
        webhook_id: webhook_id.to_owned(),
    };
    ledger::record(&mut tx, id, Some(&current), &[event], &meta).await?;
    tx.commit().await?;
    Ok(Outcome::Applied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S1: &str = "whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6";
    const S2: &str = "whsec_PAf8iVvpMPdIeZajLlzcZ/uiE0NDSRct";

    fn verifier() -> Verifier {
        Verifier::new(&WebhookConfig {
            secrets: vec![S1.into(), S2.into()],
            tolerance: Duration::from_secs(300),
            receipts_kept: receipts_kept(),
        })
        .unwrap()
    }

    fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
        SigningKey::parse(secret).unwrap().sign(id, timestamp, body)
    }

    fn headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        h
    }

    #[test]
    fn any_listed_secret_and_any_offered_signature_verifies() {
        let v = verifier();
        let body = br#"{"type":"x","data":{}}"#;
        let good = sign(S2, "msg_1", 1000, body);
        let h = headers("msg_1", 1000, &format!("v1,AAAA {good}"));
        assert_eq!(v.verify(&h, body, 1000).unwrap(), "msg_1");
    }

    #[test]
    fn a_changed_byte_a_stale_or_future_timestamp_is_refused() {
        let v = verifier();
        let body = br#"{"type":"x","data":{}}"#;
        let sig = sign(S1, "msg_1", 1000, body);
        let h = headers("msg_1", 1000, &sig);
        assert_eq!(
            v.verify(&h, br#"{"type":"y","data":{}}"#, 1000),
            Err(Rejected::Signature)
        );
        assert_eq!(v.verify(&h, body, 1000 + 301), Err(Rejected::Stale));
        assert_eq!(v.verify(&h, body, 1000 - 301), Err(Rejected::Stale));
        let unknown = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_1",
            1000,
            body,
        );
        assert_eq!(
            v.verify(&headers("msg_1", 1000, &unknown), body, 1000),
            Err(Rejected::Signature)
        );
    }

    #[test]
    fn secrets_come_as_a_list_or_one_separated_string() {
        let c: WebhookConfig = serde_json::from_value(serde_json::json!({
            "secrets": format!("{S1}, {S2}"), "tolerance": "5m"
        }))
        .unwrap();
        assert_eq!(c.secrets.len(), 2);
        assert!(c.validate().is_ok());
        let bad: WebhookConfig = serde_json::from_value(serde_json::json!({
            "secrets": ["nope"], "tolerance": "5m"
        }))
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("webhook.secrets") && !err.contains("nope"),
            "{err}"
        );
    }
}
