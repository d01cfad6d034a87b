//! The service runtime's promises (P20, P21, P28), each through a real `Service`: nothing runs
//! before `run`, stages stop in order and within their bounds, and a background task that ends
//! early stops the process instead of leaving it half-alive.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_http::HttpConfig;
use keel_service::{Drained, Health, Service, ServiceError, ShutdownConfig, Stage};
use keel_telemetry::{LagMonitor, TelemetryConfig};
use tokio_util::sync::CancellationToken;

fn http() -> HttpConfig {
    HttpConfig {
        host: [127, 0, 0, 1].into(),
        port: 0,
        body_limit_bytes: 1024,
        request_timeout: Duration::from_secs(2),
        readiness_timeout: Duration::from_millis(200),
        limits: keel_http::ServerLimits::default(),
    }
}

fn shutdown(stage_bound: Duration) -> ShutdownConfig {
    ShutdownConfig {
        drain_delay: Duration::ZERO,
        grace_period: Duration::from_secs(2),
        consumers: stage_bound,
        workers: stage_bound,
        relays: stage_bound,
        broker: stage_bound,
        pools: stage_bound,
    }
}

fn telemetry() -> TelemetryConfig {
    TelemetryConfig {
        log_level: "info".to_owned(),
        lag_probe_interval: Duration::from_millis(20),
        max_runtime_lag: Duration::from_millis(200),
    }
}

fn service(stage_bound: Duration) -> Service {
    Service::new("svc-test", &http(), &shutdown(stage_bound), &telemetry())
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test]
async fn a_built_but_dropped_service_leaves_no_task_behind() {
    let before = alive_tasks();
    let mut svc = service(Duration::from_secs(1));
    let _addr = svc.http(axum::Router::new()).await.unwrap();
    // A lazy pool and a broker: neither connects; the pool's own reaper task (sqlx) ends with
    // the pool.
    let database: keel_pg::DatabaseConfig = serde_json::from_value(serde_json::json!({
        "url": "postgres://app:pw@127.0.0.1:1/nowhere",
        "migrate_url": "postgres://owner:pw@127.0.0.1:1/nowhere",
        "max_connections": 2,
        "acquire_timeout": "1s",
    }))
    .unwrap();
    let amqp: keel_amqp::AmqpConfig = serde_json::from_value(serde_json::json!({
        "url": "amqp://guest:guest@127.0.0.1:1/keel",
        "connect_timeout": "1s",
        "max_backoff": "1s",
    }))
    .unwrap();
    let _pool = svc.postgres(&database).unwrap();
    let _broker = svc.broker(&amqp, keel_service::BrokerReadiness::Required);
    svc.worker("worker", |stop| async move { stop.cancelled().await });
    svc.consumer("consumer", |stop| async move { stop.cancelled().await });
    drop(svc);
    drop(_pool);
    // The pool's reaper sees its pool closed at its next poll.
    for _ in 0..100 {
        if alive_tasks() == before {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "tasks left behind: {} before, {} after",
        before,
        alive_tasks()
    );
}

#[tokio::test]
async fn stages_stop_in_order_consumers_then_workers_then_relays() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let consumer_stopped = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let worker_stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut svc = service(Duration::from_secs(5));
    {
        let (order, gate, stopped) = (order.clone(), gate.clone(), consumer_stopped.clone());
        svc.consumer("consumer", move |stop| async move {
            stop.cancelled().await;
            stopped.notify_one();
            // Settling in-flight messages: held until the test lets it finish.
            gate.notified().await;
            order.lock().unwrap().push("consumer");
        });
    }
    {
        let (order, flag) = (order.clone(), worker_stopped.clone());
        svc.worker("worker", move |stop| async move {
            stop.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            order.lock().unwrap().push("worker");
        });
    }
    {
        let order = order.clone();
        svc.task(Stage::Relays, "relay", move |stop| async move {
            stop.cancelled().await;
            order.lock().unwrap().push("relay");
        });
    }
    let signal = CancellationToken::new();
    let run = tokio::spawn(svc.run(signal.clone().cancelled_owned()));
    signal.cancel();
    tokio::time::timeout(Duration::from_secs(5), consumer_stopped.notified())
        .await
        .expect("the consumer was told to stop");
    // While the consumer is still settling, the worker must not have been told to stop: give
    // a runtime that stopped every stage at once every chance to show it (this test runs on
    // one thread, so each yield lets every ready task run).
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
    assert!(
        !worker_stopped.load(std::sync::atomic::Ordering::SeqCst),
        "workers were stopped while a consumer was still settling"
    );
    gate.notify_one();
    assert_eq!(run.await.unwrap().unwrap(), Drained::Clean);
    assert_eq!(*order.lock().unwrap(), ["consumer", "worker", "relay"]);
}

