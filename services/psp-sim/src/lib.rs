//! psp-sim: a stand-in for an external payment service provider (PSP).
//!
//! Keel's billing must be shown coping with a card processor that declines, is slow, fails
//! now and then, or never answers — and no real one can be called from a laptop or CI. This
//! process plays that provider, and only that: it is a *simulator*, not an example of how to
//! build a payment system. Its state lives in memory ([`store`]), bounded, lost on restart.
//!
//! Capabilities, one module each:
//! - [`authorizations`]: the card API billing calls (authorize, capture, void, read), every
//!   mutating call idempotent by key ([`idempotency`], P13 on the provider's side);
//! - [`faults`]: outcomes chosen by the payment token (`tok_decline`, `tok_flaky`, ...) and
//!   run-time knobs (`PUT /admin/faults`: latency, error rate);
//! - [`webhooks`]: after a capture, a `payment.captured` webhook signed the Standard Webhooks
//!   way and retried with backoff until billing answers 2xx (the sending side of P32), with
//!   `GET /admin/webhooks` and a redeliver endpoint for the replay demo.
//!
//! Routes: `POST /v1/authorizations`, `GET /v1/authorizations/{id}`,
//! `POST /v1/authorizations/{id}/capture`, `POST /v1/authorizations/{id}/void` (statuses in
//! [`authorizations`]); `GET`/`PUT /admin/faults`; `GET /admin/webhooks`,
//! `POST /admin/webhooks/{webhook_id}/redeliver`; plus the Keel stack's `/livez`, `/readyz`,
//! `/metrics`. Errors are problem+json ([`error::ApiError`]). The admin routes have no
//! authentication: the simulator listens on loopback and is never deployed as a real service.
//!
//! Metrics besides the stack's RED set: `psp_store_entries{store}`,
//! `psp_store_evictions_total{store}`, `psp_idempotent_replays_total`,
//! `psp_injected_errors_total`, `psp_held_requests`, `psp_webhook_queue_depth`,
//! `psp_webhook_queue_full_total`, `psp_webhook_deliveries_in_flight`,
//! `psp_webhook_attempts_total{outcome}`.
//!
//! [`App::build`] binds the listener (port 0 in tests) and starts the webhook sender;
//! [`App::run`] serves until the shutdown signal, drains (P20), and stops the sender.

pub mod authorizations;
pub mod error;
pub mod faults;
pub mod idempotency;
pub mod store;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use keel_config::{ConfigError, Validate};
use keel_http::shutdown::{Drained, close_within};
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::faults::{Faults, FaultsConfig};
use crate::store::StoreConfig;
use crate::webhooks::{WebhookConfig, WebhookError, Webhooks};

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// psp-sim's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub webhook: WebhookConfig,
    pub faults: FaultsConfig,
    pub store: StoreConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.telemetry.validate()?;
        self.webhook.validate()?;
        self.faults.validate()?;
        self.store.validate()?;
        // Each deliberate wait must end before the server's own request timeout would cut it
        // (with a bare 503): the simulator, not the timeout layer, decides how a held request
        // ends. Raise `http.request_timeout` (and `http.grace_period` with it) to hold longer.
        let limit = self.http.request_timeout;
        for (key, wait) in [
            ("faults.timeout_hold", self.faults.timeout_hold),
            ("faults.slow_delay", self.faults.slow_delay),
            ("faults.max_latency", self.faults.max_latency),
        ] {
            if wait >= limit {
                return Err(ConfigError::invalid(
                    key,
                    "must be shorter than http.request_timeout",
                ));
            }
        }
        Ok(())
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
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound, not yet running simulator.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    lifecycle: Lifecycle,
    webhook_sender: JoinHandle<()>,
}

impl App {
    /// Binds the listener, starts the webhook sender and builds the stack.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let addr = config.http.addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let health = Health::new(config.http.readiness_timeout);
        let lifecycle = Lifecycle::new(health.clone(), &config.http);
        let stop = lifecycle.stop_token();
        let lag = LagMonitor::spawn(config.telemetry.lag_probe_interval, stop.clone());
        health.watch_runtime_lag(lag, config.telemetry.max_runtime_lag);

        let (webhooks, webhook_sender) =
            Webhooks::spawn(&config.webhook, &config.store, stop.clone())?;
        let faults = Arc::new(Faults::new(config.faults.clone(), stop));
        let api =
            authorizations::Api::new(&config.store, Arc::clone(&faults), Arc::clone(&webhooks));
        let routes = axum::Router::new()
            .merge(authorizations::routes(api))
            .merge(faults::admin_routes(faults))
            .merge(webhooks::admin_routes(webhooks));
        let router = keel_http::stack::build(routes, health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
            webhook_sender,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal`, then drains; the webhook sender stops with the listener.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        // The stop token has fired: the sender is abandoning what is left and ends promptly.
        let sender = self.webhook_sender;
        close_within("webhook sender", async {
            if let Err(e) = sender.await {
                tracing::error!(error = %e, "webhook sender task failed");
            }
        })
        .await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}
