//! skeleton's configuration: one typed section per part of the process, defaults in
//! `config/default.toml` (embedded), overridden by `KEEL_*` variables, every bound validated at
//! start so a bad value exits 78 naming its key (P19).
//!
//! The platform sections (`http`, `shutdown`, `database`, `amqp`, `consumer`, `relay`,
//! `telemetry`) validate themselves; this file adds the service's own sections and the rules
//! that cross sections. A new capability adds its section here, with its defaults in
//! `config/default.toml` and a range check in [`Validate::validate`].
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

/// skeleton's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    /// The history consumer (P03, P05): queue, prefetch, concurrency, delivery limit.
    pub consumer: ConsumerConfig,
    /// The outbox relay (P02) for `skeleton.item.*`.
    pub relay: RelayConfig,
    pub items: ItemsConfig,
    pub telemetry: TelemetryConfig,
}

/// `[items]`: `POST /v1/items` and its idempotency keys (P13), `GET /v1/items/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsConfig {
    /// How long an `Idempotency-Key` and its answer are remembered.
    #[serde(with = "keel_config::duration")]
    pub idempotency_ttl: Duration,
    /// How long a request waits behind a concurrent one holding the same key before a 409.
    #[serde(with = "keel_config::duration")]
    pub idempotency_wait: Duration,
    /// Most history entries one `GET` returns.
    pub history_limit: u16,
}

impl Validate for ItemsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // At least a minute: a client's retries must find the key; at most 30 days.
        ensure_range(
            "items.idempotency_ttl (ms)",
            ms(self.idempotency_ttl),
            60_000,
            30 * 24 * 3_600_000,
        )?;
        ensure_range(
            "items.idempotency_wait (ms)",
            ms(self.idempotency_wait),
            1,
            60_000,
        )?;
        ensure_range("items.history_limit", self.history_limit, 1, 1000)
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
        self.items.validate()?;
        // A request that waits for a key longer than it may run would always time out first.
        if self.items.idempotency_wait >= self.http.request_timeout {
            return Err(ConfigError::invalid(
                "items.idempotency_wait",
                "must be shorter than http.request_timeout",
            ));
        }
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
        assert_eq!(config.consumer.queue, "skeleton.events");
    }

    #[test]
    fn a_bad_bound_is_refused_naming_its_key() {
        let err = load(&[("KEEL_ITEMS__HISTORY_LIMIT", "0")]).unwrap_err();
        assert!(err.to_string().contains("items.history_limit"), "{err}");
    }

    #[test]
    fn an_idempotency_wait_longer_than_a_request_is_refused() {
        let err = load(&[
            ("KEEL_ITEMS__IDEMPOTENCY_WAIT", "30s"),
            ("KEEL_HTTP__REQUEST_TIMEOUT", "10s"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("items.idempotency_wait"), "{err}");
    }
}
