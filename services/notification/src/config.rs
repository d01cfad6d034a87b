//! notification's configuration: one typed section per part of the process, defaults in
//! `config/default.toml` (embedded), overridden by `KEEL_*` variables, every bound validated at
//! start so a bad value exits 78 naming its key (P19).
//!
//! The platform sections (`http`, `shutdown`, `database`, `amqp`, `consumer`, `relay`,
//! `telemetry`) validate themselves; this file adds notification's own section and the rules
//! that cross sections.
//!
//! Must not break: every field has its default in `config/default.toml` and a range check
//! here; a bound that is not validated is a bound an operator can set to zero.

use keel_amqp::{AmqpConfig, ConsumerConfig, RelayConfig};
use keel_config::{ConfigError, Validate, ensure_range};
use keel_http::HttpConfig;
use keel_pg::DatabaseConfig;
use keel_service::ShutdownConfig;
use keel_telemetry::TelemetryConfig;
use serde::Deserialize;

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
    pub telemetry: TelemetryConfig,
}

/// `[api]`: bounds of the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Most notifications returned for one order.
    pub list_limit: u16,
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
