//! A readiness-aware TCP load balancer, in process: what a Kubernetes Service does for its
//! pods during a rolling update (P20 graceful shutdown, P21 readiness), small enough to read.
//!
//! Clients connect to [`Balancer::addr`]. Each new connection goes to the next *ready* backend
//! (round robin) and stays with it for its whole life: like kube-proxy, this balances
//! connections, not requests, so a kept-alive connection keeps going to the backend it was
//! opened to. A backend becomes ready when a `GET` of its readiness URL (its `/readyz`) answers
//! 200, and stops being ready after [`FAILURE_THRESHOLD`] probes in a row did not (another
//! status, no answer within [`PROBE_TIMEOUT`], or no connection). Each backend is probed every
//! [`PROBE_INTERVAL`], each probe on a connection of its own: Kubernetes' `readinessProbe` with
//! `successThreshold: 1` and its period scaled down from seconds to a tenth of one, with
//! endpoints that change at once (no propagation delay). So a service whose `/readyz` turns 503 stops getting
//! new connections at most `FAILURE_THRESHOLD * (PROBE_INTERVAL + PROBE_TIMEOUT)` later: its
//! `shutdown.drain_delay` must be longer than that, as in a real cluster it must be longer
//! than the probes plus the endpoint propagation. The threshold and the timeout are what keep
//! a busy machine (a probe answered late once) from taking the only instance out.
//!
//! Failures are shown, not hidden: with no ready backend a new connection is closed at once
//! (a Service with no ready endpoints refuses too), and a connection whose backend refuses
//! it is closed without trying another backend, so routing to a closed listener is a failed
//! request the test sees. Must not break: a backend gets a new connection only while it is
//! ready by its probes.
//!
//! Bounded: at most [`crate::proxy::MAX_CONNECTIONS`] connections at once (extra ones are
//! closed), and opening a backend connection takes at most
//! [`crate::proxy::UPSTREAM_CONNECT_TIMEOUT`]. Probing and forwarding stop when the balancer
//! is dropped.
//!
//! ```no_run
//! # async fn demo(old: std::net::SocketAddr, new: std::net::SocketAddr) {
//! use keel_testkit::Balancer;
//! let lb = Balancer::start().await;       // give lb.url() to the clients
//! lb.add(old, &format!("http://{old}/readyz"));
//! lb.add(new, &format!("http://{new}/readyz"));
//! // once the new instance's /readyz answers 200, lb.routes_to(new) is true
//! lb.remove(old);                          // the old instance is gone
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::proxy::{MAX_CONNECTIONS, UPSTREAM_CONNECT_TIMEOUT};

/// How often each backend's readiness URL is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How long one probe may take; no answer in time is a failed probe. Kubernetes' default
/// (`timeoutSeconds: 1`), and the services' own `http.readiness_timeout`: on a 2-core machine
/// busy with builds, a `/readyz` answered in over 250 ms was seen every few seconds.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Failed probes in a row that take a ready backend out.
pub const FAILURE_THRESHOLD: u32 = 2;

/// One backend: where connections go, and whether its probes say it is ready.
#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    /// Written by its probe task only.
    ready: Arc<AtomicBool>,
    /// Connections routed to it so far.
    routed: AtomicUsize,
    probe: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Backends {
    list: Mutex<Vec<Arc<Backend>>>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Connections closed because no backend was ready (or the balancer was full).
    refused: AtomicUsize,
    /// Connections closed because the backend chosen did not accept them.
    unreachable: AtomicUsize,
}

impl Backends {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Backend>>> {
        // A panicking test thread cannot leave the list half-changed: each change is one call.
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next ready backend after the last one chosen, if any is ready.
    fn pick(&self) -> Option<Arc<Backend>> {
        let list = self.lock();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..list.len())
            .map(|i| &list[(start + i) % list.len()])
            .find(|b| b.ready.load(Ordering::SeqCst))
            .cloned()
    }

    fn find(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        self.lock().iter().find(|b| b.addr == addr).cloned()
    }
}

