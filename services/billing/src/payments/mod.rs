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

pub mod grpc;

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use keel_pg::idempotency::{self, Begin, Timing};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::ledger::{
    self, LedgerError, Money, OrderId, Payment, PaymentEvent, PaymentId, PaymentStatus,
};
use crate::psp::{AuthorizeRequest, PspClient, PspError};

/// `[idempotency]`: how long keys are kept and when an unfinished one counts as abandoned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a completed key answers repeats (checkout's sagas retry within hours).
    #[serde(with = "keel_config::duration")]
    pub ttl: Duration,
    /// After how long a key left in progress (a crashed billing) may be taken over. Must
    /// exceed `grpc.max_deadline`: a live call never runs longer than that.
    #[serde(with = "keel_config::duration")]
    pub stale_after: Duration,
    /// How often a call waiting behind a concurrent one with the same key looks again.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// How often expired keys are deleted (in batches of [`PURGE_BATCH`]).
    #[serde(with = "keel_config::duration")]
    pub purge_interval: Duration,
}

/// Keys deleted per statement by the purge: short locks, short WAL bursts.
pub const PURGE_BATCH: i64 = 1000;

/// Deletes expired idempotency keys every `interval` until `stop`, so the table holds about
/// one `ttl` of keys instead of growing forever. A failed round is logged and retried next
/// interval.
pub fn spawn_purge(
    pool: PgPool,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
            let mut purged = 0;
            loop {
                let round = async {
                    let mut conn = pool.acquire().await?;
                    idempotency::purge_expired(&mut conn, PURGE_BATCH).await
                };
                match round.await {
                    Ok(n) => {
                        purged += n;
                        if n < PURGE_BATCH.unsigned_abs() || stop.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "idempotency key purge failed");
                        break;
                    }
                }
            }
            if purged > 0 {
                tracing::info!(purged, "expired idempotency keys purged");
            }
        }
    })
}

use serde::Deserialize;

impl Validate for IdempotencyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "idempotency.ttl (s)",
            self.ttl.as_secs(),
            60,
            30 * 24 * 3600,
        )?;
        ensure_range(
            "idempotency.stale_after (ms)",
            ms(self.stale_after),
            1,
            3_600_000,
        )?;
        ensure_range(
            "idempotency.poll_interval (ms)",
            ms(self.poll_interval),
            1,
            10_000,
        )?;
        ensure_range(
            "idempotency.purge_interval (ms)",
            ms(self.purge_interval),
            1,
            86_400_000,
        )
    }
}

