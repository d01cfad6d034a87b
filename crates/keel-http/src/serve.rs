//! Serving a router on a listener with the protections a bare `axum::serve` leaves off (P15).
//!
//! The failure: `axum::serve` gives hyper no timer, so hyper's header-read timeout never
//! fires; it accepts every connection the kernel hands it; and hyper-util's protocol sniffing
//! (HTTP/1 or HTTP/2?) waits for the first bytes with no bound at all. A client that opens a
//! connection and then sends one header byte a second (slowloris), or nothing, holds a socket
//! and a task for as long as it likes; a few thousand of them use up the process's file
//! descriptors, and from then on *new* clients are refused while every health check that
//! reuses a connection stays green.
//!
//! What [`serve`] adds, each bound named in [`ServerLimits`]:
//! - **first request deadline** (`header_read_timeout`): a connection must deliver its first
//!   complete request head within this time or it is closed. It covers what hyper cannot:
//!   the protocol sniff and the HTTP/2 preface;
//! - **header-read timeout** (`header_read_timeout` again, inside hyper's HTTP/1 codec, with a
//!   timer given to it): every later request head must arrive in time too. hyper starts that
//!   clock when it begins waiting for the next request, so the same bound is also the **idle
//!   keep-alive timeout** of an HTTP/1 connection;
//! - **header size cap** (`max_header_bytes`): HTTP/1 heads larger than this get 431, HTTP/2
//!   header lists larger than this are refused;
//! - **connection cap** (`max_connections`): past it a new connection is accepted and closed at
//!   once (the client sees the refusal immediately instead of waiting in the kernel's backlog)
//!   and counted in `http_connections_refused_total`. The cap sits below the file-descriptor
//!   limit, so the process refuses politely before `accept` itself starts failing with EMFILE;
//! - **HTTP/2 keep-alive pings** (`http2_keepalive_interval` / `_timeout`): a peer that stopped
//!   answering (a dead pod, a cut network) is closed instead of holding its streams.
//!
//! The body-read deadline is a request-level bound and lives in the stack
//! ([`crate::stack::build`], layer `body_deadline`).
//!
//! Graceful shutdown: when `stop` completes the listener is closed, every connection is told to
//! finish its request in flight and close (idle ones close at once), and [`serve`] returns when
//! the last one has. The caller bounds that wait (keel-service's grace period).
//!
//! Must not break: nothing here waits on a client without a bound.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

/// Open connections gauge name.
pub const CONNECTIONS_OPEN: &str = "http_connections_open";
/// Connections refused at the cap.
pub const CONNECTIONS_REFUSED: &str = "http_connections_refused_total";
/// Connections closed because their first request did not arrive in time.
pub const CONNECTIONS_TIMED_OUT: &str = "http_connections_timed_out_total";

/// `[http.limits]`: the connection-level bounds of an HTTP server. Every field has a default,
/// so a service names only what it changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Time a client has to send a complete request head: the first one from connect, each
    /// later one from when the server starts waiting for it (so also the idle keep-alive
    /// timeout of an HTTP/1 connection).
    #[serde(with = "keel_config::duration")]
    pub header_read_timeout: Duration,
    /// Time a client has to send a whole request body, from the request head; a slower
    /// upload is answered 408 and the connection closed.
    #[serde(with = "keel_config::duration")]
    pub body_read_timeout: Duration,
    /// Connections open at once; further ones are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// How often an idle HTTP/2 connection is pinged.
    #[serde(with = "keel_config::duration")]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "keel_config::duration")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for ServerLimits {
    /// Starting points for an API behind a load balancer: 10 s for a head, 30 s for a body,
    /// 1,024 connections, 16 KiB of headers, an HTTP/2 ping every 20 s answered within 10 s.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Validate for ServerLimits {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "http.limits.header_read_timeout (ms)",
            ms(self.header_read_timeout),
            1,
            300_000,
        )?;
        ensure_range(
            "http.limits.body_read_timeout (ms)",
            ms(self.body_read_timeout),
            1,
            3_600_000,
        )?;
        ensure_range(
            "http.limits.max_connections",
            self.max_connections,
            1,
            1_000_000,
        )?;
        // hyper's read buffer cannot be smaller than 8 KiB; above 1 MiB the cap stops
        // protecting memory (hyper buffers the head).
        ensure_range(
            "http.limits.max_header_bytes",
            self.max_header_bytes,
            8192,
            1024 * 1024,
        )?;
        ensure_range(
            "http.limits.http2_keepalive_interval (ms)",
            ms(self.http2_keepalive_interval),
            1,
            3_600_000,
        )?;
        ensure_range(
            "http.limits.http2_keepalive_timeout (ms)",
            ms(self.http2_keepalive_timeout),
            1,
            600_000,
        )
    }
}

/// Serves `router` on `listener` within `limits` until `stop` completes, then lets the
/// connections finish their requests in flight (module docs).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let builder = Arc::new(builder(limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let first_request_within = limits.header_read_timeout;
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        // Responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let (builder, router, watcher) = (builder.clone(), router.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            let _open = crate::metrics::GaugeGuard::enter(CONNECTIONS_OPEN);
            let first = Arc::new(FirstRequest::default());
            let service = {
                let first = first.clone();
                hyper::service::service_fn(move |request: Request<Incoming>| {
                    first.arrived();
                    router.clone().oneshot(request.map(Body::new))
                })
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let connection = watcher.watch(connection.into_owned());
            tokio::select! {
                // Errors here are the client's (reset, bad request, header timeout): nothing
                // for the server to report beyond what hyper already answered.
                _ = connection => {}
                () = first.missed(first_request_within) => {
                    metrics::counter!(CONNECTIONS_TIMED_OUT).increment(1);
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's read buffer: a head that does not fit is answered 431. (hyper-util's auto
        // builder has no separate head cap; the buffer's floor is 8 KiB.)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// An error from `accept`. Per-connection errors (the peer reset before we got to it) cost
/// nothing; EMFILE/ENFILE/ENOMEM mean the process is out of descriptors or memory, and
/// retrying at once would spin: back off briefly, as hyper's examples and axum do.
async fn accept_failed(e: &io::Error) {
    let per_connection = matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    );
    if !per_connection {
        tracing::error!(error = %e, "accept failed; backing off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a connection's first request head has arrived; [`FirstRequest::missed`] completes
/// if it has not within the bound.
#[derive(Default)]
struct FirstRequest {
    arrived: AtomicBool,
    notify: Notify,
}

impl FirstRequest {
    fn arrived(&self) {
        // Only the first request wakes the watchdog; later ones cost one atomic swap.
        if !self.arrived.swap(true, Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// Completes after `within` if no request arrived by then; never completes otherwise.
    /// (`notify_one` before anyone waits stores a permit, so an early arrival is not missed.)
    async fn missed(&self, within: Duration) {
        if tokio::time::timeout(within, self.notify.notified())
            .await
            .is_ok()
        {
            std::future::pending::<()>().await;
        }
    }
}
