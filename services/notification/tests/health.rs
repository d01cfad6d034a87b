//! notification's skeleton: ready only when both Postgres and RabbitMQ are reachable;
//! alive regardless (P21).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_testkit::{ServiceProcess, TestDb, TestVhost, eventually};

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
