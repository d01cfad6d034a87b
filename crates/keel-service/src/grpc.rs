//! `[grpc]`: a gRPC server's address, deadlines and limits, and its `grpc.health.v1` (P21),
//! for every service that speaks gRPC (feature `grpc`; [`crate::Service::grpc`] applies it).
//!
//! Limits, each with a default so a service names only what it changes:
//! - `concurrency_limit_per_connection`: calls one connection runs at once; the rest wait
//!   (HTTP/2 streams are not accepted meanwhile), so one chatty client cannot take every worker;
//! - `max_decoding_message_size` / `max_encoding_message_size`: the largest message read or
//!   written; a larger one is refused with `OUT_OF_RANGE` before it is decoded, so a client
//!   cannot make the server buffer megabytes per call. tonic sets these per generated server,
//!   so a service applies them to each of its own with [`GrpcConfig::limit`]; the health
//!   server gets them here;
//! - `http2_keepalive_interval` / `http2_keepalive_timeout`: the server pings an idle
//!   connection and closes it when the ping is not answered in time, so a peer that vanished
//!   (a dead pod, a cut network) stops holding a connection and its streams;
//! - `max_deadline`: the longest any call runs. tonic applies it as the server's timeout (the
//!   caller's `grpc-timeout` if shorter), answering `CANCELLED` when a handler overruns it; a
//!   handler that reads its deadline (billing's) answers `DEADLINE_EXCEEDED` itself first,
//!   `deadline_reserve` before it.
//!
//! Health: tonic-health serves `grpc.health.v1` from a [`HealthReporter`] that *one* task per
//! process keeps up to date from the health registry ([`crate::Health`], the same state as
//! `/readyz`): it evaluates readiness every `health_interval`, takes every `/readyz` answer as
//! an evaluation too, and switches to NOT_SERVING the moment draining starts. `Check` and
//! `Watch` only read what it published, so neither costs a dependency check, and a `Watch`
//! stream a client abandoned costs nothing until it is noticed. (A hand-written `Watch` that
//! evaluated readiness per stream kept querying Postgres every second for every abandoned
//! stream until shutdown: `services/billing/tests/grpc.rs` shows both.) When listeners close,
//! the statuses are withdrawn, which ends every open `Watch` stream so graceful shutdown does
//! not wait the grace period out on them.
//!
//! Must not break: nothing answering `Check` or `Watch` runs a dependency check.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::health::Health;

/// `[grpc]`: where a service's gRPC API listens, how long its calls may run, and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub host: IpAddr,
    /// 0 picks a free port (tests); the bound address is logged as `grpc_addr`.
    pub port: u16,
    /// The longest a call may run: caps the caller's `grpc-timeout`, is the deadline of a call
    /// that sets none, and is the server's timeout for every call.
    #[serde(with = "keel_config::duration")]
    pub max_deadline: Duration,
    /// Kept back from the caller's deadline for the handler's own work and the answer, so the
    /// service answers DEADLINE_EXCEEDED itself before the caller gives up.
    #[serde(with = "keel_config::duration")]
    pub deadline_reserve: Duration,
    /// Calls one connection runs at once; further calls on it wait.
    #[serde(default = "defaults::concurrency_limit_per_connection")]
    pub concurrency_limit_per_connection: usize,
    /// Largest request message accepted (bytes).
    #[serde(default = "defaults::message_size")]
    pub max_decoding_message_size: usize,
    /// Largest response message sent (bytes).
    #[serde(default = "defaults::message_size")]
    pub max_encoding_message_size: usize,
    /// How often an HTTP/2 ping checks a connection is still there.
    #[serde(
        default = "defaults::http2_keepalive_interval",
        with = "keel_config::duration"
    )]
    pub http2_keepalive_interval: Duration,
    /// How long the ping's answer may take before the connection is closed.
    #[serde(
        default = "defaults::http2_keepalive_timeout",
        with = "keel_config::duration"
    )]
    pub http2_keepalive_timeout: Duration,
    /// Largest header list (metadata) a call may carry, in bytes; larger is refused before the
    /// handler runs (P15: hyper's default is 16 MiB).
    #[serde(default = "defaults::max_header_list_bytes")]
    pub max_header_list_bytes: u32,
    /// How often readiness is evaluated for gRPC health (one evaluation per process).
    #[serde(default = "defaults::health_interval", with = "keel_config::duration")]
    pub health_interval: Duration,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn concurrency_limit_per_connection() -> usize {
        32
    }
    /// 1 MiB: tonic reads 4 MiB by default and writes without a limit.
    pub(super) fn message_size() -> usize {
        1024 * 1024
    }
    pub(super) fn http2_keepalive_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn http2_keepalive_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn max_header_list_bytes() -> u32 {
        16 * 1024
    }
    pub(super) fn health_interval() -> Duration {
        Duration::from_secs(1)
    }
}

