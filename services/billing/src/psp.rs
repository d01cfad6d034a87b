//! The payment provider's client (psp-sim's HTTP API), P16-style bounded calls.
//!
//! Every call is bounded three ways: `psp.connect_timeout` per connection attempt,
//! `psp.request_timeout` per request, and the caller's deadline over all attempts — no
//! request is started, and no backoff sleeps, past the deadline the gRPC caller gave billing.
//! Only failures that cannot have had an effect or are the provider's own (connect errors,
//! 5xx) are retried, at most `psp.max_attempts` times with exponential backoff and jitter;
//! every mutating call carries an `Idempotency-Key` that billing derives from the payment
//! and the operation, so even a retry of a request that did reach the provider cannot
//! authorize, capture or void twice (the provider dedupes by key).
//!
//! A 409 `idempotency-key-in-use` (an earlier request of billing's with the same key still
//! running at the provider) is retried like a 5xx: the answer will come.
//!
//! A timed-out request is *not* retried: the provider is slow, not down, and a retry would
//! only queue behind it. The caller gets [`PspError::Timeout`] and retries later with the same
//! idempotency key (P13), which resumes the same operation.
//!
//! The provider is outside Keel's trust boundary (OWASP API10, unsafe consumption of APIs), so
//! what comes back is bounded and what goes out is encoded:
//! - a response body is read up to `psp.max_response_bytes` and no further (`read_bounded`):
//!   a provider answering an endless or huge body costs billing that many bytes, not its memory;
//! - an authorization id (the provider's own, stored in the ledger) becomes one percent-encoded
//!   path segment: `/`, `?` or `#` inside it cannot change the path, and `.`/`..` are refused;
//! - a decline code is one of [`DeclineCode`]'s, an unknown one being [`DeclineCode::Other`]:
//!   the provider's string never reaches the ledger, the gRPC answer or a customer's email;
//! - a payment token is a [`PaymentToken`], whose `Debug` never shows it.

use keel_resilience::breaker::{Breaker, BreakerConfig, State};
use keel_resilience::{BackoffPolicy, RetryBudget, RetryBudgetConfig};
use std::sync::Arc;
use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// `[psp]`: where the provider is and how long billing waits for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PspConfig {
    /// `http://127.0.0.1:8090` (psp-sim).
    pub base_url: url::Url,
    /// One TCP/TLS connect; a black-holed provider fails this fast (and is retried).
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
    /// One request, headers to last body byte; further capped by the caller's deadline.
    #[serde(with = "keel_config::duration")]
    pub request_timeout: Duration,
    /// Attempts per call, the first included (retries on connect errors and 5xx only).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt, with jitter.
    #[serde(with = "keel_config::duration")]
    pub initial_backoff: Duration,
    /// Cap on one backoff.
    #[serde(with = "keel_config::duration")]
    pub max_backoff: Duration,
    /// Largest response body read from the provider; a longer one is a protocol error.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// `[psp.retry_budget]`: retries may add at most `ratio` of extra load (P24).
    pub retry_budget: RetryBudgetSettings,
    /// `[psp.breaker]`: stop calling a failing provider for `open_for` (P25).
    pub breaker: BreakerSettings,
}

/// `[psp.retry_budget]` (see [`keel_resilience::budget`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSettings {
    pub ratio: f32,
    pub min_per_second: u32,
    #[serde(with = "keel_config::duration")]
    pub window: Duration,
}

impl RetryBudgetSettings {
    fn config(&self) -> RetryBudgetConfig {
        RetryBudgetConfig {
            ratio: self.ratio,
            min_per_second: self.min_per_second,
            window: self.window,
        }
    }
}

/// `[psp.breaker]` (see [`keel_resilience::breaker`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub failure_rate_threshold: f64,
    pub minimum_calls: u32,
    #[serde(with = "keel_config::duration")]
    pub window: Duration,
    #[serde(with = "keel_config::duration")]
    pub open_for: Duration,
    pub half_open_probes: u32,
}

