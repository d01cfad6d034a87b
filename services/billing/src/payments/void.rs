//! `Void`: the saga's compensation — release the authorization of one payment, or of every
//! payment of an order whose payment id the caller never learned.
//!
//! Idempotent by state, not only by key: voiding a declined or already voided payment
//! succeeds without an effect, and a payment whose authorization never completed
//! (`AUTHORIZATION_PENDING`) is voided locally (nothing is known to exist at the provider), so
//! a late retry of its `Authorize` cannot bring it back. A capture-pending or captured payment
//! cannot be voided: `FAILED_PRECONDITION`. Must not break: voiding by order answers the same
//! way however often it is retried (see [`Payments::void`]).

use tokio::time::Instant;

use super::error::{busy, wrong_state};
use super::keys::{Call, Claim, Completes, Scope};
use super::{MAX_CONFLICTS, PaymentError, Payments, VoidAnswer, VoidTarget};
use crate::ledger::{LedgerError, OrderId, Payment, PaymentEvent, PaymentId, PaymentStatus};
use crate::psp::{AuthorizationStatus, PspError};

impl Payments {
    /// `Void`: releases the authorization (the saga's compensation) of one payment, or of
    /// every payment of an order whose payment id the caller never learned.
    pub async fn void(
        &self,
        idempotency_key: &str,
        target: VoidTarget,
        deadline: Instant,
    ) -> Result<VoidAnswer, PaymentError> {
        let hash = match target {
            VoidTarget::Payment(id) => keel_pg::idempotency::fingerprint(&[id.0.as_bytes()]),
            VoidTarget::Order(order) => {
                keel_pg::idempotency::fingerprint(&[b"order", order.0.as_bytes()])
            }
        };
        let call = Call {
            scope: Scope::Void,
            key: idempotency_key,
        };
        if let Claim::Replay(a) = self.claim(call, &hash, deadline).await? {
            return Ok(a);
        }
        let result = match target {
            VoidTarget::Payment(id) => self
                .void_one(call, id, deadline, Completes::WithVoidAnswer)
                .await
                .map(VoidAnswer::Payment),
            VoidTarget::Order(order) => self.void_order(call, order, deadline).await,
        };
        self.release_on_error(call, result).await
    }

    /// Voids what still holds money among `order`'s payments; completes the key at the end.
    async fn void_order(
        &self,
        call: Call<'_>,
        order: OrderId,
        deadline: Instant,
    ) -> Result<VoidAnswer, PaymentError> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT payment_id FROM payments WHERE order_id = $1 ORDER BY payment_id",
        )
        .bind(order.0)
        .fetch_all(&self.pool)
        .await?;
        let mut last = None;
        for id in &ids {
            // The order's answer is stored once, below, not per payment.
            let voided = self
                .void_one(call, PaymentId(*id), deadline, Completes::Nothing)
                .await?;
            last = Some(voided);
        }
        // Deterministic under retries: the order's only payment if it is voided now, else a
        // summary (voiding nothing, or several payments).
        let answer = match last {
            Some(p) if ids.len() == 1 && p.status == PaymentStatus::Voided => {
                VoidAnswer::Payment(p)
            }
            _ => VoidAnswer::Order { order_id: order },
        };
        self.complete(call, &answer).await?;
        Ok(answer)
    }

    /// Voids one payment (idempotent by state), storing the key's answer as `completes` says
    /// in the same transaction. Returns the payment afterwards.
    async fn void_one(
        &self,
        call: Call<'_>,
        id: PaymentId,
        deadline: Instant,
        completes: Completes,
    ) -> Result<Payment, PaymentError> {
        for _ in 0..MAX_CONFLICTS {
            let current = self.load(id).await?.ok_or(PaymentError::NotFound)?;
            let event = match (current.status, &current.psp_authorization_id) {
                (PaymentStatus::Authorized, Some(auth)) => {
                    match self
                        .psp
                        .void(&Scope::Void.psp_key(id), auth, deadline)
                        .await
                    {
                        Ok(_) => {}
                        // Already voided at the provider: record what billing missed.
                        Err(PspError::Conflict {
                            status: Some(AuthorizationStatus::Voided),
                        }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    PaymentEvent::PaymentVoided { at_provider: true }
                }
                // Never completed at the provider as far as billing knows: abandon it here.
                (PaymentStatus::AuthorizationPending, _) => {
                    PaymentEvent::PaymentVoided { at_provider: false }
                }
                // Nothing to release: compensation succeeds without an effect.
                (PaymentStatus::Declined | PaymentStatus::Voided, _) => {
                    if let Some(answer) = completes.answer(&current) {
                        let stored = answer.map_err(|e| PaymentError::Internal(e.to_string()))?;
                        self.complete(call, &stored).await?;
                    }
                    return Ok(current);
                }
                (status, _) => return Err(wrong_state("void", status)),
            };
            match self
                .record(call, id, Some(&current), event, completes)
                .await
            {
                Ok(p) => return Ok(p),
                Err(LedgerError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(busy())
    }
}
