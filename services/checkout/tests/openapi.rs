//! `openapi.yaml` is the contract clients read, and it cannot drift from the code:
//! - its routes are exactly the router's: `App::routes` is recorded by the router as it is
//!   built (`checkout::Routes`), so a route added without a document entry fails
//!   [`the_document_lists_every_route_the_router_serves_and_no_other`], as
//!   [`a_route_the_document_lacks_fails_the_route_check`] shows first;
//! - every response the tests receive through `TestApp`'s helpers is held to its schema
//!   (`common::contract`), and the schemas close their objects, so a field a handler returns
//!   and the document lacks fails: [`a_response_the_document_does_not_describe_is_refused`]
//!   shows the check refusing an extra field, an undocumented status, a missing header and a
//!   wrong media type, while [`every_answer_the_api_gives_is_one_the_document_describes`] and
//!   [`answers_while_the_database_is_down_are_the_documented_503s`] drive every documented
//!   status of every route (problem documents included) and the check accepts each.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use checkout::{App, Route, Routes};
use common::contract::{self, contract};
use common::{TestApp, order};
use serde_json::{Value, json};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// (METHOD, path template) of every operation in the document.
fn documented() -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in contract().doc()["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// How `served` and the document differ: (served but undocumented, documented but not served).
fn route_drift(served: &[Route]) -> (Vec<String>, Vec<String>) {
    let served: BTreeSet<(String, String)> = served
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    let documented = documented();
    let show = |set: BTreeSet<&(String, String)>| {
        set.into_iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect::<Vec<_>>()
    };
    (
        show(served.difference(&documented).collect()),
        show(documented.difference(&served).collect()),
    )
}

/// The routes of a checkout built from the checked-in configuration (it connects to nothing
/// until it runs).
async fn served_routes() -> Vec<Route> {
    let config = keel_testkit::config(
        checkout::DEFAULT_CONFIG,
        &[("KEEL_HTTP__PORT", "0"), ("KEEL_SAGA__RUN_WORKER", "false")],
    );
    let app = App::build(config).await.unwrap();
    app.routes().to_vec()
}

#[tokio::test]
async fn a_route_the_document_lacks_fails_the_route_check() {
    // Failure first: a route added to the router the way checkout adds its own, with no
    // document entry, is reported by the check, as is a documented route the router lost.
    let mut served = served_routes().await;
    let (_, added) = Routes::<()>::new()
        .post("/v1/orders/{id}/cancel", || async { "cancelled" })
        .into_parts();
    served.extend(added);
    served.retain(|r| r.path != "/v1/products");
    let (undocumented, unserved) = route_drift(&served);
    assert_eq!(undocumented, ["POST /v1/orders/{id}/cancel"]);
    assert_eq!(unserved, ["GET /v1/products"]);
}

#[tokio::test]
async fn the_document_lists_every_route_the_router_serves_and_no_other() {
    let served = served_routes().await;
    assert!(served.len() >= 7, "{served:?}");
    assert_eq!(route_drift(&served), (vec![], vec![]), "served: {served:?}");
}

#[test]
fn every_schema_reference_in_the_openapi_document_resolves() {
    let doc = contract().doc();
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

#[tokio::test]
async fn the_router_answers_every_documented_route_and_serves_the_document() {
    let app = TestApp::start("http://127.0.0.1:1", &[("KEEL_SAGA__RUN_WORKER", "false")]).await;
    let fallback = "https://keel.dev/problems/not-found";
    for (method, path) in documented() {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        );
        let verb = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app.client.request(verb.clone(), &url).send().await.unwrap();
        // Without an API key or a body: whatever it answers must be documented.
        let r = contract::checked(&method, &path, r).await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        // Served: not a 405, and not the router's fallback 404 (an unknown order is a 404
        // of its own type).
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !body.contains(fallback),
            "{method} {path} is not routed: {body}"
        );
        // And no other method on a documented path is served.
        for other in ["PUT", "PATCH", "DELETE"] {
            let r = app
                .client
                .request(reqwest::Method::from_bytes(other.as_bytes()).unwrap(), &url)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 405, "{other} {path} is served but undocumented");
        }
    }
    let r = app
        .client
        .get(format!("{}/openapi.yaml", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    assert_eq!(r.text().await.unwrap(), checkout::OPENAPI);
    app.stop().await;
}

/// The refusal `check` gives, as one line per difference.
fn refusal(
    method: &str,
    path: &str,
    status: u16,
    headers: &http::HeaderMap,
    body: &Value,
) -> String {
    let body = serde_json::to_vec(body).unwrap();
    match contract().check(method, path, status, headers, &body) {
        Ok(()) => panic!(
            "{method} {path} {status} accepted: {}",
            String::from_utf8_lossy(&body)
        ),
        Err(problems) => problems.join("\n"),
    }
}

#[tokio::test]
async fn a_response_the_document_does_not_describe_is_refused() {
    let app = TestApp::start("http://127.0.0.1:1", &[("KEEL_SAGA__RUN_WORKER", "false")]).await;
    let id = app.place(&order("tok_approve", &[("KEEL-MUG", 1)])).await;
    let r = app.get_order_as(Some(&app.api_key), &id).await;
    let headers = r.headers().clone();
    let real: Value = r.json().await.unwrap();
    let get = "/v1/orders/{id}";
    // The real answer passes (the helper checked it too).
    assert_eq!(
        contract().check(
            "GET",
            get,
            200,
            &headers,
            &serde_json::to_vec(&real).unwrap()
        ),
        Ok(())
    );

    // A handler that returns a field the document lacks, at any depth, fails.
    // (field, the object it is added to)
    let extra = [
        ("internal_note", ""),
        ("cost_minor", "/lines/0"),
        ("actor", "/history/0"),
        ("fx_rate", "/total"),
    ];
    for (field, at) in extra {
        let mut body = real.clone();
        body.pointer_mut(at).unwrap()[field] = json!("x");
        let why = refusal("GET", get, 200, &headers, &body);
        assert!(why.contains(field), "{field}: {why}");
    }
    // So does a documented field of the wrong type, or a required one missing.
    let mut body = real.clone();
    body["total"]["minor"] = json!("1200");
    assert!(refusal("GET", get, 200, &headers, &body).contains("/total/minor"));
    for (field, value) in [("created_at", json!("yesterday")), ("id", json!("42"))] {
        let mut body = real.clone();
        body[field] = value;
        assert!(
            refusal("GET", get, 200, &headers, &body).contains(field),
            "{field}"
        );
    }
    let mut body = real.clone();
    body.as_object_mut().unwrap().remove("history");
    assert!(refusal("GET", get, 200, &headers, &body).contains("history"));

    // A problem document with a member the document lacks.
    let r = app
        .get_order_as(Some(&app.api_key), &uuid::Uuid::new_v4().to_string())
        .await;
    assert_eq!(r.status(), 404);
    let problem_headers = r.headers().clone();
    let mut problem: Value = r.json().await.unwrap();
    problem["sql"] = json!("SELECT * FROM orders WHERE id = $1");
    assert!(refusal("GET", get, 404, &problem_headers, &problem).contains("sql"));
    // An undocumented status, and a problem whose status is not the response's.
    let mut teapot = problem.clone();
    teapot.as_object_mut().unwrap().remove("sql");
    assert!(refusal("GET", get, 418, &problem_headers, &teapot).contains("not documented"));
    teapot["status"] = json!(400);
    assert!(refusal("GET", get, 404, &problem_headers, &teapot).contains("status"));

    // An undocumented media type, and a 202 without its required Location.
    let mut html = headers.clone();
    html.insert("content-type", "text/html".parse().unwrap());
    assert!(refusal("GET", get, 200, &html, &real).contains("content-type"));
    let mut no_location = headers.clone();
    no_location.remove("location");
    assert!(refusal("POST", "/v1/orders", 202, &no_location, &real).contains("Location"));
    // An operation the document does not have.
    assert!(refusal("DELETE", get, 204, &headers, &real).contains("not documented"));
    app.stop().await;
}

#[tokio::test]
async fn every_answer_the_api_gives_is_one_the_document_describes() {
    // A short wait for a held idempotency key, so the 409 comes quickly.
    let app = TestApp::start(
        "http://127.0.0.1:1",
        &[
            ("KEEL_SAGA__RUN_WORKER", "false"),
            ("KEEL_ORDERS__IDEMPOTENCY_WAIT", "200ms"),
        ],
    )
    .await;
    let valid = order("tok_approve", &[("KEEL-MUG", 2)]);
    let seen = |r: &reqwest::Response| r.status().as_u16();
    let mut statuses = Vec::new();

    // POST /v1/orders. Every helper call below has been checked against the document.
    let placed = app.post_order(Some("k-1"), &valid).await;
    statuses.push(("POST 202", seen(&placed)));
    let id: Value = placed.json().await.unwrap();
    let id = id["id"].as_str().unwrap().to_owned();
    let replay = app.post_order(Some("k-1"), &valid).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    statuses.push(("POST 202 replayed", seen(&replay)));
    statuses.push(("POST 400 no key", seen(&app.post_order(None, &valid).await)));
    let mut unknown = valid.clone();
    unknown["customer_id"] = json!("cus_other");
    unknown["lines"][0]["colour"] = json!("red");
    statuses.push((
        "POST 400 unknown field",
        seen(&app.post_order(Some("k-2"), &unknown).await),
    ));
    statuses.push((
        "POST 400 not an object",
        seen(&app.post_order(Some("k-3"), &json!([1, 2])).await),
    ));
    statuses.push((
        "POST 401 no API key",
        seen(&app.post_order_as(None, Some("k-4"), &valid).await),
    ));
    statuses.push((
        "POST 401 unknown API key",
        seen(
            &app.post_order_as(
                Some(&format!("keel_{}_{}", "a".repeat(12), "b".repeat(64))),
                Some("k-4"),
                &valid,
            )
            .await,
        ),
    ));
    let big = json!({"currency": "EUR", "payment_token": "x".repeat(70_000), "lines": []});
    statuses.push(("POST 413", seen(&app.post_order(Some("k-5"), &big).await)));
    let not_json = app
        .client
        .post(format!("{}/v1/orders", app.base))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "k-6")
        .header("content-type", "text/plain")
        .body(valid.to_string())
        .send()
        .await
        .unwrap();
    let not_json = contract::checked("POST", "/v1/orders", not_json).await;
    statuses.push(("POST 415", seen(&not_json)));
    let invalid = order("tok_approve", &[("NO-SUCH-SKU", 0)]);
    statuses.push((
        "POST 422 invalid",
        seen(&app.post_order(Some("k-7"), &invalid).await),
    ));
    let other = order("tok_approve", &[("KEEL-MUG", 3)]);
    statuses.push((
        "POST 422 key reused",
        seen(&app.post_order(Some("k-1"), &other).await),
    ));
    // A key held by a transaction that has not committed (a request still running).
    let scope = checkout::orders::api::idempotency_scope(&keel_events::CustomerId::from(
        common::TEST_CUSTOMER.to_owned(),
    ));
    let mut held = app.admin.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_hash, expires_at)
         VALUES ($1, 'k-held', '\\x00', now() + interval '1 hour')",
    )
    .bind(&scope)
    .execute(&mut *held)
    .await
    .unwrap();
    statuses.push((
        "POST 409",
        seen(&app.post_order(Some("k-held"), &valid).await),
    ));
    held.rollback().await.unwrap();

    // GET /v1/orders/{id}.
    statuses.push((
        "GET 200",
        seen(&app.get_order_as(Some(&app.api_key), &id).await),
    ));
    statuses.push(("GET 401", seen(&app.get_order_as(None, &id).await)));
    let stranger = app.issue_key("cus_stranger").await;
    statuses.push((
        "GET 404 another's",
        seen(&app.get_order_as(Some(&stranger), &id).await),
    ));
    statuses.push((
        "GET 404 not a uuid",
        seen(&app.get_order_as(Some(&app.api_key), "42").await),
    ));

    // The routes without a helper.
    for path in [
        "/v1/products",
        "/openapi.yaml",
        "/livez",
        "/readyz",
        "/metrics",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        let r = contract::checked("GET", path, r).await;
        statuses.push((path, seen(&r)));
    }

    let want = [
        ("POST 202", 202),
        ("POST 202 replayed", 202),
        ("POST 400 no key", 400),
        ("POST 400 unknown field", 400),
        ("POST 400 not an object", 400),
        ("POST 401 no API key", 401),
        ("POST 401 unknown API key", 401),
        ("POST 413", 413),
        ("POST 415", 415),
        ("POST 422 invalid", 422),
        ("POST 422 key reused", 422),
        ("POST 409", 409),
        ("GET 200", 200),
        ("GET 401", 401),
        ("GET 404 another's", 404),
        ("GET 404 not a uuid", 404),
        ("/v1/products", 200),
        ("/openapi.yaml", 200),
        ("/livez", 200),
        ("/readyz", 200),
        ("/metrics", 200),
    ];
    assert_eq!(statuses, want);
    app.stop().await;
}

