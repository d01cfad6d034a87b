//! The payment aggregate: the ledger's events and the pure fold that turns a stream of events
//! into a [`Payment`] (P10). Its ids and money are the shared wire types of `keel_events`
//! (the payment id is also the stream id and the `reference` sent to the provider).
//!
//! [`apply`] is the *only* place that knows how an event changes a payment. The live path
//! (append, then update the projection in the same transaction) and `billing
//! rebuild-projections` both call it, which is why a rebuilt projection equals the live one.
//! Must not break: `apply` stays pure — no clock, no I/O, no defaults that depend on when it
//! runs. Everything it needs is in the event or in the recorded envelope (version, time).
//!
//! `apply` does not re-check business rules (the command side decided them before appending);
//! it only refuses what cannot be folded at all (a stream that does not start with
//! `AuthorizationRequested`), because the store must replay whatever history it holds.

use chrono::{DateTime, Utc};
use keel_events::payment;
pub use keel_events::{Currency, Money, OrderId, PaymentId};
use serde::{Deserialize, Serialize};

/// The payment id an `Authorize` with idempotency key `key` creates. Derived, not random,
/// so a retry after a failure (whose key was released) resumes the *same* payment and sends
/// the provider the same idempotency key: a resumed saga never authorizes twice.
pub fn payment_id_for_authorize_key(key: &str) -> PaymentId {
    let hash = keel_pg::idempotency::fingerprint(&[b"keel.billing.authorize", key.as_bytes()]);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    // A version-8 (custom) UUID: unambiguous that it is derived, not random.
    PaymentId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// Where a payment is. `AuthorizationPending` exists only inside billing: the intent is
/// recorded before the provider is called, so a failed call leaves a payment that a retry
/// with the same key resumes (the gRPC API shows it as `PAYMENT_STATUS_UNSPECIFIED`).
///
/// Stored through one mapping, [`PaymentStatus::as_str`]: the `payments.status` column (sqlx
/// binds and decodes the enum itself, below) and the stored answers of idempotency keys
/// (serde, through the same text). Renaming a text needs a migration of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum PaymentStatus {
    AuthorizationPending,
    Authorized,
    Declined,
    CapturePending,
    Captured,
    Voided,
}

impl PaymentStatus {
    pub const ALL: [Self; 6] = [
        Self::AuthorizationPending,
        Self::Authorized,
        Self::Declined,
        Self::CapturePending,
        Self::Captured,
        Self::Voided,
    ];

    /// The text stored in `payments.status` (the one mapping).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationPending => "AUTHORIZATION_PENDING",
            Self::Authorized => "AUTHORIZED",
            Self::Declined => "DECLINED",
            Self::CapturePending => "CAPTURE_PENDING",
            Self::Captured => "CAPTURED",
            Self::Voided => "VOIDED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl From<PaymentStatus> for &'static str {
    fn from(s: PaymentStatus) -> Self {
        s.as_str()
    }
}

impl TryFrom<String> for PaymentStatus {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s).ok_or_else(|| format!("unknown payment status {s:?}"))
    }
}

keel_pg::text_column!(PaymentStatus, "payment status");

/// A payment as the fold of its events: the projection row, and what commands decide on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub amount: Money,
    pub status: PaymentStatus,
    pub psp_authorization_id: Option<String>,
    pub decline_reason: Option<String>,
    /// The version of the last event folded in (the stream's length).
    pub version: i64,
    /// When the last event folded in was recorded (not "now": rebuild must reproduce it).
    pub updated_at: DateTime<Utc>,
}

/// What can happen to a payment. Stored as `event_type` + `data` in `payment_events`
/// (adjacently tagged), so the names below are part of the stored format: renaming a variant
/// needs a migration of old events (or an alias), never just a code change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum PaymentEvent {
    /// Billing is about to ask the provider; recorded first so the payment id is durable.
    AuthorizationRequested {
        order_id: OrderId,
        amount_minor: i64,
        currency: Currency,
    },
    PaymentAuthorized {
        psp_authorization_id: String,
    },
    PaymentDeclined {
        reason: String,
    },
    /// The provider accepted the capture (202); its webhook confirms it later.
    CaptureRequested {},
    /// The provider's signed webhook `webhook_id` confirmed the capture.
    PaymentCaptured {
        webhook_id: String,
    },
    /// `at_provider`: false when billing abandoned an authorization that never completed
    /// (nothing to void at the provider as far as billing knows).
    PaymentVoided {
        at_provider: bool,
    },
}

impl PaymentEvent {
    /// The stored `event_type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::AuthorizationRequested { .. } => "AuthorizationRequested",
            Self::PaymentAuthorized { .. } => "PaymentAuthorized",
            Self::PaymentDeclined { .. } => "PaymentDeclined",
            Self::CaptureRequested {} => "CaptureRequested",
            Self::PaymentCaptured { .. } => "PaymentCaptured",
            Self::PaymentVoided { .. } => "PaymentVoided",
        }
    }

    /// The public event (`keel_events::payment`) this one is published as, if any.
    /// `AuthorizationRequested` is internal bookkeeping and is not published.
    pub fn public_type(&self) -> Option<payment::EventType> {
        match self {
            Self::AuthorizationRequested { .. } => None,
            Self::PaymentAuthorized { .. } => Some(payment::EventType::Authorized),
            Self::PaymentDeclined { .. } => Some(payment::EventType::Declined),
            Self::CaptureRequested {} => Some(payment::EventType::CaptureRequested),
            Self::PaymentCaptured { .. } => Some(payment::EventType::Captured),
            Self::PaymentVoided { .. } => Some(payment::EventType::Voided),
        }
    }
}

