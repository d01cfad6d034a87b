//! notification's configuration: one typed section per part of the process, defaults in
//! `config/default.toml` (embedded), overridden by `KEEL_*` variables, every bound validated at
//! start so a bad value exits 78 naming its key (P19).
//!
//! The platform sections (`http`, `shutdown`, `database`, `amqp`, `consumer`, `relay`,
//! `telemetry`) validate themselves; this file adds notification's own sections (`api`,
//! `email`) and the rules that cross sections.
//!
//! Must not break: every field has its default in `config/default.toml` and a range check
//! here; a bound that is not validated is a bound an operator can set to zero.

use std::time::Duration;

use keel_amqp::{AmqpConfig, ConsumerConfig, RelayConfig};
use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use keel_http::HttpConfig;
use keel_pg::DatabaseConfig;
use keel_service::ShutdownConfig;
use keel_telemetry::TelemetryConfig;
use serde::Deserialize;

use crate::email::address::{RecipientDomain, Sender};
use crate::email::job::MAX_ATTEMPTS_CEILING;
use crate::webhooks::schedule::RetrySchedule;

/// notification's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    /// The journey-events consumer (P03, P05): queue, prefetch, concurrency, delivery limit.
    pub consumer: ConsumerConfig,
    /// The outbox relay (P02) for `notification.notification.recorded`.
    pub relay: RelayConfig,
    pub api: ApiConfig,
    /// Email delivery (P08, P33): the SMTP server, addresses and the job worker.
    pub email: EmailConfig,
    /// Customer webhooks (P33, P25): egress policy, schedule, isolation, disabling.
    pub webhooks: WebhooksConfig,
    pub telemetry: TelemetryConfig,
}

/// `[api]`: bounds of the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Most notifications returned for one order.
    pub list_limit: u16,
}

/// `[email]`: where and how notifications are emailed ([`crate::email`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server (plain SMTP, no TLS or authentication: a local relay or a sink).
    pub smtp_host: String,
    pub smtp_port: u16,
    /// The sender, a mailbox: `Keel <notifications@keel.test>`. Its domain is also the right
    /// side of every Message-ID.
    pub from: Sender,
    /// Customers' addresses are `<customer_id>@<recipient_domain>` (the journey has no
    /// address; a real system would look it up).
    pub recipient_domain: RecipientDomain,
    /// Bound on one send, connect to `250` after DATA.
    #[serde(with = "keel_config::duration")]
    pub timeout: Duration,
    /// Emails sent at once by one process (P05: the bound on connections to the server).
    pub concurrency: usize,
    /// Pause between polls of an empty queue.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// Job lease; renewed every third of it while a send runs. A crashed worker's email is
    /// retried by another once its lease expires.
    #[serde(with = "keel_config::duration")]
    pub lease: Duration,
    /// Backoff between attempts: exponential from `retry_base`, capped at `retry_max`, full
    /// jitter (`keel_pg::jobs::backoff`).
    #[serde(with = "keel_config::duration")]
    pub retry_base: Duration,
    #[serde(with = "keel_config::duration")]
    pub retry_max: Duration,
    /// Attempts of one email before its job is `failed` for an operator (`keelctl jobs`).
    pub max_attempts: i32,
}

const HOUR_MS: u64 = 3_600_000;

impl Validate for EmailConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let host = &self.smtp_host;
        if host.is_empty() || host.len() > 253 || host.chars().any(|c| c.is_whitespace()) {
            return Err(ConfigError::invalid(
                "email.smtp_host",
                "must be a host name or IP address",
            ));
        }
        ensure_range("email.smtp_port", self.smtp_port, 1, u16::MAX)?;
        ensure_range("email.timeout (ms)", ms(self.timeout), 1, 300_000)?;
        ensure_range("email.concurrency", self.concurrency, 1, 256)?;
        ensure_range(
            "email.poll_interval (ms)",
            ms(self.poll_interval),
            1,
            60_000,
        )?;
        ensure_range("email.lease (ms)", ms(self.lease), 300, HOUR_MS)?;
        ensure_range("email.retry_base (ms)", ms(self.retry_base), 1, 60_000)?;
        ensure_range("email.retry_max (ms)", ms(self.retry_max), 1, HOUR_MS)?;
        ensure_range(
            "email.max_attempts",
            self.max_attempts,
            1,
            MAX_ATTEMPTS_CEILING,
        )?;
        if self.retry_max < self.retry_base {
            return Err(ConfigError::invalid(
                "email.retry_max",
                "must be at least email.retry_base",
            ));
        }
        // A send must fit in a lease: the worker renews it every third, but a lease shorter
        // than one send lets a second worker send the same email while the first still may.
        if self.lease <= self.timeout {
            return Err(ConfigError::invalid(
                "email.lease",
                "must be longer than email.timeout",
            ));
        }
        Ok(())
    }
}

