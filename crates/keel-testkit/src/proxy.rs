//! An in-process TCP fault proxy: put it between a service and a dependency (RabbitMQ,
//! pgbouncer, billing's gRPC port) and break the link on purpose.
//!
//! The kernel here has no `tc netem`, and stopping the shared RabbitMQ or Postgres would
//! break every other test running in parallel. A proxy per test breaks only that test's
//! connections:
//! - [`FaultProxy::cut`] closes every open connection and closes each new one right after
//!   accepting it (the client sees EOF, like a crashed or partitioned peer);
//! - [`FaultProxy::restore`] lets connections through again;
//! - [`FaultProxy::set_latency`] delays every chunk forwarded, in both directions.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (extra ones are closed), and a
//! connection to the upstream must open within [`UPSTREAM_CONNECT_TIMEOUT`]. Everything
//! stops when the proxy is dropped.
//!
//! ```no_run
//! # async fn demo() {
//! use keel_testkit::{FaultProxy, TestVhost};
//! let vhost = TestVhost::create().await;
//! let proxy = FaultProxy::to_amqp().await; // or FaultProxy::start(any_socket_addr)
//! let url = proxy.proxied_url(&vhost.url()); // give this URL to the code under test
//! proxy.cut();     // the broker "goes away" for that code only
//! proxy.restore(); // and comes back
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::stack::Stack;

/// Most connections proxied at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long opening the upstream connection may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    cut: bool,
    latency: Duration,
}

/// A running proxy from [`FaultProxy::addr`] to an upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    slots: Arc<Semaphore>,
    refused: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let (faults, rx) = watch::channel(Faults::default());
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let refused = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            rx,
            slots.clone(),
            refused.clone(),
        ));
        Self {
            addr,
            upstream,
            faults,
            slots,
            refused,
            accept,
        }
    }

    /// A proxy to the stack's RabbitMQ (AMQP port).
    pub async fn to_amqp() -> Self {
        Self::start(loopback(Stack::load().amqp_port)).await
    }

    /// A proxy to the stack's pgbouncer (what `TestDb::app_url` uses).
    pub async fn to_pgbouncer() -> Self {
        Self::start(loopback(Stack::load().pgbouncer_port)).await
    }

    /// A proxy to the stack's Postgres (the direct port).
    pub async fn to_postgres() -> Self {
        Self::start(loopback(Stack::load().pg_port)).await
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with the upstream's `127.0.0.1:<port>` replaced by the proxy's address.
    ///
    /// # Panics
    /// If `url` does not contain the upstream's `127.0.0.1:<port>`.
    pub fn proxied_url(&self, url: &str) -> String {
        let from = format!("127.0.0.1:{}", self.upstream.port());
        assert!(
            url.contains(&from),
            "URL does not point at the proxy's upstream {from}"
        );
        url.replacen(&from, &self.addr.to_string(), 1)
    }

    /// Closes every open connection and every new one until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.cut = true);
    }

    /// Lets connections through again (clients must reconnect; cut ones stay closed).
    pub fn restore(&self) {
        self.faults.send_modify(|f| f.cut = false);
    }

    /// Delays every forwarded chunk by `latency`, both directions (zero turns it off).
    pub fn set_latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    /// Connections closed on arrival so far (cut, or over [`MAX_CONNECTIONS`]): a test can
    /// wait for a client's reconnect attempts instead of sleeping.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        MAX_CONNECTIONS - self.slots.available_permits()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connection tasks end when they see the cut (or the sender gone).
        self.faults.send_modify(|f| f.cut = true);
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    slots: Arc<Semaphore>,
    refused: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: pause instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if faults.borrow().cut {
            drop(client);
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(client);
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(pipe(client, upstream, faults.clone(), permit));
    }
}

async fn pipe(
    client: TcpStream,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    _permit: OwnedSemaphorePermit,
) {
    let Ok(Ok(server)) =
        tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = {
        let (up, down) = (faults.clone(), faults.clone());
        async move {
            tokio::join!(
                copy(client_read, server_write, up),
                copy(server_read, client_write, down),
            )
        }
    };
    let cut = async {
        loop {
            if faults.borrow_and_update().cut {
                return;
            }
            if faults.changed().await.is_err() {
                return;
            }
        }
    };
    // Either both directions finish, or a cut drops all four halves: both sockets close.
    tokio::select! {
        _ = forward => {}
        () = cut => {}
    }
}

async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, faults: watch::Receiver<Faults>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let latency = faults.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Pass the half-close on, as a direct connection would.
    let _ = to.shutdown().await;
}
