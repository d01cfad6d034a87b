//! `grpc.health.v1` costs the database nothing per client (P21 for gRPC): tonic-health answers
//! `Check` and `Watch` from statuses that one task per process keeps current from the health
//! registry, so a `Watch` stream a client abandoned runs no query.
//!
//! The naive variant is the hand-written service billing had before, kept here: its `Watch`
//! evaluated readiness (a Postgres `SELECT 1`) every second *per stream*, and noticed that the
//! client had gone only when it had a change to send — so every abandoned stream kept
//! querying Postgres every second until shutdown.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use billing::{App, Config};
use keel_contracts::grpc_health_v1::HealthCheckRequest;
use keel_contracts::grpc_health_v1::health_check_response::ServingStatus;
use keel_contracts::grpc_health_v1::health_client::HealthClient;
use keel_service::Health;
use keel_testkit::{TestDb, TestVhost, eventually};
use sqlx::PgPool;
use tokio::sync::oneshot;

/// Abandoned `Watch` streams per variant.
const STREAMS: usize = 20;
/// How long query counts are measured for, each time.
const WINDOW: Duration = Duration::from_secs(3);

/// The `grpc.health.v1` billing had: readiness evaluated per `Watch` stream, every second.
mod naive {
    use std::pin::Pin;
    use std::time::Duration;

    use keel_service::Health;
    use tokio_stream::Stream;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Request, Response, Status};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health as HealthApi;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    const WATCH_EVERY: Duration = Duration::from_secs(1);

    pub struct PollingHealth(pub Health);

    impl PollingHealth {
        async fn status(&self) -> ServingStatus {
            if self.0.ready().await.ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        }
    }

    fn response(status: ServingStatus) -> HealthCheckResponse {
        HealthCheckResponse {
            status: status as i32,
        }
    }

    #[tonic::async_trait]
    impl HealthApi for PollingHealth {
        async fn check(
            &self,
            _: Request<HealthCheckRequest>,
        ) -> Result<Response<HealthCheckResponse>, Status> {
            Ok(Response::new(response(self.status().await)))
        }

        type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

        async fn watch(
            &self,
            _: Request<HealthCheckRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let this = PollingHealth(self.0.clone());
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    let status = this.status().await;
                    if last != Some(status) {
                        if tx.send(Ok(response(status))).await.is_err() {
                            return; // the client went away — noticed only here
                        }
                        last = Some(status);
                    }
                    if this.0.is_draining() {
                        return;
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }
}

/// Adds a check to `health` that runs `SELECT 1` on `db` and counts it: every readiness
/// evaluation is one more query, as the `postgres` check's own ping is.
fn count_queries(health: &Health, db: &PgPool) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let (c, db) = (count.clone(), db.clone());
    health.add_check("counted query", move || {
        let (c, db) = (c.clone(), db.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            keel_pg::ping(&db).await
        }
    });
    count
}

/// Queries counted during one window.
async fn queries_in_window(count: &AtomicU64) -> u64 {
    let before = count.load(Ordering::SeqCst);
    // A measurement window, not a wait for a condition: the rate over it is the result.
    tokio::time::sleep(WINDOW).await;
    count.load(Ordering::SeqCst) - before
}

fn per_second(queries: u64) -> f64 {
    queries as f64 / WINDOW.as_secs_f64()
}

/// Opens `STREAMS` `Watch` streams to `addr`, each on its own connection, reads the first
/// status of each, then drops them all: the clients are gone.
async fn open_and_abandon_watch_streams(addr: SocketAddr) {
    for _ in 0..STREAMS {
        let mut client = HealthClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut stream = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        drop(stream);
        drop(client);
    }
}

async fn config(db: &TestDb, vhost: &TestVhost, extra: &[(&str, &str)]) -> Config {
    let (db_url, amqp_url) = (db.app_url(), vhost.url());
    let mut vars = vec![
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_GRPC__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ("KEEL_DATABASE__URL", db_url.as_str()),
        ("KEEL_AMQP__URL", amqp_url.as_str()),
    ];
    vars.extend_from_slice(extra);
    keel_testkit::config(billing::DEFAULT_CONFIG, &vars)
}

/// A running billing: its gRPC address, its health registry's query counter, its stop.
struct Running {
    grpc: SocketAddr,
    queries: Arc<AtomicU64>,
    stop: oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<keel_service::Drained, keel_service::ServiceError>>,
}

