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

use keel_resilience::BackoffPolicy;
use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use reqwest::StatusCode;
use serde::Deserialize;
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
    /// 402: the card was declined; `code` is the problem's `decline_code`.
    #[error("declined: {code}")]
    Declined { code: String },
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
    /// A request took longer than `psp.request_timeout`.
    #[error("provider timed out")]
    Timeout,
    /// The caller's deadline ran out (before or during a request).
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// A 2xx whose body is not what the API promises.
    #[error("unexpected provider response: {0}")]
    Protocol(String),
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuthorizeRequest<'a> {
    pub amount_minor: i64,
    pub currency: &'a str,
    pub token: &'a str,
    /// billing's payment id: lets an operator match the provider's records to the ledger.
    pub reference: String,
}

/// The provider's client. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct PspClient {
    http: reqwest::Client,
    config: PspConfig,
    backoff: BackoffPolicy,
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
    pub fn new(config: &PspConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A pooled connection the provider closed is evicted rather than reused forever.
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            config: config.clone(),
            backoff: BackoffPolicy::new(config.initial_backoff, config.max_backoff),
        })
    }

    /// `POST /v1/authorizations`. A decline is `Err(Declined)`.
    pub async fn authorize(
        &self,
        key: &str,
        request: &AuthorizeRequest<'_>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let body = serde_json::to_value(request).map_err(|e| PspError::Protocol(e.to_string()))?;
        self.call("authorize", "v1/authorizations", key, Some(&body), deadline)
            .await
    }

    /// `POST /v1/authorizations/{id}/capture` (202: the webhook confirms later).
    pub async fn capture(
        &self,
        key: &str,
        authorization_id: &str,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let path = format!("v1/authorizations/{authorization_id}/capture");
        self.call("capture", &path, key, None, deadline).await
    }

    /// `POST /v1/authorizations/{id}/void`.
    pub async fn void(
        &self,
        key: &str,
        authorization_id: &str,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let path = format!("v1/authorizations/{authorization_id}/void");
        self.call("void", &path, key, None, deadline).await
    }

    async fn call(
        &self,
        operation: &'static str,
        path: &str,
        key: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let result = self.post_with_retries(path, key, body, deadline).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(PspError::Declined { .. }) => "declined",
            Err(PspError::Unavailable { .. }) => "unavailable",
            Err(PspError::Timeout | PspError::DeadlineExceeded) => "timeout",
            Err(_) => "rejected",
        };
        metrics::counter!("billing_psp_calls_total", "operation" => operation, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn post_with_retries(
        &self,
        path: &str,
        key: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Authorization, PspError> {
        let url = self
            .config
            .base_url
            .join(path)
            .map_err(|e| PspError::Protocol(e.to_string()))?;
        let mut last = String::new();
        let mut attempt = 0;
        while attempt < self.config.max_attempts {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(PspError::DeadlineExceeded);
            }
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
                let response = request.send().await?;
                let status = response.status();
                let bytes = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, bytes))
            }
            .await;
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
            tokio::time::sleep(pause).await;
        }
        Err(PspError::Unavailable {
            attempts: attempt,
            last,
        })
    }
}

fn interpret(status: StatusCode, body: &[u8]) -> Result<Authorization, PspError> {
    match status {
        s if s.is_success() => {
            serde_json::from_slice(body).map_err(|e| PspError::Protocol(e.to_string()))
        }
        StatusCode::PAYMENT_REQUIRED => {
            let code = ProviderProblem::parse(body)
                .decline_code
                .unwrap_or_else(|| "declined".to_owned());
            Err(PspError::Declined { code })
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
