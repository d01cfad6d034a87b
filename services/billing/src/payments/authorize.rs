//! `Authorize` (P13 on the command side): create the payment, ask the provider, record the
//! outcome and the key's answer together.
//!
//! The payment id is derived from the idempotency key, and `AuthorizationRequested` is
//! recorded *before* the provider is called: a call that fails on the way (provider down,
//! deadline) leaves a payment that a retry with the same key resumes, sending the provider
//! the same key of its own, so a resumed saga never authorizes twice. Must not break: the
//! request is recorded before the provider call, never after.

use tokio::time::Instant;

use super::error::busy;
use super::keys::{Call, Claim, Completes, Scope};
use super::{AuthorizeCommand, MAX_CONFLICTS, PaymentError, Payments};
use crate::ledger::{self, LedgerError, Payment, PaymentEvent, PaymentId, PaymentStatus};
use crate::psp::{AuthorizeRequest, PspError};

impl Payments {
    /// `Authorize`: creates the payment (id derived from the key) and asks the provider.
    pub async fn authorize(
        &self,
        cmd: &AuthorizeCommand,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let hash = keel_pg::idempotency::fingerprint(&[
            cmd.order_id.0.as_bytes(),
            &cmd.amount.minor.to_be_bytes(),
            cmd.amount.currency.as_str().as_bytes(),
            cmd.payment_token.expose().as_bytes(),
        ]);
        let call = Call {
            scope: Scope::Authorize,
            key: &cmd.idempotency_key,
        };
        if let Claim::Replay(p) = self.claim(call, &hash, deadline).await? {
            return Ok(p);
        }
        let result = self.authorize_claimed(call, cmd, deadline).await;
        self.release_on_error(call, result).await
    }

    async fn authorize_claimed(
        &self,
        call: Call<'_>,
        cmd: &AuthorizeCommand,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let id = ledger::payment_id_for_authorize_key(call.key);
        // Set once the provider authorized: if the stream turns out voided meanwhile (a
        // compensation abandoned it), that authorization must not be left hanging.
        let mut authorized_at_psp: Option<String> = None;
        for _ in 0..MAX_CONFLICTS {
            let current = match self.load(id).await? {
                Some(p) => {
                    if p.order_id != cmd.order_id || p.amount != cmd.amount {
                        return Err(PaymentError::FailedPrecondition(
                            "the idempotency key belongs to another payment".to_owned(),
                        ));
                    }
                    p
                }
                None => {
                    let requested = PaymentEvent::AuthorizationRequested {
                        order_id: cmd.order_id,
                        amount_minor: cmd.amount.minor,
                        currency: cmd.amount.currency,
                    };
                    // Not the answer yet: the provider is asked next.
                    match self
                        .record(call, id, None, requested, Completes::Nothing)
                        .await
                    {
                        Ok(p) => p,
                        Err(LedgerError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if current.status != PaymentStatus::AuthorizationPending {
                // The outcome is already recorded (an earlier attempt, or a compensation).
                if current.status == PaymentStatus::Voided
                    && let Some(auth) = authorized_at_psp.take()
                {
                    self.void_orphan(id, &auth, deadline).await;
                }
                self.complete(call, &current).await?;
                return Ok(current);
            }
            let request = AuthorizeRequest {
                amount_minor: cmd.amount.minor,
                currency: cmd.amount.currency.as_str(),
                token: &cmd.payment_token,
                reference: id.to_string(),
            };
            let event = match self
                .psp
                .authorize(&Scope::Authorize.psp_key(id), &request, deadline)
                .await
            {
                Ok(auth) => {
                    authorized_at_psp = Some(auth.id.clone());
                    PaymentEvent::PaymentAuthorized {
                        psp_authorization_id: auth.id,
                    }
                }
                Err(PspError::Declined { code }) => PaymentEvent::PaymentDeclined {
                    reason: code.as_str().to_owned(),
                },
                Err(e) => return Err(e.into()),
            };
            match self
                .record(call, id, Some(&current), event, Completes::WithPayment)
                .await
            {
                Ok(p) => return Ok(p),
                Err(LedgerError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(busy())
    }

    /// Best effort: voids an authorization the provider made for a payment billing has
    /// already voided (abandoned). Failures are logged; the provider's hold lapses anyway.
    async fn void_orphan(&self, id: PaymentId, authorization_id: &str, deadline: Instant) {
        if let Err(e) = self
            .psp
            .void(&Scope::Void.psp_key(id), authorization_id, deadline)
            .await
        {
            tracing::warn!(payment_id = %id, authorization_id, error = %e,
                "could not void an authorization that arrived after its payment was voided");
        }
    }
}