/// `[webhooks]`: customer webhook delivery ([`crate::webhooks`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where deliveries may go (P33's SSRF guard): no loopback, private, link-local or metadata
    /// address unless a range is listed in `allow` (development only).
    pub egress: keel_http::client::EgressPolicy,
    /// Bounds of one attempt: connect, answer head, whole answer, body bytes kept.
    pub limits: keel_http::client::DeliveryLimits,
    /// Only `https://` URLs are registered unless this is set (development: a receiver on
    /// the developer's machine speaks plain HTTP).
    pub allow_http: bool,
    /// The pause after each failed attempt, in order (each ±20 % at random); after the last,
    /// the delivery is `failed`. Documented in docs/patterns/p33-webhook-delivery.md.
    pub retry_schedule: RetrySchedule,
    /// An endpoint whose attempts have all failed for this long is disabled and its owner
    /// emailed.
    #[serde(with = "keel_config::duration")]
    pub disable_after: Duration,
    /// Deliveries run at once by one process (the worker's slots).
    pub concurrency: usize,
    /// Deliveries to one endpoint at once (the bulkhead): a slow endpoint holds at most this
    /// many of the slots, whatever its backlog.
    pub per_endpoint_concurrency: usize,
    /// When an endpoint's share of slots is taken, its next delivery waits this long (±50 %)
    /// before asking again, without taking a slot or counting an attempt.
    #[serde(with = "keel_config::duration")]
    pub busy_retry: Duration,
    /// The per-endpoint circuit breaker (P25): it opens at `failure_rate_threshold` of at
    /// least `minimum_calls` attempts within `window`, and stays open `open_for`.
    pub breaker: BreakerSettings,
    /// Most endpoints whose breaker and bulkhead one process keeps in memory; idle, closed
    /// ones are forgotten first.
    pub max_tracked_endpoints: usize,
    /// Pause between polls of an empty queue.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// Job lease; longer than one attempt's `limits.total_timeout`.
    #[serde(with = "keel_config::duration")]
    pub lease: Duration,
    /// Most endpoints one customer may have, and most rows one list returns.
    pub max_endpoints_per_customer: i64,
}

/// `[webhooks.breaker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub failure_rate_threshold: f64,
    pub minimum_calls: u32,
    #[serde(with = "keel_config::duration")]
    pub window: Duration,
    #[serde(with = "keel_config::duration")]
    pub open_for: Duration,
}

impl BreakerSettings {
    /// The breaker's full configuration (buckets, jitter and probes at Keel's defaults).
    pub fn breaker_config(&self) -> keel_resilience::breaker::BreakerConfig {
        keel_resilience::breaker::BreakerConfig {
            failure_rate_threshold: self.failure_rate_threshold,
            minimum_calls: self.minimum_calls,
            window: self.window,
            open_for: self.open_for,
            half_open_probes: 1,
            ..keel_resilience::breaker::BreakerConfig::default()
        }
    }
}