/// A running balancer; see the module docs.
#[derive(Debug)]
pub struct Balancer {
    addr: SocketAddr,
    backends: Arc<Backends>,
    /// Set to true on drop: every forwarding connection ends.
    closed: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Balancer {
    /// Listens on `127.0.0.1:0` with no backend yet (every connection is refused until one
    /// is added and ready).
    pub async fn start() -> Self {
        // The probes are reqwest clients.
        crate::install_crypto_provider();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the balancer on 127.0.0.1:0");
        let addr = listener.local_addr().expect("balancer address");
        let backends = Arc::new(Backends::default());
        let (closed, closed_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(
            listener,
            backends.clone(),
            Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            closed_rx,
        ));
        Self {
            addr,
            backends,
            closed,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a backend that gets connections once a `GET readiness_url` answers 200, and only
    /// while the latest one does. Probing starts at once.
    pub fn add(&self, addr: SocketAddr, readiness_url: &str) {
        let ready = Arc::new(AtomicBool::new(false));
        let probe = tokio::spawn(probe_loop(readiness_url.to_owned(), ready.clone()));
        self.backends.lock().push(Arc::new(Backend {
            addr,
            ready,
            routed: AtomicUsize::new(0),
            probe,
        }));
    }

    /// Removes the backend at `addr` (the instance is gone): no new connection goes to it and
    /// its probing stops. Connections already open to it are left alone.
    pub fn remove(&self, addr: SocketAddr) {
        self.backends.lock().retain(|b| {
            if b.addr == addr {
                b.probe.abort();
            }
            b.addr != addr
        });
    }

    /// Whether a new connection may go to `addr` now (it is ready, as the module docs say).
    pub fn routes_to(&self, addr: SocketAddr) -> bool {
        self.backends
            .find(addr)
            .is_some_and(|b| b.ready.load(Ordering::SeqCst))
    }

    /// Connections routed to `addr` so far.
    pub fn routed(&self, addr: SocketAddr) -> usize {
        self.backends
            .find(addr)
            .map_or(0, |b| b.routed.load(Ordering::Relaxed))
    }

    /// Connections closed on arrival so far because no backend was ready (or the balancer
    /// held [`MAX_CONNECTIONS`] already).
    pub fn refused(&self) -> usize {
        self.backends.refused.load(Ordering::Relaxed)
    }

    /// Connections closed so far because the backend chosen for them did not accept the
    /// connection (within [`UPSTREAM_CONNECT_TIMEOUT`]): routed to a listener that had closed.
    pub fn unreachable(&self) -> usize {
        self.backends.unreachable.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
        for b in self.backends.lock().iter() {
            b.probe.abort();
        }
        self.closed.send_replace(true);
    }
}

/// Probes `url` every [`PROBE_INTERVAL`]: one answer of 200 makes the backend ready,
/// [`FAILURE_THRESHOLD`] failures in a row make it not ready.
async fn probe_loop(url: String, ready: Arc<AtomicBool>) {
    // A new connection per probe, as the kubelet makes: a kept-alive one would stay open to an
    // instance whose listener has closed and say nothing about whether it still accepts.
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .expect("probe client");
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    loop {
        tick.tick().await;
        if matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) {
            failures = 0;
            ready.store(true, Ordering::SeqCst);
        } else {
            failures = failures.saturating_add(1);
            if failures >= FAILURE_THRESHOLD {
                ready.store(false, Ordering::SeqCst);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    backends: Arc<Backends>,
    slots: Arc<Semaphore>,
    closed: watch::Receiver<bool>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: pause instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (Some(backend), Ok(permit)) = (backends.pick(), slots.clone().try_acquire_owned())
        else {
            drop(client);
            backends.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        backend.routed.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(forward(
            client,
            backend.addr,
            backends.clone(),
            closed.clone(),
            permit,
        ));
    }
}

/// Forwards one connection to `upstream` until either side closes (or the balancer does).
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    backends: Arc<Backends>,
    mut closed: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    // No second try elsewhere: a refused backend connection closes the client's (module docs).
    let Ok(Ok(mut server)) =
        tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
    else {
        backends.unreachable.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        // Passes each side's half-close on, as a direct connection would.
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = closed.wait_for(|c| *c) => {}
    }
}