impl BreakerSettings {
    fn config(&self) -> BreakerConfig {
        BreakerConfig {
            failure_rate_threshold: self.failure_rate_threshold,
            minimum_calls: self.minimum_calls,
            window: self.window,
            open_for: self.open_for,
            half_open_probes: self.half_open_probes,
            ..BreakerConfig::default()
        }
    }
}

/// 64 KiB: the provider's answers are a few hundred bytes.
fn default_max_response_bytes() -> usize {
    64 * 1024
}

impl Validate for PspConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.base_url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "psp.base_url",
                "scheme must be http or https",
            ));
        }
        ensure_range(
            "psp.connect_timeout (ms)",
            ms(self.connect_timeout),
            1,
            60_000,
        )?;
        ensure_range(
            "psp.request_timeout (ms)",
            ms(self.request_timeout),
            1,
            300_000,
        )?;
        ensure_range("psp.max_attempts", self.max_attempts, 1, 10)?;
        ensure_range(
            "psp.initial_backoff (ms)",
            ms(self.initial_backoff),
            1,
            60_000,
        )?;
        ensure_range("psp.max_backoff (ms)", ms(self.max_backoff), 1, 60_000)?;
        ensure_range(
            "psp.max_response_bytes",
            self.max_response_bytes,
            1_024,
            16 * 1024 * 1024,
        )?;
        if let Err(e) = self.retry_budget.config().validate() {
            return Err(ConfigError::invalid(
                format!("psp.retry_budget.{}", e.field()),
                e.reason(),
            ));
        }
        if let Err(e) = self.breaker.config().validate() {
            return Err(ConfigError::invalid(
                format!("psp.breaker.{}", e.field()),
                e.reason(),
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(ConfigError::invalid(
                "psp.max_backoff",
                "must be at least psp.initial_backoff",
            ));
        }
        Ok(())
    }
}

/// Why a provider call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PspError {
    /// 402: the card was declined; `code` is the problem's `decline_code`, in billing's words.
    #[error("declined: {code}")]
    Declined { code: DeclineCode },
    /// 409: the authorization's state forbids this (capture of a voided one, …); `status`
    /// is the authorization's current state when the provider says (`captured`, `voided`),
    /// which tells "already done" from "wrong state".
    #[error("provider refused the state change")]
    Conflict { status: Option<AuthorizationStatus> },
    /// 404: the provider does not know the authorization.
    #[error("unknown authorization")]
    NotFound,
    /// Any other 4xx: billing's request (or the caller's token) is wrong; retrying won't help.
    #[error("provider rejected the request with {status}")]
    Rejected { status: u16 },
    /// 5xx or unreachable on every attempt (or no time left for another).
    #[error("provider unavailable after {attempts} attempt(s): {last}")]
    Unavailable { attempts: u32, last: String },
    /// The breaker is open: the provider has been failing and is not called for now (P25).
    #[error("provider circuit open; retry after {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
    /// A request took longer than `psp.request_timeout`.
    #[error("provider timed out")]
    Timeout,
    /// The caller's deadline ran out (before or during a request).
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The provider's answer (or an id it gave) is not what its API promises.
    #[error("unexpected provider response: {0}")]
    Protocol(ProtocolError),
}

/// How the provider broke its API's promises.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The body went past `psp.max_response_bytes`; reading stopped there.
    #[error("response body larger than psp.max_response_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    /// An authorization id that cannot be one path segment (empty, `.` or `..`).
    #[error("authorization id {0:?} is not a valid path segment")]
    InvalidId(String),
    /// A body that does not parse as the API's JSON.
    #[error("malformed body: {0}")]
    Body(#[from] serde_json::Error),
    /// The configured base URL cannot take a path (`data:`, `mailto:`).
    #[error("psp.base_url cannot be a base")]
    BaseUrl,
}

