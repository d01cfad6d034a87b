//! notification's skeleton: ready only when both Postgres and RabbitMQ are reachable;
//! alive regardless (P21).
//!
//! The failure side first: a liveness probe that checks the database (written here, in the
//! test) goes red as soon as Postgres is unreachable, which would make Kubernetes restart a
//! healthy process over and over; notification's `/livez` stays 200 through the same outage
//! while `/readyz` reports it. The outage is a `FaultProxy` in front of pgbouncer, cut for
//! this test's connections only.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use keel_testkit::{FaultProxy, ServiceProcess, TestDb, TestVhost, eventually};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_notification");

#[tokio::test]
async fn ready_when_postgres_and_rabbitmq_are_reachable_and_stops_on_sigterm() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let mut vars = db.env();
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0".to_owned()),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s".to_owned()),
        ("KEEL_AMQP__URL", vhost.url()),
    ] {
        vars.push((k.to_owned(), v));
    }
    let mut p = ServiceProcess::spawn(BIN, &[], &vars).await;
    let base = p.base_url();
    let body: serde_json::Value =
        eventually(Duration::from_secs(15), "notification ready", || async {
            let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.json().await.ok()
        })
        .await;
    assert_eq!(body["checks"]["rabbitmq"], "ok");
    assert_eq!(body["checks"]["postgres"], "ok");
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn rabbitmq_unreachable_fails_readiness_but_not_liveness() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let mut vars = db.env();
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        // Nothing listens on port 1: every connection attempt is refused.
        ("KEEL_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/keel"),
    ] {
        vars.push((k.to_owned(), v.to_owned()));
    }
    let mut p = ServiceProcess::spawn(BIN, &[], &vars).await;
    let base = p.base_url();
    // Postgres becomes ready; RabbitMQ never does.
    let body: serde_json::Value =
        eventually(Duration::from_secs(15), "postgres check ok", || async {
            let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            (v["checks"]["postgres"] == "ok").then_some(v)
        })
        .await;
    assert_eq!(body["status"], 503, "{body}");
    assert_ne!(body["checks"]["rabbitmq"], "ok", "{body}");
    assert_eq!(
        reqwest::get(format!("{base}/livez"))
            .await
            .unwrap()
            .status(),
        200
    );
    p.signal("TERM");
    assert!(
        p.wait(Duration::from_secs(10)).await.success(),
        "shutdown does not hang on a broker that never came"
    );
}

/// `GET /livez` as it is often first written: alive means the database answers. Test code
/// only: the failure P21 prevents.
async fn naive_livez(State(pool): State<PgPool>) -> StatusCode {
    let ping = sqlx::query("SELECT 1").execute(&pool);
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Serves [`naive_livez`] on 127.0.0.1:0 over a pool to `database_url`; returns its URL.
async fn serve_naive_livez(database_url: &str) -> String {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(database_url)
        .unwrap();
    let app = axum::Router::new()
        .route("/livez", axum::routing::get(naive_livez))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/livez", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The kubelet's liveness `failureThreshold` (its default): this many failed probes in a row
/// and the container is restarted.
const FAILURE_THRESHOLD: usize = 3;

/// `FAILURE_THRESHOLD` probes of `url`, in a row: their statuses (0: no answer).
async fn probes(client: &reqwest::Client, url: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..FAILURE_THRESHOLD {
        let status = match client.get(url).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        statuses.push(status);
    }
    statuses
}

#[tokio::test]
async fn database_unreachable_turns_a_naive_liveness_probe_red_but_not_livez() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let proxy = FaultProxy::to_pgbouncer().await;
    let database_url = proxy.proxied_url(&db.app_url());
    let mut vars = db.env();
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0".to_owned()),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s".to_owned()),
        ("KEEL_AMQP__URL", vhost.url()),
        ("KEEL_DATABASE__URL", database_url.clone()),
    ] {
        vars.push((k.to_owned(), v));
    }
    let mut p = ServiceProcess::spawn(BIN, &[], &vars).await;
    let base = p.base_url();
    let naive = serve_naive_livez(&database_url).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let readyz = || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        r.json::<serde_json::Value>().await.ok()
    };
    eventually(Duration::from_secs(15), "notification ready", || async {
        (readyz().await?["status"] == "ready").then_some(())
    })
    .await;
    assert_eq!(probes(&client, &naive).await, [200; FAILURE_THRESHOLD]);

    // Postgres becomes unreachable, for this test's connections only.
    proxy.cut();
    let body = eventually(Duration::from_secs(15), "readiness reports it", || async {
        let body = readyz().await?;
        (body["status"] == 503).then_some(body)
    })
    .await;
    assert_ne!(body["checks"]["postgres"], "ok", "{body}");
    assert_eq!(body["checks"]["rabbitmq"], "ok", "{body}");

    // Naive: red on every probe — the kubelet would restart a process that has nothing wrong
    // with it, and the next one would fail the same probe.
    let naive_probes = probes(&client, &naive).await;
    assert!(
        naive_probes.iter().all(|s| *s != 200),
        "naive liveness: {naive_probes:?}"
    );
    // Keel: alive on every probe of the same outage; only readiness takes it out of traffic.
    let livez = probes(&client, &format!("{base}/livez")).await;
    assert_eq!(livez, [200; FAILURE_THRESHOLD], "livez during the outage");
    assert_eq!(readyz().await.unwrap()["status"], 503);
    eprintln!(
        "postgres unreachable: naive liveness answered {naive_probes:?} (a restart after \
         {FAILURE_THRESHOLD}); /livez answered {livez:?}; /readyz: {}",
        body["checks"]
    );

    // The outage ends: the same process becomes ready again by itself, no restart needed.
    proxy.restore();
    eventually(Duration::from_secs(15), "ready again", || async {
        (readyz().await?["status"] == "ready").then_some(())
    })
    .await;
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
}