impl Validate for WebhooksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        ensure_range(
            "webhooks.limits.connect_timeout (ms)",
            ms(l.connect_timeout),
            1,
            60_000,
        )?;
        ensure_range(
            "webhooks.limits.response_timeout (ms)",
            ms(l.response_timeout),
            1,
            120_000,
        )?;
        ensure_range(
            "webhooks.limits.total_timeout (ms)",
            ms(l.total_timeout),
            1,
            120_000,
        )?;
        ensure_range(
            "webhooks.limits.body_limit_bytes",
            l.body_limit_bytes,
            0,
            1 << 20,
        )?;
        ensure_range(
            "webhooks.egress.dns_timeout (ms)",
            ms(self.egress.dns_timeout),
            1,
            30_000,
        )?;
        self.retry_schedule.validate("webhooks.retry_schedule")?;
        ensure_range(
            "webhooks.disable_after (ms)",
            ms(self.disable_after),
            1,
            30 * 24 * HOUR_MS,
        )?;
        ensure_range("webhooks.concurrency", self.concurrency, 1, 1024)?;
        ensure_range(
            "webhooks.per_endpoint_concurrency",
            self.per_endpoint_concurrency,
            1,
            self.concurrency,
        )?;
        ensure_range("webhooks.busy_retry (ms)", ms(self.busy_retry), 1, 60_000)?;
        self.breaker.breaker_config().validate().map_err(|e| {
            ConfigError::invalid(format!("webhooks.breaker.{}", e.field()), e.reason())
        })?;
        ensure_range(
            "webhooks.max_tracked_endpoints",
            self.max_tracked_endpoints,
            1,
            1_000_000,
        )?;
        ensure_range(
            "webhooks.poll_interval (ms)",
            ms(self.poll_interval),
            1,
            60_000,
        )?;
        ensure_range("webhooks.lease (ms)", ms(self.lease), 300, HOUR_MS)?;
        if self.lease <= self.limits.total_timeout {
            return Err(ConfigError::invalid(
                "webhooks.lease",
                "must be longer than webhooks.limits.total_timeout",
            ));
        }
        ensure_range(
            "webhooks.max_endpoints_per_customer",
            self.max_endpoints_per_customer,
            1,
            1000,
        )?;
        Ok(())
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.shutdown.validate()?;
        // Shutdown must not cut a request its own timeout still allows.
        self.shutdown
            .ensure_grace_covers("http.request_timeout", self.http.request_timeout)?;
        self.database.validate()?;
        self.amqp.validate()?;
        self.consumer.validate()?;
        self.relay.validate()?;
        ensure_range("api.list_limit", self.api.list_limit, 1, 1000)?;
        self.email.validate()?;
        self.webhooks.validate()?;
        self.telemetry.validate()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Under the dev profile, as `make dev` and the tests run the service: the checked-in
    /// development secrets are in, so the defaults alone are a complete configuration.
    fn load(overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = [("KEEL_PROFILE", "dev")]
            .iter()
            .chain(overrides)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        keel_config::load_from(crate::DEFAULT_CONFIG, env)
    }

    #[test]
    fn the_checked_in_defaults_are_valid() {
        let config = load(&[]).unwrap();
        assert_eq!(config.consumer.queue, "notification.events");
        assert_eq!(config.http.port, 8082);
        assert_eq!(config.email.smtp_host, "127.0.0.1");
        assert_eq!(config.email.smtp_port, 1025);
        assert_eq!(
            config.email.recipient_domain.as_str(),
            "customers.keel.test"
        );
    }

    #[test]
    fn the_smtp_server_is_set_by_environment() {
        let config = load(&[
            ("KEEL_EMAIL__SMTP_HOST", "mailpit"),
            ("KEEL_EMAIL__SMTP_PORT", "2525"),
        ])
        .unwrap();
        assert_eq!(config.email.smtp_host, "mailpit");
        assert_eq!(config.email.smtp_port, 2525);
    }

    #[test]
    fn bad_email_settings_are_refused_naming_their_key() {
        for (var, value, key) in [
            ("KEEL_EMAIL__SMTP_PORT", "0", "email.smtp_port"),
            ("KEEL_EMAIL__SMTP_HOST", "", "email.smtp_host"),
            ("KEEL_EMAIL__FROM", "nobody", "email.from"),
            (
                "KEEL_EMAIL__RECIPIENT_DOMAIN",
                "not a domain",
                "email.recipient_domain",
            ),
            ("KEEL_EMAIL__CONCURRENCY", "0", "email.concurrency"),
            ("KEEL_EMAIL__MAX_ATTEMPTS", "0", "email.max_attempts"),
            ("KEEL_EMAIL__TIMEOUT", "0s", "email.timeout"),
            ("KEEL_EMAIL__RETRY_MAX", "1ms", "email.retry_max"),
            ("KEEL_EMAIL__LEASE", "1s", "email.lease"),
        ] {
            let err = load(&[(var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn an_out_of_range_list_limit_is_refused_naming_its_key() {
        let err = load(&[("KEEL_API__LIST_LIMIT", "0")]).unwrap_err();
        assert!(err.to_string().contains("api.list_limit"), "{err}");
    }

    #[test]
    fn a_grace_period_shorter_than_the_request_timeout_is_refused() {
        let err = load(&[
            ("KEEL_HTTP__REQUEST_TIMEOUT", "20s"),
            ("KEEL_SHUTDOWN__GRACE_PERIOD", "5s"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("shutdown.grace_period"), "{err}");
    }
}
