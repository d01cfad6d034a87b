//! The commands' idempotency keys (P13, two-phase use of `keel_pg::idempotency`): claim a key,
//! store the command's answer with its effect, release it on failure. Expired keys are purged
//! by the platform's retention run (`keel_pg::retention`), as in every service.
//!
//! A key is scoped by the RPC ([`Scope`]): the same key string sent to two methods is two
//! keys. A [`Call`] is one command's scope and key; it also names the command in the ledger
//! events' metadata. What recording an event does with the key is named by [`Completes`].
//! A call that finds its key in progress (a concurrent call with the same key) waits for it
//! with Keel's one backoff (P24: jittered, capped, within the caller's deadline).
//!
//! Must not break: a success stores its answer in the transaction that records its effect
//! (or, for a command that changed nothing, right after deciding so); only a failure releases
//! the key, so a retry with the same key resumes the command instead of repeating an effect.

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use keel_pg::idempotency::{self, Begin, Timing};
use keel_resilience::BackoffPolicy;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{PaymentError, Payments, VoidAnswer};
use crate::ledger::{Payment, PaymentId};

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
    /// How soon a call waiting behind a concurrent one with the same key looks again: the
    /// ceiling of its first pause, doubling up to [`IN_PROGRESS_MAX_FACTOR`] times this, with
    /// full jitter ([`IdempotencyConfig::in_progress_backoff`]). Also how long `begin` waits
    /// on the key's row lock.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
}

/// The cap of a waiting call's pause, as a multiple of `idempotency.poll_interval`: a call
/// ahead that runs long (a slow payment provider) is polled less and less often, but its end
/// is still noticed within this many intervals.
pub const IN_PROGRESS_MAX_FACTOR: u32 = 8;

impl IdempotencyConfig {
    /// The pauses of a call waiting behind a concurrent one with the same key: Keel's one
    /// backoff (P24). Jittered because such calls come together (a client's retries after a
    /// timeout, a saga's and its redelivery's): at a fixed interval they would poll the key in
    /// step for as long as the call ahead runs.
    pub fn in_progress_backoff(&self) -> BackoffPolicy {
        BackoffPolicy::new(
            self.poll_interval,
            self.poll_interval.saturating_mul(IN_PROGRESS_MAX_FACTOR),
        )
    }
}

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
        )
    }
}

/// The RPC a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Authorize,
    Capture,
    Void,
}

impl Scope {
    /// The key's scope in `idempotency_keys` (stored: do not rename).
    fn as_str(self) -> &'static str {
        match self {
            Self::Authorize => "billing.Authorize",
            Self::Capture => "billing.Capture",
            Self::Void => "billing.Void",
        }
    }

    /// The RPC's name, as the ledger events' metadata records it.
    fn rpc(self) -> &'static str {
        match self {
            Self::Authorize => "Authorize",
            Self::Capture => "Capture",
            Self::Void => "Void",
        }
    }

    /// The provider's idempotency key for this operation on payment `id`,
    /// `billing:<payment>:<operation>`: derived, so whatever billing retries (or a command
    /// resumed after a failure) the provider dedupes.
    pub(super) fn psp_key(self, id: PaymentId) -> String {
        let operation = match self {
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Void => "void",
        };
        format!("billing:{id}:{operation}")
    }
}

/// One command: its RPC and the caller's idempotency key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Call<'a> {
    pub scope: Scope,
    pub key: &'a str,
}

impl Call<'_> {
    /// The metadata of the ledger events this command records.
    pub(super) fn meta(&self) -> serde_json::Value {
        serde_json::json!({"rpc": self.scope.rpc(), "idempotency_key": self.key})
    }
}

/// What recording an event (or deciding that nothing changes) does with the command's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Completes {
    /// Nothing yet: the command goes on (it calls the provider next), or its caller answers
    /// for the key once it is done (voiding an order's payments one by one).
    Nothing,
    /// Stores the payment as the key's answer.
    WithPayment,
    /// Stores the payment as `Void`'s answer ([`VoidAnswer::Payment`]).
    WithVoidAnswer,
}