#[tokio::test]
async fn answers_while_the_database_is_down_are_the_documented_503s() {
    // Port 1 on loopback refuses every connection: Postgres is unreachable from the start.
    let config = keel_testkit::config(
        checkout::DEFAULT_CONFIG,
        &[
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
            ("KEEL_SAGA__RUN_WORKER", "false"),
            ("KEEL_DATABASE__ACQUIRE_TIMEOUT", "500ms"),
            ("KEEL_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/none"),
            (
                "KEEL_DATABASE__URL",
                "postgres://checkout_app:x@127.0.0.1:1/keel_checkout",
            ),
        ],
    );
    let app = App::build(config).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    // A well-formed key: refusing it needs the database, which is down.
    let key = format!("keel_{}_{}", "a".repeat(12), "b".repeat(64));
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    let requests = [
        ("GET", "/readyz", client.get(format!("{base}/readyz"))),
        (
            "GET",
            "/v1/products",
            client.get(format!("{base}/v1/products")),
        ),
        (
            "POST",
            "/v1/orders",
            client
                .post(format!("{base}/v1/orders"))
                .bearer_auth(&key)
                .header("idempotency-key", "k")
                .json(&body),
        ),
        (
            "GET",
            "/v1/orders/{id}",
            client
                .get(format!("{base}/v1/orders/{}", uuid::Uuid::new_v4()))
                .bearer_auth(&key),
        ),
    ];
    for (method, path, request) in requests {
        let r = tokio::time::timeout(Duration::from_secs(15), request.send())
            .await
            .expect("answers within the acquire timeout")
            .unwrap();
        let r = contract::checked(method, path, r).await;
        assert_eq!(r.status(), 503, "{method} {path}");
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}
