//! The `ApiKey` extractor (`keel_service::api_keys`) on a real router, over HTTP, against a
//! platform database through pgbouncer: what every service's customer-facing routes answer.
//!
//! What is proven here: a key issued by the operator (`keel_pg::api_keys::issue`, what
//! `keelctl api-keys create` runs) reaches the handler as its customer; a request without a
//! usable key is a 401 `unauthenticated` problem with a bare Bearer challenge, and one with a
//! malformed, unknown, wrong or revoked key the same problem with `error="invalid_token"`,
//! telling the client nothing of which check failed; the handler never runs for either; a
//! database that cannot be reached is a 503 with `Retry-After`, never a 401.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::routing::get;
use keel_service::api_keys::ApiKey;
use keel_testkit::TestDb;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

const UNAUTHENTICATED: &str = "https://keel.dev/problems/unauthenticated";

/// A service's router state: the pool the extractor looks keys up through, and a count of the
/// handler's runs.
#[derive(Clone)]
struct AppState {
    pool: PgPool,
    handled: Arc<AtomicUsize>,
}

impl FromRef<AppState> for PgPool {
    fn from_ref(state: &AppState) -> Self {
        state.pool.clone()
    }
}

async fn whoami(ApiKey(caller): ApiKey, State(state): State<AppState>) -> String {
    state.handled.fetch_add(1, Ordering::SeqCst);
    format!("{} {}", caller.customer, caller.key_id)
}

/// The router on 127.0.0.1:0; its base URL and its handler count.
async fn serve(pool: PgPool) -> (String, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/whoami", get(whoami))
        .with_state(AppState {
            pool,
            handled: handled.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/whoami"), handled)
}

async fn get_as(url: &str, authorization: Option<&str>) -> reqwest::Response {
    keel_service::install_crypto_provider();
    let mut request = reqwest::Client::new().get(url);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

/// A 401 problem: its challenge and its document.
async fn unauthenticated(r: reqwest::Response) -> (String, Value) {
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], UNAUTHENTICATED);
    assert_eq!(body["title"], "Authentication required");
    assert_eq!(body["status"], 401);
    (challenge, body)
}

#[tokio::test]
async fn a_valid_key_reaches_the_handler_as_its_customer_and_nothing_else_does() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    let issued = keel_pg::api_keys::issue(&mut operator, "cus_42")
        .await
        .unwrap();
    let key = issued.expose();
    let (url, handled) = serve(PgPool::connect(&db.app_url()).await.unwrap()).await;

    let r = get_as(&url, Some(&format!("Bearer {key}"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("cus_42 {}", issued.id));
    assert_eq!(handled.load(Ordering::SeqCst), 1);

    // No usable credentials: a bare challenge, and how to send a key.
    for authorization in [None, Some("Basic dXNlcjpwdw=="), Some("Bearer")] {
        let (challenge, body) = unauthenticated(get_as(&url, authorization).await).await;
        assert_eq!(challenge, r#"Bearer realm="keel""#, "{authorization:?}");
        assert_eq!(
            body["detail"],
            "send an API key: `Authorization: Bearer keel_...`"
        );
    }

    // A key presented and refused, whichever check it failed: one answer, no echo of the key.
    let mut wrong = key.to_owned();
    wrong.replace_range(
        wrong.len() - 1..,
        if key.ends_with('0') { "1" } else { "0" },
    );
    let unknown = format!("keel_0123456789ab_{}", "a".repeat(64));
    let revoked = keel_pg::api_keys::issue(&mut operator, "cus_42")
        .await
        .unwrap();
    assert!(
        keel_pg::api_keys::revoke(&mut operator, &revoked.id)
            .await
            .unwrap()
    );
    for token in [
        "sk_live_123",
        &key.to_uppercase(),
        &unknown,
        &wrong,
        revoked.expose(),
    ] {
        let (challenge, body) =
            unauthenticated(get_as(&url, Some(&format!("Bearer {token}"))).await).await;
        assert_eq!(challenge, r#"Bearer realm="keel", error="invalid_token""#);
        assert_eq!(
            body["detail"],
            "the API key is not valid: it is malformed, unknown or revoked"
        );
        assert!(!body.to_string().contains(token), "{body}");
    }
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the handler ran only once"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_a_503_to_retry_not_a_401() {
    let unreachable = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody:nothing@127.0.0.1:1/none")
        .unwrap();
    let (url, handled) = serve(unreachable).await;
    let key = format!("keel_0123456789ab_{}", "a".repeat(64));
    let r = get_as(&url, Some(&format!("Bearer {key}"))).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.headers().get("www-authenticate").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "https://keel.dev/problems/unavailable");
    // A request without a key needs no database: still the 401.
    unauthenticated(get_as(&url, None).await).await;
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}
