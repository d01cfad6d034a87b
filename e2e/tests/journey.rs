//! The order journey end to end (P04 saga, P02 outbox, P03 inbox, P13 idempotency, P32
//! webhooks, P08 job leases): four real binaries per test, faults injected between them, and
//! keelctl's audit at the end of every test, naming the checks the test's orders must have fed
//! (a check that examined nothing there fails the test).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_e2e::{Examines, Journey, Options, order_body};
use keel_testkit::eventually;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

const SETTLE: Duration = Duration::from_secs(40);

async fn sql(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn scalar_i64(url: &str, query: &str, id: &str) -> i64 {
    let mut c = sql(url).await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
        .bind(uuid::Uuid::parse_str(id).unwrap())
        .fetch_one(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_order_is_confirmed_captured_and_notified() {
    let j = Journey::start(Options::default()).await;
    let id = j
        .place("tok_approve", &[("KEEL-MUG", 2), ("KEEL-BOOK", 1)])
        .await;
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    // The provider's capture webhook reaches billing and the payment ends captured.
    eventually(SETTLE, "payment captured", || async {
        let n = scalar_i64(
            &j.billing_db.admin_url(),
            "SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'CAPTURED'",
            &id,
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
    let n = j.notified(&id).await;
    assert_eq!(n["notifications"].as_array().unwrap().len(), 1);
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_order_is_rejected_and_reserves_nothing() {
    let j = Journey::start(Options::default()).await;
    let mut c = sql(&j.checkout_db.admin_url()).await;
    let (sku, available): (String, i32) =
        sqlx::query_as("SELECT sku, available FROM stock ORDER BY available, sku LIMIT 1")
            .fetch_one(&mut c)
            .await
            .unwrap();
    let id = j
        .place(
            "tok_approve",
            &[(&sku, u32::try_from(available).unwrap() + 1)],
        )
        .await;
    assert_eq!(j.final_state(&id, SETTLE).await, "REJECTED");
    let order = j.order(&id).await;
    assert_eq!(order["reason"], "out_of_stock", "{order}");
    let after: i32 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
        .bind(&sku)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(after, available, "nothing reserved");
    j.notified(&id).await;
    j.assert_audit_passes(&Examines::journey().unpaid()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_card_ends_payment_declined_with_stock_released() {
    let j = Journey::start(Options::default()).await;
    let declined = j.place("tok_decline", &[("KEEL-HOODIE", 1)]).await;
    let broke = j
        .place("tok_insufficient_funds", &[("KEEL-HOODIE", 1)])
        .await;
    assert_eq!(j.final_state(&declined, SETTLE).await, "PAYMENT_DECLINED");
    assert_eq!(j.final_state(&broke, SETTLE).await, "PAYMENT_DECLINED");
    assert_eq!(j.order(&broke).await["reason"], "insufficient_funds");
    j.notified(&declined).await;
    j.notified(&broke).await;
    j.assert_audit_passes(
        &Examines::journey()
            .unpaid()
            .and(&["billing.outbox_drained"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_5xx_then_success_confirms_with_one_authorization() {
    let j = Journey::start(Options::default()).await;
    let id = j.place("tok_flaky", &[("KEEL-TEE-M", 1)]).await;
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    j.notified(&id).await;
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_timeout_compensates_to_payment_failed() {
    let j = Journey::start(Options {
        saga_deadline: Duration::from_secs(6),
        call_timeout: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let id = j.place("tok_timeout", &[("KEEL-STICKERS", 3)]).await;
    assert_eq!(j.final_state(&id, SETTLE).await, "PAYMENT_FAILED");
    j.notified(&id).await;
    j.assert_audit_passes(
        &Examines::journey()
            .unpaid()
            .and(&["billing.outbox_drained"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_down_for_a_while_the_saga_retries_then_resumes() {
    let j = Journey::start(Options {
        saga_deadline: Duration::from_secs(30),
        call_timeout: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    j.billing_link.cut();
    let id = j.place("tok_approve", &[("KEEL-MUG", 1)]).await;
    // The saga job fails at least twice against the missing billing, within its deadline.
    eventually(Duration::from_secs(20), "saga retried twice", || async {
        let attempts = scalar_i64(
            &j.checkout_db.admin_url(),
            "SELECT COALESCE(max(j.attempts), 0)::int8 FROM jobs j JOIN sagas s ON s.id = j.id WHERE s.order_id = $1",
            &id,
        )
        .await;
        (attempts >= 2).then_some(())
    })
    .await;
    assert_eq!(j.order(&id).await["state"], "RESERVED");
    j.billing_link.restore();
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    j.notified(&id).await;
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_down_past_the_deadline_compensates() {
    let j = Journey::start(Options {
        saga_deadline: Duration::from_secs(4),
        call_timeout: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    j.billing_link.cut();
    let id = j.place("tok_approve", &[("KEEL-MUG", 1)]).await;
    // Past the deadline the saga gives up forward progress and compensates. Whether the
    // authorization reached billing is unknown, so compensation must void by order, and it
    // retries (without a deadline) until billing answers.
    eventually(SETTLE, "saga compensating", || async {
        let n = scalar_i64(
            &j.checkout_db.admin_url(),
            "SELECT count(*) FROM sagas WHERE order_id = $1 AND state = 'COMPENSATING'",
            &id,
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(
        j.order(&id).await["state"],
        "RESERVED",
        "not final while it cannot void"
    );
    j.billing_link.restore();
    assert_eq!(j.final_state(&id, SETTLE).await, "PAYMENT_FAILED");
    j.notified(&id).await;
    j.assert_audit_passes(&Examines::journey().unpaid()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_killed_mid_saga_resumes_without_double_reservation_or_charge() {
    // The provider holds tok_slow for 4 s, well inside the call timeout: the saga is provably
    // inside Authorize when checkout dies, and the only way it can finish is another claim
    // after the lease expires.
    let mut j = Journey::start(Options {
        psp_slow_delay: Duration::from_secs(4),
        call_timeout: Duration::from_secs(8),
        saga_lease: Duration::from_secs(9),
        ..Options::default()
    })
    .await;
    let id = j.place("tok_slow", &[("KEEL-TEE-L", 2)]).await;
    let claim = "SELECT j.locked_by FROM jobs j JOIN sagas s ON s.id = j.id WHERE s.order_id = $1";
    let first: String = eventually(Duration::from_secs(10), "saga inside Authorize", || async {
        let mut c = sql(&j.checkout_db.admin_url()).await;
        let reserved: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE order_id = $1")
                .bind(uuid::Uuid::parse_str(&id).unwrap())
                .fetch_one(&mut c)
                .await
                .ok()?;
        let holder: Option<String> = sqlx::query_scalar(claim)
            .bind(uuid::Uuid::parse_str(&id).unwrap())
            .fetch_one(&mut c)
            .await
            .ok()?;
        (reserved > 0).then_some(holder).flatten()
    })
    .await;
    j.kill_and_restart_checkout().await;
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    let mut c = sql(&j.checkout_db.admin_url()).await;
    let (attempts, last): (i32, String) = sqlx::query_as(
        "SELECT j.attempts, j.locked_by FROM jobs j JOIN sagas s ON s.id = j.id WHERE s.order_id = $1",
    )
    .bind(uuid::Uuid::parse_str(&id).unwrap())
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(
        attempts >= 2,
        "resumed by a second claim (attempts {attempts})"
    );
    assert_ne!(first, last, "the restarted process finished the saga");
    j.notified(&id).await;
    // The audit checks one payment of the order's amount, captured, and conserved stock with
    // the reservations sold exactly once.
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_posts_create_one_order() {
    let j = Journey::start(Options::default()).await;
    let key = uuid::Uuid::new_v4().to_string();
    let body = order_body("tok_approve", &[("KEEL-MUG", 1)]);
    // Ten identical requests at once: one creates the order, the others wait for it and
    // replay its answer, or get 409 while it is still in progress.
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (http, url, key, body, api_key) = (
            j.http.clone(),
            format!("{}/v1/orders", j.checkout.base_url()),
            key.clone(),
            body.clone(),
            j.api_key.clone(),
        );
        posts.spawn(async move {
            http.post(url)
                .bearer_auth(api_key)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        });
    }
    let answers = posts.join_all().await;
    let mut ids = std::collections::HashSet::new();
    for r in answers {
        let status = r.status().as_u16();
        assert!(status == 202 || status == 409, "status {status}");
        if status == 202 {
            let v: Value = r.json().await.unwrap();
            ids.insert(v["id"].as_str().unwrap().to_owned());
        }
    }
    let replay = j.post_order(&key, &body).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(
        replay.headers()["idempotent-replayed"].to_str().unwrap(),
        "true"
    );
    let v: Value = replay.json().await.unwrap();
    ids.insert(v["id"].as_str().unwrap().to_owned());
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    let id = ids.into_iter().next().unwrap();
    let mut c = sql(&j.checkout_db.admin_url()).await;
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(orders, 1);
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    j.notified(&id).await;
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_webhook_has_no_second_effect() {
    let j = Journey::start(Options::default()).await;
    let id = j.place("tok_approve", &[("KEEL-BOOK", 1)]).await;
    assert_eq!(j.final_state(&id, SETTLE).await, "CONFIRMED");
    let captured = "SELECT count(*) FROM payment_events e JOIN payments p ON p.payment_id = e.stream_id \
                    WHERE p.order_id = $1 AND e.event_type = 'PaymentCaptured'";
    eventually(SETTLE, "capture recorded", || async {
        (scalar_i64(&j.billing_db.admin_url(), captured, &id).await == 1).then_some(())
    })
    .await;
    let admin = j.psp_admin_url().await;
    let hooks_url = format!("{admin}/admin/webhooks");
    let hooks = j.get_json(&hooks_url).await.unwrap();
    let hook = hooks["webhooks"].as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = j
        .http
        .post(format!("{admin}/admin/webhooks/{hook}/redeliver"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "redeliver: {}", r.status());
    // The replay is delivered (psp-sim records a 2xx for it) and changes nothing.
    eventually(Duration::from_secs(10), "replay delivered", || async {
        let hooks = j.get_json(&hooks_url).await?;
        let h = hooks["webhooks"]
            .as_array()?
            .iter()
            .find(|h| h["id"] == hook.as_str())?
            .clone();
        // An attempt of the second delivery got a 2xx from billing.
        h["attempts"]
            .as_array()?
            .iter()
            .any(|a| a["delivery"] == 2 && a["status_code"].as_u64().is_some_and(|c| c / 100 == 2))
            .then_some(())
    })
    .await;
    assert_eq!(
        scalar_i64(&j.billing_db.admin_url(), captured, &id).await,
        1
    );
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_dropped_mid_flow_lose_and_double_nothing() {
    let j = Journey::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(j.place("tok_approve", &[("KEEL-STICKERS", 1)]).await);
        if i % 4 == 1 {
            j.drop_broker_connections().await;
        }
    }
    for id in &ids {
        assert_eq!(j.final_state(id, SETTLE).await, "CONFIRMED");
        let n = j.notified(id).await;
        assert_eq!(
            n["notifications"].as_array().unwrap().len(),
            1,
            "one notification for {id}"
        );
    }
    j.assert_audit_passes(&Examines::journey().confirmed())
        .await;
}
