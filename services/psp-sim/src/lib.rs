//! psp-sim: a stand-in for an external payment service provider.
//!
//! Keel's billing must be shown coping with a provider that is slow, flaky or down, and no
//! real one can be called from a laptop or CI. This process plays that provider. In this
//! step it is the bare service on the Keel stack (health, metrics, graceful shutdown); the
//! payment API, its fault knobs and its signed webhooks arrive with the order journey.

use std::future::Future;
use std::net::SocketAddr;

use keel_config::{ConfigError, Validate};
use keel_http::shutdown::Drained;
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// psp-sim's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.telemetry.validate()
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound, not yet running simulator.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    lifecycle: Lifecycle,
}

impl App {
    /// Binds the listener and builds the stack.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let addr = config.http.addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let health = Health::new(config.http.readiness_timeout);
        let lifecycle = Lifecycle::new(health.clone(), &config.http);
        let lag = LagMonitor::spawn(config.telemetry.lag_probe_interval, lifecycle.stop_token());
        health.watch_runtime_lag(lag, config.telemetry.max_runtime_lag);
        let router = keel_http::stack::build(axum::Router::new(), health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal`, then drains.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}
