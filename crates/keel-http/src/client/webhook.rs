//! The client that delivers one webhook: one POST, guarded, bounded in time and in how much
//! of the answer it reads.
//!
//! The client stack, in the order a delivery meets it (built in [`WebhookClient::new`]):
//! 1. shape and IP-literal check, before anything is sent;
//! 2. the guarded resolver, the only source of addresses for names;
//! 3. no proxy (a proxy would resolve and connect on our behalf, outside the guard) and no
//!    redirects (a 3xx to `http://169.254.169.254/` would be followed without a check);
//! 4. the connect timeout, then one deadline for the answer's head, then the overall one;
//! 5. at most `body_limit_bytes` of the answer are read, then the connection is dropped.

use std::error::Error as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use tokio::time::{Instant, timeout_at};
use url::Url;

use super::policy::{Target, target};
use super::resolve::GuardedResolver;
use super::{EgressError, EgressPolicy};

/// The bounds of one delivery. In configuration, durations are human strings (`"5s"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryLimits {
    /// Longest wait for the TCP connection.
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
    /// Longest wait from the start of the delivery to the answer's status and headers
    /// (resolving, connecting and sending included).
    #[serde(with = "keel_config::duration")]
    pub response_timeout: Duration,
    /// Longest wait for the whole delivery, the answer's body included.
    #[serde(with = "keel_config::duration")]
    pub total_timeout: Duration,
    /// How much of the answer's body is kept (for the delivery log); reading stops there.
    pub body_limit_bytes: usize,
}

impl Default for DeliveryLimits {
    /// Receivers are told to answer fast and do the work later; 15 s in all is generous.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(15),
            body_limit_bytes: 4096,
        }
    }
}

/// How the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryResponse {
    pub status: StatusCode,
    /// The body's first `body_limit_bytes` at most.
    pub body_prefix: Bytes,
    /// Whether the body went on past `body_prefix` (the rest was not read). Also set when a
    /// body of unannounced length fills the limit exactly: reading stops there rather than
    /// wait to learn whether more follows.
    pub truncated: bool,
    /// From the start of the delivery to the end of reading.
    pub elapsed: Duration,
}

/// Which wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The TCP connection (`connect_timeout`).
    Connect,
    /// The answer's status and headers (`response_timeout`, or `total_timeout` if shorter).
    Response,
    /// The answer's body (`total_timeout`).
    Body,
}