/// What a command can fail with; [`grpc`] maps each to its status code.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("payment not found")]
    NotFound,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or a broken database; details are logged, not returned.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<LedgerError> for PaymentError {
    fn from(e: LedgerError) -> Self {
        match e {
            // The pool could not give a connection in time: overload or a database outage,
            // both worth a retry.
            LedgerError::Db(sqlx::Error::PoolTimedOut) => {
                Self::Unavailable("database unavailable".to_owned())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for PaymentError {
    fn from(e: sqlx::Error) -> Self {
        LedgerError::Db(e).into()
    }
}

impl From<keel_pg::PgError> for PaymentError {
    fn from(e: keel_pg::PgError) -> Self {
        match e {
            keel_pg::PgError::Sqlx(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

fn from_psp(e: PspError) -> PaymentError {
    match e {
        PspError::Declined { code } => {
            PaymentError::FailedPrecondition(format!("declined by the provider: {code}"))
        }
        PspError::Conflict { .. } => PaymentError::FailedPrecondition(
            "the payment provider refused the change in the authorization's state".to_owned(),
        ),
        PspError::NotFound => {
            PaymentError::Internal("the provider does not know the authorization".to_owned())
        }
        PspError::Rejected { status } => PaymentError::InvalidArgument(format!(
            "the payment provider rejected the request (HTTP {status})"
        )),
        PspError::Unavailable { .. } | PspError::Protocol(_) => {
            PaymentError::Unavailable("the payment provider is unavailable".to_owned())
        }
        PspError::Timeout => {
            PaymentError::DeadlineExceeded("the payment provider timed out".to_owned())
        }
        PspError::DeadlineExceeded => PaymentError::DeadlineExceeded(
            "deadline exceeded waiting for the payment provider".to_owned(),
        ),
    }
}

/// A validated `Authorize`.
#[derive(Debug, Clone)]
pub struct AuthorizeCommand {
    pub idempotency_key: String,
    pub order_id: OrderId,
    pub amount: Money,
    pub payment_token: String,
}

/// Scopes of the idempotency keys: one per RPC, so the same key string used for two
/// methods is two keys.
const AUTHORIZE: &str = "billing.Authorize";
const CAPTURE: &str = "billing.Capture";
const VOID: &str = "billing.Void";

/// How often one command reloads and decides again after losing a version race.
const MAX_CONFLICTS: usize = 3;

/// The provider's idempotency key for one operation on one payment.
fn psp_key(id: PaymentId, operation: &str) -> String {
    format!("billing:{id}:{operation}")
}

/// The commands, with what they need.
#[derive(Debug, Clone)]
pub struct Payments {
    pool: PgPool,
    psp: PspClient,
    idempotency: IdempotencyConfig,
}

enum Claim<A> {
    New,
    Replay(A),
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

    /// `Authorize`: creates the payment (id derived from the key) and asks the provider.
    pub async fn authorize(
        &self,
        cmd: &AuthorizeCommand,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let hash = idempotency::fingerprint(&[
            cmd.order_id.0.as_bytes(),
            &cmd.amount.minor.to_be_bytes(),
            cmd.amount.currency.as_str().as_bytes(),
            cmd.payment_token.as_bytes(),
        ]);
        let key = cmd.idempotency_key.as_str();
        if let Claim::Replay(p) = self.claim(AUTHORIZE, key, &hash, deadline).await? {
            return Ok(p);
        }
        let result = self.authorize_claimed(cmd, deadline).await;
        self.release_on_error(AUTHORIZE, key, result).await
    }

    async fn authorize_claimed(
        &self,
        cmd: &AuthorizeCommand,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let key = cmd.idempotency_key.as_str();
        let id = ledger::payment_id_for_authorize_key(key);
        let meta = json!({"rpc": "Authorize", "idempotency_key": key});
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
                    match self.record(id, None, requested, &meta, None).await {
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
                self.complete(AUTHORIZE, key, &current).await?;
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
                .authorize(&psp_key(id, "authorize"), &request, deadline)
                .await
            {
                Ok(auth) => {
                    authorized_at_psp = Some(auth.id.clone());
                    PaymentEvent::PaymentAuthorized {
                        psp_authorization_id: auth.id,
                    }
                }
                Err(PspError::Declined { code }) => PaymentEvent::PaymentDeclined { reason: code },
                Err(e) => return Err(from_psp(e)),
            };
            match self
                .record(id, Some(&current), event, &meta, Some((AUTHORIZE, key)))
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
            .void(&psp_key(id, "void"), authorization_id, deadline)
            .await
        {
            tracing::warn!(payment_id = %id, authorization_id, error = %e,
                "could not void an authorization that arrived after its payment was voided");
        }
    }

    /// `Capture`: asks the provider to capture; its webhook confirms later.
    pub async fn capture(
        &self,
        idempotency_key: &str,
        id: PaymentId,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let hash = idempotency::fingerprint(&[id.0.as_bytes()]);
        if let Claim::Replay(p) = self
            .claim(CAPTURE, idempotency_key, &hash, deadline)
            .await?
        {
            return Ok(p);
        }
        let result = self.capture_claimed(idempotency_key, id, deadline).await;
        self.release_on_error(CAPTURE, idempotency_key, result)
            .await
    }

    async fn capture_claimed(
        &self,
        key: &str,
        id: PaymentId,
        deadline: Instant,
    ) -> Result<Payment, PaymentError> {
        let meta = json!({"rpc": "Capture", "idempotency_key": key});
        for _ in 0..MAX_CONFLICTS {
            let current = self.load(id).await?.ok_or(PaymentError::NotFound)?;
            let auth = match (current.status, &current.psp_authorization_id) {
                (PaymentStatus::Authorized, Some(auth)) => auth.clone(),
                (PaymentStatus::CapturePending | PaymentStatus::Captured, _) => {
                    // Capture is idempotent by state: already on its way or done.
                    self.complete(CAPTURE, key, &current).await?;
                    return Ok(current);
                }
                (status, _) => return Err(wrong_state("capture", status)),
            };
            match self
                .psp
                .capture(&psp_key(id, "capture"), &auth, deadline)
                .await
            {
                Ok(_) => {}
                // Already on its way at the provider: record what billing missed.
                Err(PspError::Conflict { status: Some(s) })
                    if s == "capture_pending" || s == "captured" => {}
                Err(e) => return Err(from_psp(e)),
            }
            let event = PaymentEvent::CaptureRequested {};
            match self
                .record(id, Some(&current), event, &meta, Some((CAPTURE, key)))
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

    /// `Void`: releases the authorization (the saga's compensation) of one payment, or of
    /// every payment of an order whose payment id the caller never learned.
    pub async fn void(
        &self,
        idempotency_key: &str,
        target: VoidTarget,
        deadline: Instant,
    ) -> Result<VoidAnswer, PaymentError> {
        let hash = match target {
            VoidTarget::Payment(id) => idempotency::fingerprint(&[id.0.as_bytes()]),
            VoidTarget::Order(order) => idempotency::fingerprint(&[b"order", order.0.as_bytes()]),
        };
        if let Claim::Replay(a) = self.claim(VOID, idempotency_key, &hash, deadline).await? {
            return Ok(a);
        }
        let result = match target {
            VoidTarget::Payment(id) => self
                .void_one(idempotency_key, id, deadline, true)
                .await
                .map(VoidAnswer::Payment),
            VoidTarget::Order(order) => self.void_order(idempotency_key, order, deadline).await,
        };
        self.release_on_error(VOID, idempotency_key, result).await
    }

    /// Voids what still holds money among `order`'s payments; completes the key at the end.
    async fn void_order(
        &self,
        key: &str,
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
            last = Some(self.void_one(key, PaymentId(*id), deadline, false).await?);
        }
        // Deterministic under retries: the order's only payment if it is voided now, else a
        // summary (voiding nothing, or several payments).
        let answer = match last {
            Some(p) if ids.len() == 1 && p.status == PaymentStatus::Voided => {
                VoidAnswer::Payment(p)
            }
            _ => VoidAnswer::Order { order_id: order },
        };
        self.complete(VOID, key, &answer).await?;
        Ok(answer)
    }

    /// Voids one payment (idempotent by state); with `complete`, stores the answer for `key`
    /// in the same transaction. Returns the payment afterwards.
    async fn void_one(
        &self,
        key: &str,
        id: PaymentId,
        deadline: Instant,
        complete: bool,
    ) -> Result<Payment, PaymentError> {
        let meta = json!({"rpc": "Void", "idempotency_key": key});
        let completion = complete.then_some((VOID, key));
        for _ in 0..MAX_CONFLICTS {
            let current = self.load(id).await?.ok_or(PaymentError::NotFound)?;
            let event = match (current.status, &current.psp_authorization_id) {
                (PaymentStatus::Authorized, Some(auth)) => {
                    match self.psp.void(&psp_key(id, "void"), auth, deadline).await {
                        Ok(_) => {}
                        // Already voided at the provider: record what billing missed.
                        Err(PspError::Conflict { status: Some(s) }) if s == "voided" => {}
                        Err(e) => return Err(from_psp(e)),
                    }
                    PaymentEvent::PaymentVoided { at_provider: true }
                }
                // Never completed at the provider as far as billing knows: abandon it here.
                (PaymentStatus::AuthorizationPending, _) => {
                    PaymentEvent::PaymentVoided { at_provider: false }
                }
                // Nothing to release: compensation succeeds without an effect.
                (PaymentStatus::Declined | PaymentStatus::Voided, _) => {
                    if complete {
                        self.complete(VOID, key, &VoidAnswer::Payment(current.clone()))
                            .await?;
                    }
                    return Ok(current);
                }
                (status, _) => return Err(wrong_state("void", status)),
            };
            let answer = |p: &Payment| VoidAnswer::Payment(p.clone());
            match self
                .record_with(id, Some(&current), event, &meta, completion, answer)
                .await
            {
                Ok(p) => return Ok(p),
                Err(LedgerError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(busy())
    }

    async fn load(&self, id: PaymentId) -> Result<Option<Payment>, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        ledger::load(&mut conn, id).await
    }

    /// Records `event` and, when `complete` names a key, stores the payment as its answer —
    /// one transaction.
    async fn record(
        &self,
        id: PaymentId,
        before: Option<&Payment>,
        event: PaymentEvent,
        meta: &serde_json::Value,
        complete: Option<(&str, &str)>,
    ) -> Result<Payment, LedgerError> {
        self.record_with(id, before, event, meta, complete, Payment::clone)
            .await
    }

    /// [`Self::record`] with the stored answer made from the payment by `answer`.
    async fn record_with<A: Serialize>(
        &self,
        id: PaymentId,
        before: Option<&Payment>,
        event: PaymentEvent,
        meta: &serde_json::Value,
        complete: Option<(&str, &str)>,
        answer: impl Fn(&Payment) -> A,
    ) -> Result<Payment, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let after = ledger::record(&mut tx, id, before, &[event], meta).await?;
        if let Some((scope, key)) = complete {
            let stored = to_json(&answer(&after)).map_err(|source| LedgerError::Decode {
                stream_id: id,
                version: after.version,
                source,
            })?;
            idempotency::complete(&mut tx, scope, key, 0, &stored).await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    /// Stores `answer` for `key` when the command changed nothing.
    async fn complete(
        &self,
        scope: &str,
        key: &str,
        answer: &impl Serialize,
    ) -> Result<(), PaymentError> {
        let stored = to_json(answer).map_err(|e| PaymentError::Internal(e.to_string()))?;
        let mut conn = self.pool.acquire().await?;
        idempotency::complete(&mut conn, scope, key, 0, &stored).await?;
        Ok(())
    }

    async fn claim<A: DeserializeOwned>(
        &self,
        scope: &str,
        key: &str,
        hash: &[u8],
        deadline: Instant,
    ) -> Result<Claim<A>, PaymentError> {
        let timing = Timing {
            ttl: self.idempotency.ttl,
            // Two-phase use: `begin` commits at once, so a holder of the row lock is another
            // `begin`, never a whole command.
            wait: self.idempotency.poll_interval,
            stale_after: self.idempotency.stale_after,
        };
        loop {
            let mut tx = self.pool.begin().await?;
            match idempotency::begin(&mut tx, scope, key, hash, timing).await? {
                Begin::New => {
                    tx.commit().await?;
                    return Ok(Claim::New);
                }
                Begin::Replay { response, .. } => {
                    tx.rollback().await?;
                    return serde_json::from_value(response)
                        .map(Claim::Replay)
                        .map_err(|e| PaymentError::Internal(format!("stored answer: {e}")));
                }
                Begin::Mismatch => {
                    return Err(PaymentError::FailedPrecondition(
                        "the idempotency key was already used with a different request".to_owned(),
                    ));
                }
                Begin::InProgress => {
                    tx.rollback().await?;
                    let pause = self.idempotency.poll_interval;
                    if Instant::now() + pause >= deadline {
                        return Err(PaymentError::DeadlineExceeded(
                            "a call with this idempotency key is still in progress".to_owned(),
                        ));
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// On failure, forgets the in-progress key so that a retry runs the command again
    /// (resuming the payment) instead of waiting for a call that has ended. Only failures
    /// release: a success was completed in its own transaction.
    async fn release_on_error<A>(
        &self,
        scope: &str,
        key: &str,
        result: Result<A, PaymentError>,
    ) -> Result<A, PaymentError> {
        if result.is_err() {
            // Billing-local: keel_pg::idempotency has no release yet (see the spec's Changes).
            let released = sqlx::query(
                "DELETE FROM idempotency_keys
                  WHERE scope = $1 AND key = $2 AND status_code IS NULL",
            )
            .bind(scope)
            .bind(key)
            .execute(&self.pool)
            .await;
            if let Err(e) = released {
                // The key stays in progress until `idempotency.stale_after`; retries wait.
                tracing::warn!(scope, error = %e, "could not release an idempotency key");
            }
        }
        result
    }
}

fn to_json(answer: &impl Serialize) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(answer)
}

fn wrong_state(operation: &str, status: PaymentStatus) -> PaymentError {
    PaymentError::FailedPrecondition(format!(
        "cannot {operation} a payment in state {}",
        status.as_str()
    ))
}

fn busy() -> PaymentError {
    PaymentError::Unavailable("the payment is changing concurrently; retry".to_owned())
}
