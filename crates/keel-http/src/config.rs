//! `[http]` section of a service's configuration: where to listen and every bound of the
//! server stack. Each bound has a default in the service's `config/default.toml`.

use std::net::IpAddr;
use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use serde::Deserialize;

use crate::serve::ServerLimits;

/// Server settings. Durations are human strings in files and env (`"5s"`, `"250ms"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to bind; `0.0.0.0` in containers, loopback on a laptop.
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (tests).
    pub port: u16,
    /// Largest request body accepted; larger ones get 413 before the handler runs.
    pub body_limit_bytes: usize,
    /// Whole-request deadline; a handler still running then is dropped and the client gets 503.
    #[serde(with = "keel_config::duration")]
    pub request_timeout: Duration,
    /// Deadline for each readiness check (`/readyz`).
    #[serde(with = "keel_config::duration")]
    pub readiness_timeout: Duration,
    /// `[http.limits]`: connection-level bounds (P15); each has a default.
    #[serde(default)]
    pub limits: ServerLimits,
}

impl HttpConfig {
    /// The socket address to bind.
    pub fn addr(&self) -> std::net::SocketAddr {
        (self.host, self.port).into()
    }
}

impl Validate for HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "http.body_limit_bytes",
            self.body_limit_bytes,
            1,
            64 * 1024 * 1024,
        )?;
        ensure_range(
            "http.request_timeout (ms)",
            ms(self.request_timeout),
            1,
            300_000,
        )?;
        ensure_range(
            "http.readiness_timeout (ms)",
            ms(self.readiness_timeout),
            1,
            30_000,
        )?;
        self.limits.validate()
    }
}