impl Completes {
    /// The stored answer for `p`, if this completes the key.
    pub(super) fn answer(
        self,
        p: &Payment,
    ) -> Option<Result<serde_json::Value, serde_json::Error>> {
        match self {
            Self::Nothing => None,
            Self::WithPayment => Some(serde_json::to_value(p)),
            Self::WithVoidAnswer => Some(serde_json::to_value(VoidAnswer::Payment(p.clone()))),
        }
    }
}

/// The outcome of claiming a key.
pub(super) enum Claim<A> {
    /// First use (or a retry after a failure): run the command.
    New,
    /// Answered before: this is the answer.
    Replay(A),
}

impl Payments {
    /// Claims `call`'s key for a request with fingerprint `hash`; waits (polling, within the
    /// deadline) while a concurrent call with the same key runs, then replays its answer.
    pub(super) async fn claim<A: DeserializeOwned>(
        &self,
        call: Call<'_>,
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
        let mut backoff = self.idempotency.in_progress_backoff().backoff();
        loop {
            let mut tx = self.pool.begin().await?;
            match idempotency::begin(&mut tx, call.scope.as_str(), call.key, hash, timing).await? {
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
                    // `None`: the pause would end at or past the caller's deadline, so the
                    // look after it could not answer in time; say so now instead.
                    let Some(pause) =
                        backoff.next_delay(Instant::now().into_std(), deadline.into_std())
                    else {
                        return Err(PaymentError::DeadlineExceeded(
                            "a call with this idempotency key is still in progress".to_owned(),
                        ));
                    };
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Stores `answer` for `call`'s key when the command changed nothing.
    pub(super) async fn complete(
        &self,
        call: Call<'_>,
        answer: &impl Serialize,
    ) -> Result<(), PaymentError> {
        let stored =
            serde_json::to_value(answer).map_err(|e| PaymentError::Internal(e.to_string()))?;
        let mut conn = self.pool.acquire().await?;
        idempotency::complete(&mut conn, call.scope.as_str(), call.key, 0, &stored).await?;
        Ok(())
    }

    /// Completes `call`'s key in `tx` with `answer` (the transaction that records the
    /// command's effect).
    pub(super) async fn complete_in(
        tx: &mut sqlx::PgConnection,
        call: Call<'_>,
        answer: &serde_json::Value,
    ) -> Result<(), keel_pg::PgError> {
        idempotency::complete(tx, call.scope.as_str(), call.key, 0, answer).await
    }

    /// On failure, forgets the in-progress key so that a retry runs the command again
    /// (resuming the payment) instead of waiting for a call that has ended. Only failures
    /// release: a success was completed in its own transaction.
    pub(super) async fn release_on_error<A>(
        &self,
        call: Call<'_>,
        result: Result<A, PaymentError>,
    ) -> Result<A, PaymentError> {
        if result.is_err() {
            // keel_pg::idempotency has no release: its own users keep a key until it expires.
            let released = sqlx::query(
                "DELETE FROM idempotency_keys
                  WHERE scope = $1 AND key = $2 AND status_code IS NULL",
            )
            .bind(call.scope.as_str())
            .bind(call.key)
            .execute(&self.pool)
            .await;
            if let Err(e) = released {
                // The key stays in progress until `idempotency.stale_after`; retries wait.
                tracing::warn!(scope = call.scope.as_str(), error = %e,
                    "could not release an idempotency key");
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Calls retrying one key together (a client's retries after a timeout) must not poll in
    /// step: their pauses are jittered, grow while the call ahead runs long, stay capped, and
    /// none outlasts the caller's deadline.
    #[test]
    fn a_call_waiting_behind_its_key_polls_with_jittered_capped_pauses_within_its_deadline() {
        let config = IdempotencyConfig {
            ttl: Duration::from_secs(3600),
            stale_after: Duration::from_secs(60),
            poll_interval: Duration::from_millis(25),
        };
        let policy = config.in_progress_backoff();
        let first: HashSet<Duration> = (0..100).map(|_| policy.delay(1)).collect();
        assert!(first.len() > 10, "jittered, not a fixed 25 ms: {first:?}");
        assert!(first.iter().all(|d| *d <= Duration::from_millis(25)));
        assert!((1..40).all(|n| policy.delay(n) <= Duration::from_millis(200)));

        let now = std::time::Instant::now();
        let mut backoff = policy.backoff();
        assert_eq!(
            backoff.next_delay(now, now + Duration::from_millis(0)),
            None
        );
    }
}
