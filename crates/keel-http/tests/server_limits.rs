//! P15 proofs: slow clients against a bare `axum::serve` (the failure) and against
//! [`keel_http::serve`] with the Keel stack (the fix), over real sockets on loopback.
//!
//! Every client loop is bounded in count and time and stops by itself.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use keel_http::{HttpConfig, ReadinessProbe, ServerLimits};
use keel_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The header and body deadlines these tests configure: short, so the proofs are quick.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack for "cut within the configured time": timers fire on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);
/// How many slow connections attack the server.
const SLOW_CLIENTS: usize = 200;

fn limits(max_connections: usize) -> ServerLimits {
    ServerLimits {
        header_read_timeout: HEADER_TIMEOUT,
        body_read_timeout: BODY_TIMEOUT,
        max_connections,
        ..ServerLimits::default()
    }
}

fn routes() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/upload",
            post(|body: String| async move { body.len().to_string() }),
        )
}

fn keel_router(limits: &ServerLimits) -> Router {
    let config = HttpConfig {
        host: [127, 0, 0, 1].into(),
        port: 0,
        body_limit_bytes: 1024 * 1024,
        // Long, so that what cuts a slow body here is the body deadline, not this.
        request_timeout: Duration::from_secs(60),
        readiness_timeout: Duration::from_millis(200),
        limits: limits.clone(),
    };
    keel_http::stack::build(routes(), ReadinessProbe::always_ready(), &config)
}

/// A running server and the switch that stops it.
struct Server {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// What Keel replaced: `axum::serve`, no timer, no cap.
async fn bare_axum() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, routes())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server { addr, _stop: stop }
}

async fn keel(limits: ServerLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let router = keel_router(&limits);
    tokio::spawn(async move {
        keel_http::serve(listener, router, &limits, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server { addr, _stop: stop }
}

/// How a slow client behaves.
#[derive(Clone, Copy, Debug)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request head one byte a second and never finishes it.
    Header,
    /// Sends a whole head announcing a body, then one body byte a second.
    Body,
}

/// Opens a connection and plays `how` for at most `budget`; returns how long the server kept
/// the connection open, or `None` if it was still open when the budget ran out.
async fn slow_client(
    addr: SocketAddr,
    how: Slow,
    budget: Duration,
    connected: std::sync::Arc<tokio::sync::Semaphore>,
) -> Option<Duration> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    connected.add_permits(1);
    let start = Instant::now();
    let trickle: Vec<u8> = match how {
        Slow::Silent => Vec::new(),
        Slow::Header => b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Padding: ".repeat(20),
        Slow::Body => {
            stream
                .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n")
                .await
                .unwrap();
            vec![b'a'; 1000]
        }
    };
    let mut next = trickle.iter();
    let mut buf = [0u8; 1024];
    while start.elapsed() < budget {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // EOF or reset: the server closed the connection. (A 408 answer is read
                // first and then the EOF.)
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(byte) = next.next()
                    && stream.write_all(&[*byte]).await.is_err()
                {
                    return Some(start.elapsed());
                }
            }
        }
    }
    None
}

/// Launches `n` slow clients of each kind in `kinds`, round robin, on a runtime of their own
/// (one OS thread), so the attacker's own work is not scheduled among the normal clients'
/// tasks. Returns once every client has connected; the handle yields what each saw.
async fn attack(
    addr: SocketAddr,
    kinds: &[Slow],
    n: usize,
    budget: Duration,
) -> std::thread::JoinHandle<Vec<Option<Duration>>> {
    let kinds = kinds.to_vec();
    let connected = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let signal = connected.clone();
    let attacker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let clients: Vec<_> = (0..n)
                .map(|i| {
                    let signal = signal.clone();
                    tokio::spawn(slow_client(addr, kinds[i % kinds.len()], budget, signal))
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            for c in clients {
                out.push(c.await.unwrap());
            }
            out
        })
    });
    let _all = connected
        .acquire_many(u32::try_from(n).unwrap())
        .await
        .unwrap();
    attacker
}

