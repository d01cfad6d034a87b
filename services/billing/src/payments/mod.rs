//! The payment commands behind the gRPC API: Authorize, Capture, Void (P13 idempotency keys,
//! P10 ledger, the provider client).
//!
//! Every command follows the same shape:
//! 1. **claim the idempotency key** (`keel_pg::idempotency`, two-phase use): the first call
//!    with a key proceeds; a repeat with the same request gets the first call's answer; the
//!    same key with a different request is refused; a concurrent call with the same key waits
//!    (polling, within its deadline) for the first to finish and then gets its answer — so a
//!    hammer of identical calls makes one provider call and one event;
//! 2. **load the payment by folding its events** and decide from its state;
//! 3. **call the provider** with a key derived from the payment and the operation
//!    (`billing:<payment>:<op>`), so the provider dedupes whatever billing retries;
//! 4. **record** the outcome (event + projection + outbox) *and complete the key in the same
//!    transaction*: the stored answer and the effect commit together.
//!
//! A failure on the way (provider down or slow, deadline) releases the key instead of
//! storing an error, and leaves the payment where a retry with the same key resumes it:
//! `Authorize` records `AuthorizationRequested` before calling the provider and derives the
//! payment id from the key, so a retry continues the same payment with the same provider key.
//! If the stream moved meanwhile (a webhook, a concurrent command with another key), the
//! append fails with a version conflict and the command reloads and decides again.
//!
//! Void is the saga's compensation, so it is idempotent by state, not only by key: voiding a
//! declined or already voided payment succeeds without an effect, and voiding a payment whose
//! authorization never completed (`AUTHORIZATION_PENDING`) records it as voided locally
//! (nothing is known to exist at the provider to void) so that a late retry of the original
//! `Authorize` cannot bring it back; should that Authorize still be running and the provider
//! authorize after all, it finds the payment voided and voids the provider's authorization.
//! A caller whose Authorize timed out before it learned the payment id voids by order id:
//! every payment of the order that is `AUTHORIZED` or `AUTHORIZATION_PENDING` is voided as
//! above; voiding nothing is a success. A `CAPTURE_PENDING` or `CAPTURED` payment cannot be
//! voided (the provider refuses; releasing it is a refund, not in this step):
//! `FAILED_PRECONDITION`. Must not break: nothing here may call the provider twice for one
//! (payment, operation) with different idempotency keys.
//!
//! The modules, by concern: [`grpc`] (the API), `authorize`, `capture` and `void` (one
//! command each), [`keys`] (idempotency keys: claim, complete, release) and [`error`]
//! (what a command fails with). The shared steps — load, record — are here.

mod authorize;
mod capture;
pub mod error;
pub mod grpc;
pub mod keys;
mod void;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::ledger::{self, LedgerError, Money, OrderId, Payment, PaymentEvent, PaymentId};
use crate::psp::{PaymentToken, PspClient};

pub use error::PaymentError;
pub use keys::IdempotencyConfig;
use keys::{Call, Completes};

/// How often one command reloads and decides again after losing a version race.
const MAX_CONFLICTS: usize = 3;

/// A validated `Authorize`.
#[derive(Debug, Clone)]
pub struct AuthorizeCommand {
    pub idempotency_key: String,
    pub order_id: OrderId,
    pub amount: Money,
    /// Redacted in `Debug`.
    pub payment_token: PaymentToken,
}

/// What `Void` is asked to void.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoidTarget {
    Payment(PaymentId),
    /// Every payment of the order that still holds money (the caller's Authorize timed out
    /// and it never learned the payment id).
    Order(OrderId),
}

/// `Void`'s answer: the payment, or — voiding by order, unless the order has exactly one
/// payment and it is voided now — a summary that the order holds no money (`VOIDED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoidAnswer {
    Payment(Payment),
    Order { order_id: OrderId },
}

/// The commands, with what they need.
#[derive(Debug, Clone)]
pub struct Payments {
    pool: PgPool,
    psp: PspClient,
    idempotency: IdempotencyConfig,
}

impl Payments {
    pub fn new(pool: PgPool, psp: PspClient, idempotency: IdempotencyConfig) -> Self {
        Self {
            pool,
            psp,
            idempotency,
        }
    }

    /// `GetPayment`: the projection (read model).
    pub async fn get(&self, id: PaymentId) -> Result<Payment, PaymentError> {
        let mut conn = self.pool.acquire().await?;
        ledger::projection::get(&mut conn, id)
            .await?
            .ok_or(PaymentError::NotFound)
    }

    /// The payment as the fold of its events (the command side decides on this, not on the
    /// projection).
    async fn load(&self, id: PaymentId) -> Result<Option<Payment>, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        ledger::load(&mut conn, id).await
    }

    /// Records `event` on payment `id` (after `before`; `None` starts its stream) for `call`,
    /// and stores the key's answer as `completes` says — one transaction.
    async fn record(
        &self,
        call: Call<'_>,
        id: PaymentId,
        before: Option<&Payment>,
        event: PaymentEvent,
        completes: Completes,
    ) -> Result<Payment, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let after = ledger::record(&mut tx, id, before, &[event], &call.meta()).await?;
        if let Some(answer) = completes.answer(&after) {
            let stored = answer.map_err(|source| LedgerError::Decode {
                stream_id: id,
                version: after.version,
                source,
            })?;
            Self::complete_in(&mut tx, call, &stored).await?;
        }
        tx.commit().await?;
        Ok(after)
    }
}
