//! The real binary, as an orchestrator sees it: liveness and readiness (P21), a bad
//! configuration key exits 78 naming it (P19), and SIGTERM lets a request in flight finish
//! (P20). Each test starts its own process on port 0 with its own database and vhost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use keel_testkit::{ServiceProcess, TestVhost, eventually};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use support::{WAIT, count, database, env};

const BIN: &str = env!("CARGO_BIN_EXE_skeleton");

async fn wait_ready(base: &str) -> Value {
    eventually(WAIT, "ready", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    })
    .await
}

#[tokio::test]
async fn alive_at_once_and_ready_once_postgres_and_rabbitmq_answer() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let mut p = ServiceProcess::spawn(BIN, &[], &env(&db, &vhost)).await;
    let base = p.base_url();
    let live = reqwest::get(format!("{base}/livez")).await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = wait_ready(&base).await;
    assert_eq!(ready["checks"]["postgres"], "ok", "{ready}");
    assert_eq!(ready["checks"]["rabbitmq"], "ok", "{ready}");
    p.signal("TERM");
    assert!(p.wait(WAIT).await.success());
}

#[tokio::test]
async fn a_bad_configuration_key_exits_78_naming_it() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let mut vars = env(&db, &vhost);
    vars.push(("KEEL_CONSUMER__PREFETCH".into(), "0".into()));
    for command in ["serve", "check-config"] {
        let (status, _, stderr) = ServiceProcess::run_to_exit(BIN, &[command], &vars).await;
        assert_eq!(status.code(), Some(78), "{command}: {stderr}");
        assert!(stderr.contains("consumer.prefetch"), "{command}: {stderr}");
    }
    // A good configuration passes `check-config`, which prints it with secrets redacted.
    let (status, stdout, stderr) =
        ServiceProcess::run_to_exit(BIN, &["check-config"], &env(&db, &vhost)).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("consumer.queue"), "{stdout}");
    assert!(
        !stdout.contains("skeleton_app_dev"),
        "a password was printed:\n{stdout}"
    );
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_and_then_exits_0() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let mut vars = env(&db, &vhost);
    // The request will wait on a key this test holds; let it wait longer than the test needs.
    vars.push(("KEEL_ITEMS__IDEMPOTENCY_WAIT".into(), "8s".into()));
    let mut p = ServiceProcess::spawn(BIN, &[], &vars).await;
    let base = p.base_url();
    wait_ready(&base).await;

    // Arrange a request that is in flight for as long as we like: hold its idempotency key in
    // an open transaction, so the service's insert of the same key waits on the row lock.
    let mut holder = PgConnection::connect(&db.admin_url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_hash, expires_at)
         VALUES ('POST /v1/items', 'in-flight', '\\x00', now() + interval '1 hour')",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    let request = tokio::spawn({
        let url = format!("{base}/v1/items");
        async move {
            reqwest::Client::new()
                .post(url)
                .header("Idempotency-Key", "in-flight")
                .json(&json!({"name": "late", "quantity": 1}))
                .send()
                .await
        }
    });
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        db.name
    );
    eventually(WAIT, "the request waits on the key", || async {
        (count(&db, &waiting).await == 1).then_some(())
    })
    .await;

    // SIGTERM while it waits: the listener stops taking new connections at once...
    p.signal("TERM");
    eventually(WAIT, "new connections refused", || async {
        let r = reqwest::Client::new()
            .get(format!("{base}/livez"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        r.is_err().then_some(())
    })
    .await;
    // ...and the request in flight still completes once its key is free.
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let response = request
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    assert_eq!(count(&db, "SELECT count(*) FROM items").await, 1);
    assert!(p.wait(WAIT).await.success(), "a clean stop exits 0");
}