/// `GET /slow`: announces it is inside its handler on `entered`, then works until `release`.
fn slow_route(
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
) -> axum::Router {
    axum::Router::new().route(
        "/slow",
        axum::routing::get(move || async move {
            entered.notify_one();
            // The request's own work, still running when the signal comes.
            release.notified().await;
            "done"
        }),
    )
}

/// Runs `main` as a process runs its `main`: on a runtime of its own (on its own thread),
/// dropped with every task still on it — accepted connections included — the moment `main`
/// returns. What a server leaves unfinished when it returns is then cut, as at process exit.
fn as_process<F, Fut>(main: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(main());
    })
}

/// A server's `main` as it is often first written: `axum::serve` without graceful shutdown,
/// raced against the stop signal; when the signal wins, `main` returns. Test code only: the
/// failure P20 prevents.
async fn naive_main(
    routes: axum::Router,
    addr: tokio::sync::oneshot::Sender<std::net::SocketAddr>,
    signal: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    addr.send(listener.local_addr().unwrap()).unwrap();
    tokio::select! {
        _ = axum::serve(listener, routes) => {}
        _ = signal => {}
    }
}

#[tokio::test]
async fn an_abrupt_stop_cuts_the_in_flight_request_that_a_graceful_stop_finishes() {
    keel_testkit::install_crypto_provider();
    let client = reqwest::Client::new();

    // Naive: a request is inside its handler when the signal comes.
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (addr_tx, addr) = tokio::sync::oneshot::channel();
    let (stop, signal) = tokio::sync::oneshot::channel();
    let routes = slow_route(entered.clone(), release);
    let process = as_process(move || naive_main(routes, addr_tx, signal));
    let addr = addr.await.unwrap();
    let request = tokio::spawn(client.get(format!("http://{addr}/slow")).send());
    tokio::time::timeout(Duration::from_secs(5), entered.notified())
        .await
        .expect("the request reached the naive handler");
    stop.send(()).unwrap();
    let cut = request.await.unwrap().unwrap_err();
    assert!(
        !cut.is_timeout() && cut.status().is_none(),
        "the connection was dropped under the request: {cut}"
    );
    tokio::task::spawn_blocking(move || process.join().unwrap())
        .await
        .unwrap();

    // Keel: the same request, the same signal, the same process exit once `run` returns.
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (drained_tx, mut drained) = tokio::sync::oneshot::channel();
    let signal = CancellationToken::new();
    let process = as_process({
        let (routes, signal) = (slow_route(entered.clone(), release.clone()), signal.clone());
        move || async move {
            let mut svc = service(Duration::from_secs(1));
            let health = svc.health().clone();
            let addr = svc.http(routes).await.unwrap();
            ready_tx.send((addr, health)).unwrap();
            let result = svc.run(signal.cancelled_owned()).await;
            drained_tx.send(result.unwrap()).unwrap();
        }
    });
    let (addr, health) = ready.await.unwrap();
    let request = tokio::spawn(client.get(format!("http://{addr}/slow")).send());
    tokio::time::timeout(Duration::from_secs(5), entered.notified())
        .await
        .expect("the request reached its handler");
    signal.cancel();
    let mut draining = health.draining_changes();
    tokio::time::timeout(Duration::from_secs(5), draining.wait_for(|d| *d))
        .await
        .expect("readiness turned false")
        .unwrap();
    keel_testkit::eventually(Duration::from_secs(5), "the listener closed", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The listener is closed and the request still in its handler: `run` must be waiting for
    // it. A server that stopped at the signal has nothing left to wait for and returns (and
    // the process exits) within milliseconds; 300 ms is ample to see that.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut drained)
            .await
            .is_err(),
        "run returned with a request in flight"
    );
    release.notify_one();
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "done");
    assert_eq!(drained.await.unwrap(), Drained::Clean);
    tokio::task::spawn_blocking(move || process.join().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stage_that_overruns_its_bound_is_cut_and_reported() {
    let mut svc = service(Duration::from_millis(200));
    // A worker that ignores its stop token (a stuck job).
    svc.worker("stuck worker", |_stop| std::future::pending::<()>());
    let started = Instant::now();
    let signal = CancellationToken::new();
    signal.cancel();
    let drained = svc.run(signal.cancelled_owned()).await.unwrap();
    assert_eq!(drained, Drained::GraceExpired);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_background_task_that_returns_early_stops_the_process_with_an_error() {
    let mut svc = service(Duration::from_secs(1));
    svc.worker("quitter", |_stop| async {});
    let health = svc.health().clone();
    // No signal ever comes: the early end alone must stop the service.
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        svc.run(std::future::pending::<()>()),
    )
    .await
    .expect("the service stopped by itself");
    match result {
        Err(ServiceError::TaskEnded { name, how }) => {
            assert_eq!(name, "quitter");
            assert_eq!(how, "returned");
        }
        other => panic!("expected TaskEnded, got {other:?}"),
    }
    assert!(health.is_draining(), "it went through the staged shutdown");
}

#[tokio::test]
async fn a_panicking_background_task_stops_the_process_with_an_error() {
    let mut svc = service(Duration::from_secs(1));
    svc.consumer("panicker", |_stop| async {
        let v: Option<u8> = std::hint::black_box(None);
        v.expect("a bug in a handler");
    });
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        svc.run(std::future::pending::<()>()),
    )
    .await
    .expect("the service stopped by itself");
    assert!(
        matches!(&result, Err(ServiceError::TaskEnded { name, how }) if name == "panicker" && *how == "panicked"),
        "{result:?}"
    );
}

