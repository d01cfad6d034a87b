#![doc = include_str!("../README.md")]

mod lag;
mod otel;
pub mod propagation;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use lag::LagMonitor;

/// `[telemetry]` section of every service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directive, e.g. `info` or `info,sqlx=warn`. `RUST_LOG` wins when set.
    pub log_level: String,
    /// How often the runtime-lag probe wakes up.
    #[serde(with = "keel_config::duration")]
    pub lag_probe_interval: std::time::Duration,
    /// Readiness fails while the measured scheduler lag is above this (P28): a blocked
    /// runtime should stop receiving traffic even though the process is "up".
    #[serde(with = "keel_config::duration")]
    pub max_runtime_lag: std::time::Duration,
}

impl keel_config::Validate for TelemetryConfig {
    fn validate(&self) -> Result<(), keel_config::ConfigError> {
        EnvFilter::try_new(&self.log_level)
            .map_err(|e| keel_config::ConfigError::invalid("telemetry.log_level", e))?;
        let ms = u64::try_from(self.lag_probe_interval.as_millis()).unwrap_or(u64::MAX);
        keel_config::ensure_range("telemetry.lag_probe_interval (ms)", ms, 10, 10_000)?;
        let max = u64::try_from(self.max_runtime_lag.as_millis()).unwrap_or(u64::MAX);
        keel_config::ensure_range("telemetry.max_runtime_lag (ms)", max, 1, 60_000)
    }
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    otel: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Start-up errors of the telemetry pipeline.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

impl Telemetry {
    /// Installs logging (and tracing export if configured) for `service`. Call once, in `main`.
    pub fn init(service: &'static str, config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&config.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let json = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(true);

        let provider = otel::provider_from_env(service)?;
        let otel_layer = provider.as_ref().map(|p| {
            use opentelemetry::trace::TracerProvider as _;
            tracing_opentelemetry::layer().with_tracer(p.tracer(service))
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(json)
            .with(otel_layer)
            .try_init()
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        if let Some(p) = &provider {
            opentelemetry::global::set_tracer_provider(p.clone());
        }
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(Self { otel: provider })
    }

    /// [`Telemetry::init`] for `main`: a bad `OTEL_*` setting is a configuration error, so it
    /// exits 78 with one line naming it, like every other config error.
    pub fn init_or_exit(service: &'static str, config: &TelemetryConfig) -> Self {
        match Self::init(service, config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{service}: invalid configuration: {e}");
                std::process::exit(keel_config::EXIT_CONFIG);
            }
        }
    }

    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.otel.is_some()
    }

    /// Flushes and stops the exporter. Called last during graceful shutdown, from the
    /// multi-threaded runtime: the flush is a task on that runtime, and `block_in_place` lets
    /// it run while this thread waits.
    pub fn shutdown(self) {
        if let Some(p) = self.otel {
            let result = tokio::task::block_in_place(|| p.shutdown());
            if let Err(e) = result {
                tracing::warn!(error = %e, "OpenTelemetry shutdown");
            }
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use.
///
/// `metrics` has one global recorder per process; tests that start several `App`s in one
/// process share it, which is why this is a `OnceLock` and not part of `Telemetry::init`.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (e.g. by a test harness): keep a private one so
                // /metrics still renders something instead of failing start-up.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
