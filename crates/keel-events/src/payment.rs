//! `billing.payment.*`: the events billing publishes (through its outbox, P02) when its
//! ledger records a public change of a payment (P10). Each carries the payment as it is after
//! the change. Billing's internal bookkeeping (the authorization request recorded before the
//! provider is called) is not published.
//!
//! Must not break: the routing keys and the `status` texts are the contract with consumers.

use serde::{Deserialize, Serialize};

use crate::{Currency, Money, OrderId, PaymentId};

pub const AUTHORIZED: &str = "billing.payment.authorized";
pub const DECLINED: &str = "billing.payment.declined";
pub const CAPTURE_REQUESTED: &str = "billing.payment.capture_requested";
pub const CAPTURED: &str = "billing.payment.captured";
pub const VOIDED: &str = "billing.payment.voided";

/// Which payment event: one per routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Authorized,
    Declined,
    CaptureRequested,
    Captured,
    Voided,
}

impl EventType {
    pub const ALL: [Self; 5] = [
        Self::Authorized,
        Self::Declined,
        Self::CaptureRequested,
        Self::Captured,
        Self::Voided,
    ];

    /// The routing key and envelope `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => AUTHORIZED,
            Self::Declined => DECLINED,
            Self::CaptureRequested => CAPTURE_REQUESTED,
            Self::Captured => CAPTURED,
            Self::Voided => VOIDED,
        }
    }

    /// The event type for a routing key, `None` if it is not a payment event.
    pub fn parse(event_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == event_type)
    }

    /// The payment's status after this event (the payload's `status`).
    pub fn status(self) -> Status {
        match self {
            Self::Authorized => Status::Authorized,
            Self::Declined => Status::Declined,
            Self::CaptureRequested => Status::CapturePending,
            Self::Captured => Status::Captured,
            Self::Voided => Status::Voided,
        }
    }
}

/// A payment's status as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Authorized,
    Declined,
    /// The provider accepted the capture; its webhook confirms it later.
    CapturePending,
    Captured,
    Voided,
}

impl Status {
    /// The wire text (`CAPTURE_PENDING`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "AUTHORIZED",
            Self::Declined => "DECLINED",
            Self::CapturePending => "CAPTURE_PENDING",
            Self::Captured => "CAPTURED",
            Self::Voided => "VOIDED",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` of every `billing.payment.*` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEvent {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub amount_minor: i64,
    pub currency: Currency,
    pub status: Status,
    /// Why the provider declined (`insufficient_funds`, ...), for declines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PaymentEvent {
    /// The payment's amount.
    pub fn amount(&self) -> Money {
        Money {
            minor: self.amount_minor,
            currency: self.currency,
        }
    }
}