/// Why a delivery has no answer. [`is_permanent`](Self::is_permanent) tells a retry loop
/// which ones another attempt cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Not an http(s) URL without user-info: registration should have refused it.
    #[error("not a deliverable URL")]
    InvalidUrl(#[source] EgressError),
    /// The destination (an IP literal, or every address its name resolved to) is forbidden.
    /// Nothing was sent.
    #[error("{addr} is not an allowed destination: {range}")]
    Forbidden { addr: IpAddr, range: &'static str },
    #[error("could not resolve `{host}`")]
    Dns {
        host: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("could not connect")]
    Connect(#[source] reqwest::Error),
    #[error("timed out waiting for the {stage:?} stage")]
    Timeout { stage: Stage },
    /// Anything else in the exchange: the connection closed mid-answer, a malformed answer…
    #[error("HTTP exchange failed")]
    Http(#[source] reqwest::Error),
}

/// Why [`WebhookClient::new`] could not build a client.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no rustls crypto provider is installed; the process must install ring first")]
    NoCryptoProvider,
    #[error("could not build the HTTP client")]
    Reqwest(#[source] reqwest::Error),
}

impl DeliveryError {
    /// Whether retrying the same delivery cannot help: a bad or forbidden destination. DNS,
    /// connection, timeout and exchange failures are worth another attempt after a backoff
    /// (and count as failures for the endpoint's circuit breaker).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidUrl(_) | Self::Forbidden { .. })
    }
}

impl From<EgressError> for DeliveryError {
    fn from(e: EgressError) -> Self {
        match e {
            EgressError::Forbidden { addr, range } => Self::Forbidden { addr, range },
            EgressError::Dns { host, source } => Self::Dns { host, source },
            shape => Self::InvalidUrl(shape),
        }
    }
}

/// Delivers webhooks to customers' URLs without letting a URL reach inside the network (P33
/// webhook delivery; SSRF). Cheap to clone: clones share one connection pool.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use keel_http::client::{DeliveryLimits, EgressPolicy, WebhookClient};
///
/// // The process installed rustls's ring provider at start-up (keel_service does).
/// let client = WebhookClient::new(EgressPolicy::default(), DeliveryLimits::default())?;
/// let url = url::Url::parse("https://customer.example/hooks")?;
/// let answer = client.post(&url, http::HeaderMap::new(), r#"{"type":"order.confirmed"}"#).await?;
/// let delivered = answer.status.is_success();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<EgressPolicy>,
    limits: DeliveryLimits,
}

impl WebhookClient {
    /// A client that delivers only where `policy` allows, within `limits`.
    ///
    /// The workspace builds reqwest with `rustls-no-provider`, and reqwest panics building a
    /// client when no rustls crypto provider is installed; this answers
    /// [`BuildError::NoCryptoProvider`] instead. Whoever owns the process installs ring
    /// (`keel_service` at start-up, `keel_testkit::install_crypto_provider` in tests).
    pub fn new(policy: EgressPolicy, limits: DeliveryLimits) -> Result<Self, BuildError> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(BuildError::NoCryptoProvider);
        }
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            // Every named host is resolved by the guard, and reqwest connects only to what it
            // returns: no gap between check and connection for DNS rebinding to use.
            .dns_resolver(GuardedResolver::new(Arc::clone(&policy)))
            // A proxy (from HTTP_PROXY and friends) would resolve and connect for us, outside
            // the guard.
            .no_proxy()
            // A 3xx is an answer, recorded, not followed: the next hop was never checked.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(limits.connect_timeout)
            .user_agent(concat!("keel-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(BuildError::Reqwest)?;
        Ok(Self {
            http,
            policy,
            limits,
        })
    }

    /// The policy deliveries are held to (the same one [`EgressPolicy::check_url`] should be
    /// called with at registration).
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// POSTs `body` with `headers` (the signature headers among them) to `url`, and reads at
    /// most `body_limit_bytes` of the answer. Any status is an answer: judging it (2xx or
    /// not) is the caller's.
    pub async fn post(
        &self,
        url: &Url,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Result<DeliveryResponse, DeliveryError> {
        let started = Instant::now();
        let deadline = started + self.limits.total_timeout;
        // IP literals never reach the resolver: check them here, before anything is sent.
        if let Target::Ip(ip) = target(url)? {
            self.policy.check_ip(ip)?;
        }
        let send = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body.into())
            .send();
        let head_deadline = deadline.min(started + self.limits.response_timeout);
        let mut response = match timeout_at(head_deadline, send).await {
            Err(_elapsed) => {
                return Err(DeliveryError::Timeout {
                    stage: Stage::Response,
                });
            }
            Ok(result) => result.map_err(classify)?,
        };
        let status = response.status();
        let limit = self.limits.body_limit_bytes;
        let mut prefix = BytesMut::new();
        let mut truncated = false;
        loop {
            let chunk = match timeout_at(deadline, response.chunk()).await {
                Err(_elapsed) => return Err(DeliveryError::Timeout { stage: Stage::Body }),
                Ok(result) => result.map_err(classify)?,
            };
            let Some(chunk) = chunk else { break };
            let room = limit - prefix.len();
            if chunk.len() > room {
                prefix.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            prefix.extend_from_slice(&chunk);
            if prefix.len() == limit && response.content_length() != Some(limit as u64) {
                // Full, and the answer may go on: do not wait for more only to learn that.
                truncated = true;
                break;
            }
        }
        // Dropping `response` with its body unread closes the connection rather than
        // returning it to the pool: the receiver's remaining bytes are never read.
        drop(response);
        Ok(DeliveryResponse {
            status,
            body_prefix: prefix.freeze(),
            truncated,
            elapsed: started.elapsed(),
        })
    }
}

/// Sorts a reqwest failure; a refusal of the guarded resolver is found in its source chain.
fn classify(e: reqwest::Error) -> DeliveryError {
    let mut source = e.source();
    while let Some(inner) = source {
        if let Some(refusal) = inner.downcast_ref::<EgressError>() {
            return refusal.clone().into();
        }
        source = inner.source();
    }
    match (e.is_connect(), e.is_timeout()) {
        (true, true) => DeliveryError::Timeout {
            stage: Stage::Connect,
        },
        (true, false) => DeliveryError::Connect(e),
        (false, true) => DeliveryError::Timeout {
            stage: Stage::Response,
        },
        (false, false) => DeliveryError::Http(e),
    }
}
