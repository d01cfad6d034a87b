//! `GET /v1/products` end to end: in-process `App`, its own database cloned from the migrated
//! template, reached through pgbouncer as `checkout_app` (the production path).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use checkout::{App, Config};
use keel_testkit::{TestDb, eventually};

async fn start(
    db_url: &str,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config: Config = keel_testkit::config(
        checkout::DEFAULT_CONFIG,
        &[
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_DATABASE__URL", db_url),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ],
    );
    let app = App::build(config).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        app.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (base, tx, handle)
}

#[tokio::test]
async fn products_are_served_from_postgres_through_pgbouncer() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let (base, stop, handle) = start(&db.app_url()).await;
    let client = reqwest::Client::new();

    let ready = eventually(Duration::from_secs(10), "checkout ready", || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["postgres"], "ok");

    let r = client
        .get(format!("{base}/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let products = body["products"].as_array().unwrap();
    assert_eq!(products.len(), 7, "the seeded catalogue: {body}");
    let mug = products.iter().find(|p| p["sku"] == "KEEL-MUG").unwrap();
    assert_eq!(
        mug["price"],
        serde_json::json!({"minor": 1200, "currency": "EUR"})
    );

    // A product added to *this test's* database shows up: the data really comes from it.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.admin_url())
        .await
        .unwrap();
    sqlx::query("INSERT INTO products (sku, name, price_minor, currency) VALUES ('TEST-1', 'Test', 1, 'EUR')")
        .execute(&mut admin)
        .await
        .unwrap();
    let body: serde_json::Value = client
        .get(format!("{base}/v1/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["products"].as_array().unwrap().len(), 8);

    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn database_down_fails_readiness_but_liveness_stays_green() {
    // Port 1 on loopback: nothing listens there, so every connection attempt is refused.
    let (base, stop, handle) = start("postgres://checkout_app:x@127.0.0.1:1/keel_checkout").await;
    let client = reqwest::Client::new();

    let r = client.get(format!("{base}/livez")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the process is alive; restarting it would not help"
    );

    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_ne!(body["checks"]["postgres"], "ok", "{body}");
    assert_eq!(body["checks"]["runtime"], "ok", "{body}");
    assert!(
        !body.to_string().contains("127.0.0.1:1"),
        "no addresses in probes: {body}"
    );

    // A request that needs the database fails fast and cleanly, not with a hang or a panic.
    let r = client
        .get(format!("{base}/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    stop.send(()).unwrap();
    handle.await.unwrap();
}