/// Why a card was declined, in billing's vocabulary. The provider's `decline_code` is mapped
/// onto it, and any code billing does not know becomes [`DeclineCode::Other`] (`declined`):
/// the set of values that reaches the ledger, the gRPC answer and notifications is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclineCode {
    CardDeclined,
    InsufficientFunds,
    ExpiredCard,
    IncorrectCvc,
    /// Anything else, or no code at all.
    Other,
}

impl DeclineCode {
    /// The code a provider sent (`None`: it sent none).
    pub fn from_provider(code: Option<&str>) -> Self {
        match code {
            Some("card_declined") => Self::CardDeclined,
            Some("insufficient_funds") => Self::InsufficientFunds,
            Some("expired_card") => Self::ExpiredCard,
            Some("incorrect_cvc") => Self::IncorrectCvc,
            _ => Self::Other,
        }
    }

    /// Its stable wire name (`decline_reason` of the gRPC answer and the ledger's event).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CardDeclined => "card_declined",
            Self::InsufficientFunds => "insufficient_funds",
            Self::ExpiredCard => "expired_card",
            Self::IncorrectCvc => "incorrect_cvc",
            Self::Other => "declined",
        }
    }
}

impl std::fmt::Display for DeclineCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A card's payment token: sent to the provider, never shown. `Debug` prints
/// `PaymentToken(<redacted>)`, so a command or request logged with `?` carries no token.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PaymentToken(String);

impl PaymentToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for the provider's request and the idempotency fingerprint only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PaymentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentToken(<redacted>)")
    }
}

/// An authorization's state at the provider, as its API spells it (`capture_pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationStatus {
    Authorized,
    CapturePending,
    Captured,
    Voided,
}

/// An authorization as the provider reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Authorization {
    pub id: String,
    pub status: AuthorizationStatus,
}

/// What [`PspClient::authorize`] sends.
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizeRequest<'a> {
    pub amount_minor: i64,
    pub currency: &'a str,
    pub token: &'a PaymentToken,
    /// billing's payment id: lets an operator match the provider's records to the ledger.
    pub reference: String,
}

/// The provider's client. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct PspClient {
    http: reqwest::Client,
    config: PspConfig,
    backoff: BackoffPolicy,
    /// Shared by every call: retries across all of them add at most `ratio` extra load.
    budget: Arc<RetryBudget>,
    /// One breaker for the provider (one dependency, one failure domain).
    breaker: Breaker,
}

/// The parts of the provider's problem documents billing acts on.
#[derive(Deserialize)]
struct ProviderProblem {
    #[serde(rename = "type")]
    type_uri: Option<String>,
    decline_code: Option<String>,
    status: Option<serde_json::Value>,
}

impl ProviderProblem {
    fn parse(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or(Self {
            type_uri: None,
            decline_code: None,
            status: None,
        })
    }

    /// A 409 meaning "a request with this key is still running there", not a state conflict.
    fn is_key_in_use(&self) -> bool {
        self.type_uri
            .as_deref()
            .is_some_and(|t| t.ends_with("/idempotency-key-in-use"))
    }
}

impl PspClient {
    /// A client for `config` (no connection is made until the first call).
    /// `config` must have been validated ([`PspConfig::validate`]).
    pub fn new(config: &PspConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // An idle pooled connection is dropped before the server drops it: Keel's servers
            // close idle keep-alive connections after `http.limits.header_read_timeout`
            // (10 s), and a request sent on a connection the server is closing fails.
            .pool_idle_timeout(Duration::from_secs(5))
            // A peer that vanished without a FIN is noticed on an idle pooled connection.
            .tcp_keepalive(Duration::from_secs(30))
            .build()?;
        let budget = RetryBudget::new(config.retry_budget.config())
            .unwrap_or_else(|e| unreachable!("psp.retry_budget was validated at start: {e}"));
        let breaker = Breaker::new(config.breaker.config())
            .unwrap_or_else(|e| unreachable!("psp.breaker was validated at start: {e}"));
        metrics::gauge!("billing_psp_breaker_open").set(0.0);
        breaker.on_transition(|_, to| {
            metrics::counter!("billing_psp_breaker_transitions_total", "to" => to.as_str())
                .increment(1);
            metrics::gauge!("billing_psp_breaker_open").set(if to == State::Closed {
                0.0
            } else {
                1.0
            });
        });
        Ok(Self {
            http,
            config: config.clone(),
            backoff: BackoffPolicy::new(config.initial_backoff, config.max_backoff),
            budget: Arc::new(budget),
            breaker,
        })
    }