/// An event as the store holds it: with its position in the stream and its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub stream_id: PaymentId,
    pub version: i64,
    pub event: PaymentEvent,
    pub recorded_at: DateTime<Utc>,
}

/// A stream that cannot be folded: a bug or a hand-edited store, never a user error.
#[derive(Debug, thiserror::Error)]
#[error("payment stream {stream_id} cannot be folded at version {version}: {reason}")]
pub struct FoldError {
    pub stream_id: PaymentId,
    pub version: i64,
    pub reason: &'static str,
}

/// The fold: the payment after `recorded`, given the payment before it (`None` before the
/// first event). Pure.
pub fn apply(state: Option<Payment>, recorded: &Recorded) -> Result<Payment, FoldError> {
    let fail = |reason| FoldError {
        stream_id: recorded.stream_id,
        version: recorded.version,
        reason,
    };
    let mut p = match state {
        None => match &recorded.event {
            PaymentEvent::AuthorizationRequested {
                order_id,
                amount_minor,
                currency,
            } => Payment {
                payment_id: recorded.stream_id,
                order_id: *order_id,
                amount: Money {
                    minor: *amount_minor,
                    currency: *currency,
                },
                status: PaymentStatus::AuthorizationPending,
                psp_authorization_id: None,
                decline_reason: None,
                version: 0,
                updated_at: recorded.recorded_at,
            },
            _ => return Err(fail("the first event is not AuthorizationRequested")),
        },
        Some(mut p) => {
            match &recorded.event {
                PaymentEvent::AuthorizationRequested { .. } => {
                    return Err(fail("AuthorizationRequested after the first event"));
                }
                PaymentEvent::PaymentAuthorized {
                    psp_authorization_id,
                } => {
                    p.status = PaymentStatus::Authorized;
                    p.psp_authorization_id = Some(psp_authorization_id.clone());
                }
                PaymentEvent::PaymentDeclined { reason } => {
                    p.status = PaymentStatus::Declined;
                    p.decline_reason = Some(reason.clone());
                }
                PaymentEvent::CaptureRequested {} => p.status = PaymentStatus::CapturePending,
                PaymentEvent::PaymentCaptured { .. } => p.status = PaymentStatus::Captured,
                PaymentEvent::PaymentVoided { .. } => p.status = PaymentStatus::Voided,
            }
            p
        }
    };
    if recorded.version != p.version + 1 {
        return Err(fail("versions are not contiguous"));
    }
    p.version = recorded.version;
    p.updated_at = recorded.recorded_at;
    Ok(p)
}

/// Folds a whole stream (ordered by version). `None` for an empty stream.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a Recorded>,
) -> Result<Option<Payment>, FoldError> {
    events
        .into_iter()
        .try_fold(None, |state, r| apply(state, r).map(Some))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn rec(version: i64, event: PaymentEvent) -> Recorded {
        Recorded {
            stream_id: PaymentId(Uuid::nil()),
            version,
            event,
            recorded_at: DateTime::from_timestamp(1_700_000_000 + version, 0).unwrap(),
        }
    }

    fn requested() -> PaymentEvent {
        PaymentEvent::AuthorizationRequested {
            order_id: OrderId(Uuid::nil()),
            amount_minor: 1234,
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    #[test]
    fn fold_follows_the_happy_path() {
        let events = [
            rec(1, requested()),
            rec(
                2,
                PaymentEvent::PaymentAuthorized {
                    psp_authorization_id: "auth_1".into(),
                },
            ),
            rec(3, PaymentEvent::CaptureRequested {}),
            rec(
                4,
                PaymentEvent::PaymentCaptured {
                    webhook_id: "msg_1".into(),
                },
            ),
        ];
        let p = fold(&events).unwrap().unwrap();
        assert_eq!(p.status, PaymentStatus::Captured);
        assert_eq!(p.version, 4);
        assert_eq!(p.psp_authorization_id.as_deref(), Some("auth_1"));
        assert_eq!(p.updated_at, events[3].recorded_at);
    }

    #[test]
    fn fold_refuses_gaps_and_headless_streams() {
        assert!(fold(&[rec(1, PaymentEvent::CaptureRequested {})]).is_err());
        assert!(
            fold(&[
                rec(1, requested()),
                rec(3, PaymentEvent::CaptureRequested {})
            ])
            .is_err()
        );
    }

    #[test]
    fn events_round_trip_through_the_stored_format() {
        let e = PaymentEvent::CaptureRequested {};
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event_type": "CaptureRequested", "data": {}})
        );
        assert_eq!(serde_json::from_value::<PaymentEvent>(v).unwrap(), e);
        assert_eq!(e.event_type(), "CaptureRequested");
    }

    #[test]
    fn statuses_have_one_text_in_the_column_and_in_stored_answers() {
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_value(s).unwrap();
            assert_eq!(json, serde_json::json!(s.as_str()));
            assert_eq!(serde_json::from_value::<PaymentStatus>(json).unwrap(), s);
        }
        assert!(serde_json::from_value::<PaymentStatus>(serde_json::json!("NOPE")).is_err());
    }

    #[test]
    fn authorize_keys_derive_stable_distinct_ids() {
        let a = payment_id_for_authorize_key("saga-1:authorize");
        assert_eq!(a, payment_id_for_authorize_key("saga-1:authorize"));
        assert_ne!(a, payment_id_for_authorize_key("saga-2:authorize"));
    }
}