impl GrpcConfig {
    /// The socket address to bind.
    pub fn addr(&self) -> SocketAddr {
        (self.host, self.port).into()
    }

    /// Applies the message-size limits to a generated server (tonic sets them per server, not
    /// per listener):
    /// `config.limit(PaymentServiceServer::new(api), |s, d, e| s.max_decoding_message_size(d).max_encoding_message_size(e))`.
    pub fn limit<S>(&self, server: S, apply: impl FnOnce(S, usize, usize) -> S) -> S {
        apply(
            server,
            self.max_decoding_message_size,
            self.max_encoding_message_size,
        )
    }
}

impl Validate for GrpcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range("grpc.max_deadline (ms)", ms(self.max_deadline), 1, 300_000)?;
        ensure_range(
            "grpc.max_header_list_bytes",
            self.max_header_list_bytes,
            1024,
            1024 * 1024,
        )?;
        ensure_range(
            "grpc.deadline_reserve (ms)",
            ms(self.deadline_reserve),
            0,
            10_000,
        )?;
        if self.deadline_reserve >= self.max_deadline {
            return Err(ConfigError::invalid(
                "grpc.deadline_reserve",
                "must be less than grpc.max_deadline",
            ));
        }
        ensure_range(
            "grpc.concurrency_limit_per_connection",
            self.concurrency_limit_per_connection,
            1,
            10_000,
        )?;
        for (key, size) in [
            (
                "grpc.max_decoding_message_size",
                self.max_decoding_message_size,
            ),
            (
                "grpc.max_encoding_message_size",
                self.max_encoding_message_size,
            ),
        ] {
            ensure_range(key, size, 1_024, 64 * 1024 * 1024)?;
        }
        ensure_range(
            "grpc.http2_keepalive_interval (ms)",
            ms(self.http2_keepalive_interval),
            10,
            3_600_000,
        )?;
        ensure_range(
            "grpc.http2_keepalive_timeout (ms)",
            ms(self.http2_keepalive_timeout),
            10,
            600_000,
        )?;
        ensure_range(
            "grpc.health_interval (ms)",
            ms(self.health_interval),
            10,
            600_000,
        )
    }
}

/// The gRPC server, configured: every limit of `config` but the per-server message sizes.
pub(crate) fn server(config: &GrpcConfig) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(config.concurrency_limit_per_connection)
        .timeout(config.max_deadline)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .http2_max_header_list_size(Some(config.max_header_list_bytes))
}

/// `routes` with `grpc.health.v1` for `service` (and `""`, the whole server) added, and the
/// reporter [`report`] keeps current. Statuses start NOT_SERVING until readiness is known.
pub(crate) async fn with_health(
    routes: tonic::service::Routes,
    service: &'static str,
    config: &GrpcConfig,
) -> (tonic::service::Routes, HealthReporter) {
    let (reporter, server) = tonic_health::server::health_reporter();
    for name in ["", service] {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let server = server
        .max_decoding_message_size(config.max_decoding_message_size)
        .max_encoding_message_size(config.max_encoding_message_size);
    (routes.add_service(server), reporter)
}

/// Keeps `reporter` in step with `health` until `listeners_closed`, then withdraws the
/// statuses (ending every `Watch` stream). `seen` carries the answers `/readyz` computed.
pub(crate) async fn report(
    service: &'static str,
    reporter: HealthReporter,
    health: Health,
    interval: Duration,
    mut seen: watch::Receiver<Option<bool>>,
    listeners_closed: CancellationToken,
) {
    let mut reporter = reporter;
    let mut draining = health.draining_changes();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: Option<bool> = None;
    loop {
        let ready = tokio::select! {
            () = listeners_closed.cancelled() => break,
            _ = tick.tick() => health.ready().await.ready,
            Ok(()) = seen.changed() => match *seen.borrow_and_update() {
                Some(ready) => ready,
                None => continue,
            },
            Ok(()) = draining.changed() => false,
        };
        // Once draining, NOT_SERVING for good, whatever an evaluation in flight said.
        let ready = ready && !health.is_draining();
        // Only changes: a Watch stream is sent a message per status set, equal or not.
        if published != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in ["", service] {
                reporter.set_service_status(name, status).await;
            }
            tracing::debug!(%status, "gRPC health status");
            published = Some(ready);
        }
    }
    // Dropping the statuses' senders ends every Watch stream (after the NOT_SERVING it saw).
    for name in ["", service] {
        reporter.clear_service_status(name).await;
    }
}