    /// The provider breaker's state (for `/readyz` detail and tests).
    pub fn breaker_state(&self) -> State {
        self.breaker.state()
    }

    /// `POST /v1/authorizations`. A decline is `Err(Declined)`.
    pub async fn authorize(
        &self,
        key: &str,
        request: &AuthorizeRequest<'_>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let body = serde_json::to_value(request).map_err(|e| PspError::Protocol(e.into()))?;
        let url = self.url(&["v1", "authorizations"])?;
        self.call("authorize", url, key, Some(&body), deadline)
            .await
    }

    /// `POST /v1/authorizations/{id}/capture` (202: the webhook confirms later).
    pub async fn capture(
        &self,
        key: &str,
        authorization_id: &str,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let url = self.url(&["v1", "authorizations", authorization_id, "capture"])?;
        self.call("capture", url, key, None, deadline).await
    }

    /// `POST /v1/authorizations/{id}/void`.
    pub async fn void(
        &self,
        key: &str,
        authorization_id: &str,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let url = self.url(&["v1", "authorizations", authorization_id, "void"])?;
        self.call("void", url, key, None, deadline).await
    }

    /// `psp.base_url` with `segments` appended, each percent-encoded as *one* segment (`/`
    /// becomes `%2F`), so an id can never reach another path. `.` and `..` cannot be encoded
    /// that way (URL parsers resolve them, and the url crate drops them), so they are refused.
    pub fn url(&self, segments: &[&str]) -> Result<url::Url, PspError> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            return Err(PspError::Protocol(ProtocolError::InvalidId(
                (*bad).to_owned(),
            )));
        }
        let mut url = self.config.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| PspError::Protocol(ProtocolError::BaseUrl))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn call(
        &self,
        operation: &'static str,
        url: url::Url,
        key: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let result = self.post_with_retries(url, key, body, deadline).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(PspError::Declined { .. }) => "declined",
            Err(PspError::Unavailable { .. }) => "unavailable",
            Err(PspError::CircuitOpen { .. }) => "circuit_open",
            Err(PspError::Timeout | PspError::DeadlineExceeded) => "timeout",
            Err(_) => "rejected",
        };
        metrics::counter!("billing_psp_calls_total", "operation" => operation, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn post_with_retries(
        &self,
        url: url::Url,
        key: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let limit = self.config.max_response_bytes;
        let mut last = String::new();
        let mut attempt = 0;
        // One deposit per call: what this call's retries, and others', may draw on (P24).
        self.budget.deposit();
        while attempt < self.config.max_attempts {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(PspError::DeadlineExceeded);
            }
            // P25: a provider that keeps failing is not called at all for a while; the caller
            // hears so at once instead of after a connect timeout and the retries.
            let permit = match self.breaker.try_acquire() {
                Ok(permit) => permit,
                Err(open) if attempt == 1 => {
                    return Err(PspError::CircuitOpen {
                        retry_after: open.retry_after,
                    });
                }
                // Opened while this call was retrying: its last failure is the answer.
                Err(_) => break,
            };
            // The request may not outlive the caller's deadline.
            let capped = remaining < self.config.request_timeout;
            let mut request = self
                .http
                .post(url.clone())
                .header("Idempotency-Key", key)
                .timeout(remaining.min(self.config.request_timeout));
            if let Some(body) = body {
                request = request.json(body);
            }
            let sent = async {
                let response = request.send().await.map_err(ReadError::Http)?;
                let status = response.status();
                let bytes = read_bounded(response, limit).await?;
                Ok::<_, ReadError>((status, bytes))
            }
            .await;
            let sent = match sent {
                Ok(answer) => Ok(answer),
                Err(ReadError::Http(e)) => Err(e),
                // Not retried: the provider answered, only not within the API's promises.
                Err(ReadError::TooLarge) => {
                    return Err(PspError::Protocol(ProtocolError::TooLarge { limit }));
                }
            };
            // The breaker counts what says the provider is unwell: 5xx, a connection that
            // failed, a timeout. Declines, conflicts and 4xx are healthy answers.
            let unwell = match &sent {
                Ok((status, _)) => status.is_server_error(),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request(),
            };
            if unwell {
                permit.failure();
            } else {
                permit.success();
            }
            match sent {
                Ok((status, _)) if status.is_server_error() => last = format!("HTTP {status}"),
                // Billing's earlier request with this key (one that timed out on billing's
                // side) is still running at the provider: wait and ask again for its answer.
                Ok((StatusCode::CONFLICT, bytes))
                    if ProviderProblem::parse(&bytes).is_key_in_use() =>
                {
                    last = "idempotency key in use at the provider".to_owned();
                }
                Ok((status, bytes)) => return interpret(status, &bytes),
                // Connect errors first: a connect timeout is also a timeout, but nothing
                // reached the provider, so it is safe and useful to retry.
                Err(e) if e.is_connect() => last = format!("connect: {e}"),
                Err(e) if e.is_timeout() => {
                    return Err(if capped {
                        PspError::DeadlineExceeded
                    } else {
                        PspError::Timeout
                    });
                }
                Err(e) => {
                    return Err(PspError::Unavailable {
                        attempts: attempt,
                        last: e.to_string(),
                    });
                }
            }
            if attempt == self.config.max_attempts {
                break;
            }
            // Keel's one backoff (P24): full jitter, capped; `None` when the pause would end
            // past the deadline — no room for another attempt: the provider's failure is the
            // answer, not the deadline (which has not passed).
            let Some(pause) =
                self.backoff
                    .delay_before(attempt, std::time::Instant::now(), deadline.into_std())
            else {
                break;
            };
            // P24: a retry only while the budget lasts; during an outage the provider sees at
            // most `1 + ratio` attempts per call instead of `max_attempts`.
            if !self.budget.try_withdraw() {
                metrics::counter!("billing_psp_retries_refused_total").increment(1);
                break;
            }
            tokio::time::sleep(pause).await;
        }
        Err(PspError::Unavailable {
            attempts: attempt,
            last,
        })
    }
}

