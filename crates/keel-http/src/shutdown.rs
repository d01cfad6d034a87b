//! Graceful shutdown (P20).
//!
//! The sequence, and why each step exists:
//! 1. SIGTERM or SIGINT arrives ([`shutdown_signal`]).
//! 2. Readiness turns false ([`Health::set_draining`]): Kubernetes and load balancers stop
//!    routing *new* requests here, but that takes a few seconds to propagate.
//! 3. The drain delay passes while the listener still accepts, so requests that were
//!    already routed here are served instead of refused (the classic 502 on every deploy).
//! 4. The listener closes; idle keep-alive connections are closed; in-flight requests
//!    get `grace_period` to finish.
//! 5. The caller closes its pools and broker connections, then the process exits 0.
//!
//! The one thing not to break: never close the listener before readiness has been false
//! for the drain delay.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::health::Health;

/// A future that resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this function is *called*, not when the future is first
/// polled: call it at the top of `main`, before building the app, so a signal that arrives
/// during start-up is still a graceful shutdown and not the default "die at once".
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            let term = async {
                match term.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = int => tracing::info!(signal = "SIGINT", "shutdown signal received"),
                _ = term => tracing::info!(signal = "SIGTERM", "shutdown signal received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "SIGINT", "shutdown signal received");
    }
}

/// Drives one process through the shutdown sequence. Servers started with
/// [`Lifecycle::serve_http`] (or any server watching [`Lifecycle::stop_token`]) stop accepting
/// when the drain delay is over.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    health: Health,
    stop: CancellationToken,
    drain_delay: Duration,
    grace_period: Duration,
}

/// How long closing one pool or connection may take at the end of shutdown.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Runs one of the last steps of shutdown (closing a pool or a broker connection), bounded
/// by [`CLOSE_LIMIT`]: a peer that never answers must not keep the process alive past its
/// termination grace period.
pub async fn close_within<F: Future<Output = ()>>(what: &str, close: F) {
    if tokio::time::timeout(CLOSE_LIMIT, close).await.is_err() {
        tracing::warn!(
            what,
            limit_ms = CLOSE_LIMIT.as_millis() as u64,
            "close did not finish in time; abandoning it"
        );
    }
}

/// How the shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every server finished its in-flight work within the grace period.
    Clean,
    /// The grace period ran out; remaining requests were cut off.
    GraceExpired,
}

impl Lifecycle {
    /// A lifecycle for `health`, with the drain delay and grace period from `config`.
    pub fn new(health: Health, config: &HttpConfig) -> Self {
        Self {
            health,
            stop: CancellationToken::new(),
            drain_delay: config.drain_delay,
            grace_period: config.grace_period,
        }
    }

    /// Cancelled when listeners must stop accepting (after the drain delay). Background
    /// workers watch it too, to stop taking new work.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Serves `router` on `listener` until the stop token fires, then lets in-flight
    /// requests finish (bounded by [`Lifecycle::finish`]).
    pub fn serve_http(
        &self,
        listener: TcpListener,
        router: Router,
    ) -> JoinHandle<std::io::Result<()>> {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    }

    /// Waits for `signal`, marks the process draining, waits the drain delay, then tells every
    /// server to stop accepting.
    pub async fn drain_on(&self, signal: impl Future<Output = ()>) {
        tokio::select! {
            () = signal => {}
            // Something else (a fatal error, a test) may stop the process directly.
            () = self.stop.cancelled() => {}
        }
        self.health.set_draining();
        tracing::info!(
            drain_delay_ms = self.drain_delay.as_millis() as u64,
            "draining: readiness is now false"
        );
        tokio::time::sleep(self.drain_delay).await;
        tracing::info!("closing listeners; in-flight requests continue");
        self.stop.cancel();
    }

    /// Waits for `servers` to finish their in-flight requests, at most the grace period.
    pub async fn finish(&self, servers: Vec<JoinHandle<std::io::Result<()>>>) -> Drained {
        let all = futures_util::future::join_all(servers);
        match tokio::time::timeout(self.grace_period, all).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "server ended with an error"),
                        Err(e) => tracing::error!(error = %e, "server task failed"),
                    }
                }
                tracing::info!("all in-flight requests finished");
                Drained::Clean
            }
            Err(_) => {
                tracing::warn!(
                    grace_period_ms = self.grace_period.as_millis() as u64,
                    "grace period expired; cutting off remaining requests"
                );
                Drained::GraceExpired
            }
        }
    }

    /// The whole sequence for a process with one HTTP server: serve `router` on `listener`,
    /// wait for `signal`, drain, stop accepting, and let in-flight requests finish.
    pub async fn run_http(
        &self,
        listener: TcpListener,
        router: Router,
        signal: impl Future<Output = ()>,
    ) -> Drained {
        let server = self.serve_http(listener, router);
        self.drain_on(signal).await;
        self.finish(vec![server]).await
    }
}