async fn start(config: Config, db: &PgPool) -> Running {
    let app = App::build(config).await.unwrap();
    let queries = count_queries(app.health(), db);
    let (grpc, http) = (app.grpc_addr(), format!("http://{}", app.local_addr()));
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    eventually(Duration::from_secs(10), "billing /readyz", || async {
        let r = reqwest::get(format!("{http}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    Running {
        grpc,
        queries,
        stop,
        run,
    }
}

#[tokio::test]
async fn abandoned_watch_streams_query_postgres_every_second_with_a_per_stream_poll_and_never_with_the_reporter()
 {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = PgPool::connect(&db.app_url()).await.unwrap();

    // Naive: the old service over a health registry of its own, with the same counted query.
    let naive_health = Health::new(Duration::from_secs(1));
    let naive_queries = count_queries(&naive_health, &pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let naive_addr = listener.local_addr().unwrap();
    let naive_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic_health::pb::health_server::HealthServer::new(
                naive::PollingHealth(naive_health.clone()),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // Keel: billing itself, whose registry gets the same counted query.
    let keel = start(config(&db, &vhost, &[]).await, &pool).await;

    // With no stream open: the naive variant queries nothing, Keel's reporter once a second.
    let (naive_idle, keel_idle) = tokio::join!(
        queries_in_window(&naive_queries),
        queries_in_window(&keel.queries)
    );

    open_and_abandon_watch_streams(naive_addr).await;
    open_and_abandon_watch_streams(keel.grpc).await;
    let (naive_leaked, keel_leaked) = tokio::join!(
        queries_in_window(&naive_queries),
        queries_in_window(&keel.queries)
    );
    eprintln!(
        "{STREAMS} abandoned Watch streams, queries/s over {WINDOW:?}: naive {:.1} (idle {:.1}), \
         tonic-health + reporter {:.1} (idle {:.1})",
        per_second(naive_leaked),
        per_second(naive_idle),
        per_second(keel_leaked),
        per_second(keel_idle),
    );

    // The naive variant: about one query per second per abandoned stream, for good.
    let expected = STREAMS as u64 * (WINDOW.as_secs() - 1);
    assert!(
        naive_leaked - naive_idle >= expected,
        "naive: {naive_leaked} queries in {WINDOW:?} with {STREAMS} abandoned streams \
         (idle {naive_idle}); expected at least {expected} more"
    );
    // Keel: the abandoned streams add nothing to the reporter's one evaluation a second
    // (one of slack for a tick falling on the window's edge).
    assert!(
        keel_leaked <= keel_idle + 1,
        "keel: {keel_leaked} queries with {STREAMS} abandoned streams, {keel_idle} without"
    );
    assert!(
        keel_idle <= WINDOW.as_secs() + 1,
        "one evaluation per health_interval (1s): {keel_idle}"
    );

    naive_health.set_draining(); // ends the naive variant's leaked tasks
    naive_server.abort();
    keel.stop.send(()).unwrap();
    keel.run.await.unwrap().unwrap();
}

#[tokio::test]
async fn check_answers_from_the_reporter_without_a_query_of_its_own() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = PgPool::connect(&db.app_url()).await.unwrap();
    // Evaluations only once a minute: every query seen below would be a Check's own.
    let keel = start(
        config(&db, &vhost, &[("KEEL_GRPC__HEALTH_INTERVAL", "60s")]).await,
        &pool,
    )
    .await;
    let mut client = HealthClient::connect(format!("http://{}", keel.grpc))
        .await
        .unwrap();
    // `/readyz` said ready above and handed its answer to the reporter, which sets the status
    // in its own task: wait (bounded) until Check sees it before counting.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: "billing".to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("Check reports SERVING within 10 s");
    let before = keel.queries.load(Ordering::SeqCst);
    for service in ["", "billing", "", "billing"].iter().cycle().take(50) {
        let status = client
            .check(HealthCheckRequest {
                service: (*service).to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    assert_eq!(
        keel.queries.load(Ordering::SeqCst),
        before,
        "50 Checks, no query"
    );
    keel.stop.send(()).unwrap();
    keel.run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_open_watch_stream_sees_not_serving_and_ends_so_shutdown_does_not_wait_for_it() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = PgPool::connect(&db.app_url()).await.unwrap();
    // A long grace period: a stream that held the shutdown up would show as a slow stop.
    let keel = start(
        config(
            &db,
            &vhost,
            &[
                ("KEEL_SHUTDOWN__DRAIN_DELAY", "500ms"),
                ("KEEL_SHUTDOWN__GRACE_PERIOD", "20s"),
            ],
        )
        .await,
        &pool,
    )
    .await;
    let mut client = HealthClient::connect(format!("http://{}", keel.grpc))
        .await
        .unwrap();
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "billing".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    // The stream starts with the status the reporter holds; under load its first refresh may
    // come after the stream opens, so wait (bounded) for SERVING rather than assume it.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let update = stream.message().await.unwrap().unwrap();
            if update.status == ServingStatus::Serving as i32 {
                break;
            }
        }
    })
    .await
    .expect("the Watch stream reports SERVING within 10 s");
    let err = client
        .check(HealthCheckRequest {
            service: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "a service it does not serve"
    );

    let stopping = Instant::now();
    keel.stop.send(()).unwrap();
    let next = stream.message().await.unwrap().unwrap();
    assert_eq!(
        next.status,
        ServingStatus::NotServing as i32,
        "told at once"
    );
    assert!(
        stream.message().await.unwrap_or(None).is_none(),
        "the stream ends when listeners close"
    );
    let drained = keel.run.await.unwrap().unwrap();
    assert_eq!(drained, keel_service::Drained::Clean);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped in {:?}, not after the 20 s grace period",
        stopping.elapsed()
    );
}