#[tokio::test]
async fn livez_ignores_dependencies_while_readyz_reports_them() {
    let health = Health::new(Duration::from_millis(100));
    health.add_check("database", || async { Err("unreachable".to_owned()) });
    health.add_check("hangs", std::future::pending::<Result<(), String>>);
    let started = Instant::now();
    let r = health.ready().await;
    assert!(!r.ready);
    assert_eq!(r.checks["database"], "unreachable");
    assert!(r.checks["hangs"].starts_with("no answer within"), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a hanging check is bounded"
    );

    // Through the HTTP stack: /livez stays 200, /readyz is a 503 problem.
    let mut svc = Service::new(
        "svc-test",
        &http(),
        &shutdown(Duration::from_secs(1)),
        &telemetry(),
    );
    svc.health()
        .add_check("database", || async { Err("unreachable".to_owned()) });
    let addr = svc.http(axum::Router::new()).await.unwrap();
    let signal = CancellationToken::new();
    let run = tokio::spawn(svc.run(signal.clone().cancelled_owned()));
    let client = reqwest::Client::new();
    let livez = client
        .get(format!("http://{addr}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        livez.status(),
        200,
        "liveness never depends on the database"
    );
    let readyz = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    assert_eq!(readyz.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = readyz.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "unreachable");
    signal.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn readiness_turns_false_for_good_when_draining() {
    let health = Health::new(Duration::from_millis(100));
    health.add_check("database", || async { Ok(()) });
    assert!(health.ready().await.ready);
    health.set_draining();
    let r = health.ready().await;
    assert!(!r.ready && r.draining, "{r:?}");
}

/// P28: one worker thread, so a task that blocks it (standing in for a synchronous DNS lookup
/// or a CPU loop) stalls every task — including the lag probe, which measures exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocked_runtime_shows_as_lag_and_fails_readiness() {
    let stop = CancellationToken::new();
    let lag = LagMonitor::spawn(Duration::from_millis(20), stop.clone());
    let health = Health::new(Duration::from_secs(1));
    health.watch_runtime_lag(lag.clone(), Duration::from_millis(200));
    ready_is(&health, true, "ready before the stall").await;

    tokio::spawn(async { std::thread::sleep(Duration::from_millis(600)) })
        .await
        .unwrap();
    ready_is(&health, false, "the stall fails readiness").await;
    let r = health.ready().await;
    assert!(r.checks["runtime"].starts_with("scheduler lag"), "{r:?}");
    assert!(
        lag.recent_max() >= Duration::from_millis(400),
        "{:?}",
        lag.recent_max()
    );
    // It recovers by itself once the stall has left the window (50 × 20 ms).
    ready_is(&health, true, "ready again once the stall left the window").await;
    stop.cancel();
}

async fn ready_is(health: &Health, ready: bool, what: &str) {
    keel_testkit::eventually(Duration::from_secs(5), what, || async {
        (health.ready().await.ready == ready).then_some(())
    })
    .await;
}