fn client() -> reqwest::Client {
    keel_testkit::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// p99 of GETs from 4 concurrent tasks sharing `client`'s pooled connections, sent for
/// `window` (and at most 80,000 of them).
async fn p99(client: &reqwest::Client, addr: SocketAddr, window: Duration) -> Duration {
    let url = format!("http://{addr}/hello");
    let until = Instant::now() + window;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until && samples.len() < 20_000 {
                let start = Instant::now();
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                samples.push(start.elapsed());
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    all[all.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_hold_a_bare_server_but_keel_cuts_them_while_others_are_served() {
    // The failure: against a bare axum::serve, slow-header, slow-body and silent connections
    // are all still open at three times the header timeout.
    let bare = bare_axum().await;
    let budget = HEADER_TIMEOUT * 3;
    let kinds = [Slow::Silent, Slow::Header, Slow::Body];
    let attacker = attack(bare.addr, &kinds, 30, budget).await;
    for (i, held) in attacker.join().unwrap().into_iter().enumerate() {
        assert_eq!(
            held,
            None,
            "the bare server closed a {:?} client",
            kinds[i % 3]
        );
    }

    // The fix: Keel's server. Baseline first; then 200 slow clients connect, and normal
    // clients run from then until past the moment the slow ones are cut.
    let server = keel(limits(1024)).await;
    let client = client();
    // Warm up (connections opened, code paths paged in), then the baseline.
    p99(&client, server.addr, Duration::from_millis(300)).await;
    let baseline = p99(&client, server.addr, Duration::from_secs(2)).await;
    let attacker = attack(server.addr, &kinds, SLOW_CLIENTS, HEADER_TIMEOUT * 4).await;
    let loaded = p99(
        &client,
        server.addr,
        HEADER_TIMEOUT + Duration::from_secs(1),
    )
    .await;
    let mut longest = Duration::ZERO;
    for held in attacker.join().unwrap() {
        longest = longest.max(held.expect("a slow client outlived its deadline"));
    }
    eprintln!(
        "{SLOW_CLIENTS} slow clients: longest held {longest:?}; normal p99 {baseline:?} alone, {loaded:?} under attack"
    );
    assert!(
        longest <= HEADER_TIMEOUT.max(BODY_TIMEOUT) + SLACK,
        "a slow client was held {longest:?}"
    );
    // Below a millisecond, a 2-core machine's scheduling noise is the whole measurement; the
    // baseline is floored there so the ratio compares latencies, not jitter.
    let floor = baseline.max(Duration::from_millis(1));
    assert!(
        loaded <= floor * 2,
        "normal p99 {loaded:?} under attack, {baseline:?} alone"
    );
}

#[tokio::test]
async fn a_slow_body_gets_408_from_keel_and_the_connection_is_closed() {
    let server = keel(limits(16)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(BODY_TIMEOUT + SLACK, stream.read_to_end(&mut answer))
        .await
        .expect("the connection was not closed in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(start.elapsed() >= BODY_TIMEOUT - Duration::from_millis(100));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = keel(limits(16)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: hyper's header clock runs while it waits for the next request.
    let idle = Instant::now();
    let n = tokio::time::timeout(HEADER_TIMEOUT + SLACK, stream.read(&mut buf))
        .await
        .expect("the idle connection was kept past the header timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server closed the idle connection");
    assert!(idle.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(100));
}

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_is_closed_at_once_and_served_again_after() {
    let server = keel(limits(4)).await;
    let held: Vec<TcpStream> =
        futures_util::future::join_all((0..4).map(|_| TcpStream::connect(server.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    // The fifth is accepted and closed: EOF long before any timeout.
    let mut fifth = TcpStream::connect(server.addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(500), fifth.read(&mut buf))
        .await
        .expect("a refused connection must be closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "refused: {}", String::from_utf8_lossy(&buf[..n]));
    // Once the four close, a client is served again.
    drop(held);
    let client = client();
    let body = eventually(Duration::from_secs(5), "a client is served again", || {
        let client = client.clone();
        let url = format!("http://{}/hello", server.addr);
        async move { client.get(url).send().await.ok()?.text().await.ok() }
    })
    .await;
    assert_eq!(body, "hello");
}
