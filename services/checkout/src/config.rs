//! checkout's configuration: one typed section per capability, defaults in
//! `config/default.toml`, every bound validated at start (a bad value exits 78 naming the key).
//!
//! Cross-key rules live here too, each with the reason it exists (e.g. a lease shorter than
//! one billing call would let a second worker start the same saga step while the first is
//! still waiting for billing).

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use keel_http::HttpConfig;
use keel_pg::DatabaseConfig;
use keel_telemetry::TelemetryConfig;
use serde::Deserialize;

/// checkout's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub shutdown: keel_service::ShutdownConfig,
    pub database: DatabaseConfig,
    pub telemetry: TelemetryConfig,
    pub billing: BillingConfig,
    pub saga: SagaConfig,
    pub orders: OrdersConfig,
    pub amqp: keel_amqp::AmqpConfig,
    pub relay: keel_amqp::RelayConfig,
}

/// `[billing]`: how the saga reaches billing's `PaymentService` over gRPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// `http://host:port` of billing's gRPC server. The channel connects lazily, so checkout
    /// starts (and takes orders) while billing is down.
    pub grpc_url: String,
    /// Bound on establishing the HTTP/2 connection.
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
    /// Bound on one call; the saga uses min(this, what is left of its deadline) (P26).
    #[serde(with = "keel_config::duration")]
    pub call_timeout: Duration,
}

/// `[saga]`: the order saga's worker and its budgets (P04, P08).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaConfig {
    /// Run the saga worker in this process. `false` makes an API-only instance (and lets
    /// tests drive saga jobs by hand).
    pub run_worker: bool,
    /// How long after the order was placed the saga keeps retrying payment calls; after it
    /// the saga compensates and ends PAYMENT_FAILED. Compensation itself has no deadline.
    #[serde(with = "keel_config::duration")]
    pub deadline: Duration,
    /// Saga jobs run at once by one process (P05: the bound on load put on billing).
    pub concurrency: usize,
    /// Job lease; renewed every third of it while a job runs. A crashed worker's saga is
    /// resumed by another worker once its lease expires.
    #[serde(with = "keel_config::duration")]
    pub lease: Duration,
    /// Pause between polls of an empty queue.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// Backoff of retried steps: exponential from `retry_base`, capped at `retry_max`, with
    /// full jitter, and never past the saga deadline.
    #[serde(with = "keel_config::duration")]
    pub retry_base: Duration,
    #[serde(with = "keel_config::duration")]
    pub retry_max: Duration,
    /// Attempts of one saga job before it is `failed` for an operator (`keelctl jobs`).
    pub max_attempts: i32,
}

/// `[orders]`: limits of `POST /v1/orders` and its idempotency keys (P13).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersConfig {
    /// Most lines in one order.
    pub max_lines: usize,
    /// Largest quantity of one line (the smallest is 1).
    pub max_quantity: i32,
    /// How long an idempotency key (and its stored answer) is remembered. Expired keys are
    /// purged by the platform's retention (`[database.retention]`, `keel_pg::retention`).
    #[serde(with = "keel_config::duration")]
    pub idempotency_ttl: Duration,
    /// How long a request waits for a concurrent request holding the same key before it
    /// answers 409.
    #[serde(with = "keel_config::duration")]
    pub idempotency_wait: Duration,
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

impl Validate for BillingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.grpc_url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() => {}
            _ => {
                return Err(ConfigError::invalid(
                    "billing.grpc_url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        ensure_range(
            "billing.connect_timeout (ms)",
            ms(self.connect_timeout),
            1,
            60_000,
        )?;
        ensure_range(
            "billing.call_timeout (ms)",
            ms(self.call_timeout),
            1,
            300_000,
        )
    }
}

impl Validate for SagaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range("saga.deadline (ms)", ms(self.deadline), 100, DAY_MS)?;
        ensure_range("saga.concurrency", self.concurrency, 1, 1024)?;
        ensure_range("saga.lease (ms)", ms(self.lease), 300, HOUR_MS)?;
        ensure_range("saga.poll_interval (ms)", ms(self.poll_interval), 1, 60_000)?;
        ensure_range("saga.retry_base (ms)", ms(self.retry_base), 1, 60_000)?;
        ensure_range("saga.retry_max (ms)", ms(self.retry_max), 1, HOUR_MS)?;
        ensure_range("saga.max_attempts", self.max_attempts, 1, 100_000)?;
        if self.retry_max < self.retry_base {
            return Err(ConfigError::invalid(
                "saga.retry_max",
                "must be at least saga.retry_base",
            ));
        }
        Ok(())
    }
}

impl Validate for OrdersConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range("orders.max_lines", self.max_lines, 1, 1000)?;
        ensure_range("orders.max_quantity", self.max_quantity, 1, 1_000_000)?;
        ensure_range(
            "orders.idempotency_ttl (ms)",
            ms(self.idempotency_ttl),
            1000,
            30 * DAY_MS,
        )?;
        ensure_range(
            "orders.idempotency_wait (ms)",
            ms(self.idempotency_wait),
            1,
            60_000,
        )
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.shutdown.validate()?;
        self.shutdown
            .ensure_grace_covers("http.request_timeout", self.http.request_timeout)?;
        self.database.validate()?;
        self.telemetry.validate()?;
        self.billing.validate()?;
        self.saga.validate()?;
        self.orders.validate()?;
        self.amqp.validate()?;
        self.relay.validate()?;
        // A request waiting for a concurrent holder of its key must get its 409 before the
        // server's request timeout turns it into a 503.
        if self.orders.idempotency_wait >= self.http.request_timeout {
            return Err(ConfigError::invalid(
                "orders.idempotency_wait",
                "must be shorter than http.request_timeout",
            ));
        }
        // One billing call must fit in a lease: the worker renews the lease every third of it,
        // but a lease shorter than a call is a misconfiguration worth refusing outright.
        if self.saga.lease <= self.billing.call_timeout {
            return Err(ConfigError::invalid(
                "saga.lease",
                "must be longer than billing.call_timeout",
            ));
        }
        Ok(())
    }
}
