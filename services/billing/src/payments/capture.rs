//! `Capture`: ask the provider to capture an authorized payment and record that it is on its
//! way (`CaptureRequested`); the provider's signed webhook confirms it later
//! (`crate::webhook`).
//!
//! Idempotent by state as well as by key: a payment already capture-pending or captured is
//! answered as it is, and a provider that says the capture is already on its way (its 409
//! names the authorization's status) is recorded as what billing missed. Must not break: the
//! webhook may overtake the command; a version conflict reloads and lets the state answer.

use tokio::time::Instant;

use super::error::{busy, wrong_state};
use super::keys::{Call, Claim, Completes, Scope};
use super::{MAX_CONFLICTS, PaymentError, Payments};
use crate::ledger::{LedgerError, Payment, PaymentEvent, PaymentId, PaymentStatus};
use crate::psp::{AuthorizationStatus, PspError};

impl Payments {
    /// `Capture`: asks the provider to capture; its webhook confirms later.
    pub async fn capture(
        &self,
        idempotency_key: &str,
        id: PaymentId,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let hash = keel_pg::idempotency::fingerprint(&[id.0.as_bytes()]);
        let call = Call {
            scope: Scope::Capture,
            key: idempotency_key,
        };
        if let Claim::Replay(p) = self.claim(call, &hash, deadline).await? {
            return Ok(p);
        }
        let result = self.capture_claimed(call, id, deadline).await;
        self.release_on_error(call, result).await
    }

    async fn capture_claimed(
        &self,
        call: Call<'_>,
        id: PaymentId,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        for _ in 0..MAX_CONFLICTS {
            let current = self.load(id).await?.ok_or(PaymentError::NotFound)?;
            let auth = match (current.status, &current.psp_authorization_id) {
                (PaymentStatus::Authorized, Some(auth)) => auth.clone(),
                (PaymentStatus::CapturePending | PaymentStatus::Captured, _) => {
                    // Capture is idempotent by state: already on its way or done.
                    self.complete(call, &current).await?;
                    return Ok(current);
                }
                (status, _) => return Err(wrong_state("capture", status)),
            };
            match self
                .psp
                .capture(&Scope::Capture.psp_key(id), &auth, deadline)
                .await
            {
                Ok(_) => {}
                // Already on its way at the provider: record what billing missed.
                Err(PspError::Conflict {
                    status:
                        Some(AuthorizationStatus::CapturePending | AuthorizationStatus::Captured),
                }) => {}
                Err(e) => return Err(e.into()),
            }
            let event = PaymentEvent::CaptureRequested {};
            match self
                .record(call, id, Some(&current), event, Completes::WithPayment)
                .await
            {
                Ok(p) => return Ok(p),
                // E.g. the capture webhook won the race: reload, and the state answers.
                Err(LedgerError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(busy())
    }
}