/// Why a body could not be read.
enum ReadError {
    Http(reqwest::Error),
    TooLarge,
}

/// Reads `response`'s body, at most `limit` bytes: a declared length over it is refused before
/// reading, and an undeclared (chunked) one is cut off as soon as it passes the limit, so the
/// memory a provider's answer costs is bounded by `psp.max_response_bytes` whatever it sends.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    let declared = response.content_length().unwrap_or(0);
    if declared > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    // The declared length is within the limit here, so this allocation is bounded too.
    let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn interpret(status: StatusCode, body: &[u8]) -> Result<Authorization, PspError> {
    match status {
        s if s.is_success() => {
            serde_json::from_slice(body).map_err(|e| PspError::Protocol(e.into()))
        }
        StatusCode::PAYMENT_REQUIRED => {
            let problem = ProviderProblem::parse(body);
            Err(PspError::Declined {
                code: DeclineCode::from_provider(problem.decline_code.as_deref()),
            })
        }
        // A status billing does not know reads as "not said": the refusal stands.
        StatusCode::CONFLICT => Err(PspError::Conflict {
            status: ProviderProblem::parse(body)
                .status
                .and_then(|s| serde_json::from_value(s).ok()),
        }),
        StatusCode::NOT_FOUND => Err(PspError::NotFound),
        s => Err(PspError::Rejected { status: s.as_u16() }),
    }
}
