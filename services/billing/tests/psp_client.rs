//! The provider client treats the provider as untrusted input (OWASP API10): bodies are read
//! up to `psp.max_response_bytes`, an id is always one encoded path segment, unknown decline
//! codes become one safe value, and payment tokens never show in `Debug` output. Each test
//! runs against a small provider of its own that misbehaves on purpose.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use billing::psp::{
    AuthorizeRequest, DeclineCode, PaymentToken, ProtocolError, PspClient, PspError,
};
use serde_json::json;
use tokio::time::Instant;

const MIB: usize = 1024 * 1024;

/// A provider answering every POST with `answer`, recording the raw path it was sent.
struct Provider {
    url: String,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Provider {
    async fn start(answer: fn() -> Response) -> Self {
        let paths = Arc::new(Mutex::new(Vec::new()));
        let record = paths.clone();
        let app = axum::Router::new().fallback(post(move |uri: Uri| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(uri.path().to_owned());
                answer()
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, paths }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }

    fn client(&self) -> PspClient {
        let config: billing::Config = keel_testkit::config(
            billing::DEFAULT_CONFIG,
            &[("KEEL_PSP__BASE_URL", self.url.as_str())],
        );
        assert_eq!(config.psp.max_response_bytes, 64 * 1024, "the default");
        PspClient::new(&config.psp).unwrap()
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A 201 whose JSON-ish body is 4 MiB, sent chunked (no Content-Length to refuse up front).
fn huge_chunked() -> Response {
    let chunks = (0..4 * 64).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 16 * 1024])));
    (
        StatusCode::CREATED,
        Body::from_stream(tokio_stream::iter(chunks)),
    )
        .into_response()
}

/// A 201 declaring a 4 MiB body.
fn huge_declared() -> Response {
    (StatusCode::CREATED, vec![b' '; 4 * MIB]).into_response()
}

/// A 201 whose body does not end (bounded at 1 GiB so the test's server always stops).
fn endless() -> Response {
    let chunks =
        (0..64 * 1024).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 16 * 1024])));
    (
        StatusCode::CREATED,
        Body::from_stream(tokio_stream::iter(chunks)),
    )
        .into_response()
}

fn authorized() -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"id": "auth_1", "status": "captured"})),
    )
        .into_response()
}

fn request(token: &PaymentToken) -> AuthorizeRequest<'_> {
    AuthorizeRequest {
        amount_minor: 1234,
        currency: "EUR",
        token,
        reference: "pay_1".to_owned(),
    }
}

fn too_large(r: Result<billing::psp::Authorization, PspError>) -> bool {
    matches!(
        r,
        Err(PspError::Protocol(ProtocolError::TooLarge { limit: 65536 }))
    )
}

#[tokio::test]
async fn a_body_past_max_response_bytes_is_refused_where_a_naive_read_takes_all_of_it() {
    let provider = Provider::start(huge_chunked).await;
    let url = format!("{}/v1/authorizations", provider.url);

    // Naive: `bytes()` buffers whatever the provider sends.
    keel_testkit::install_crypto_provider();
    let naive = reqwest::Client::new().post(&url).send().await.unwrap();
    let body = naive.bytes().await.unwrap();
    assert_eq!(body.len(), 4 * MIB, "the whole 4 MiB held in memory");

    // Keel: reading stops at 64 KiB with a clear error.
    let token = PaymentToken::new("tok_approve");
    let r = provider
        .client()
        .authorize("k-1", &request(&token), deadline())
        .await;
    assert!(too_large(r));
}

#[tokio::test]
async fn a_declared_or_endless_oversized_body_is_refused_without_reading_it_all() {
    let token = PaymentToken::new("tok_approve");
    let declared = Provider::start(huge_declared).await;
    let r = declared
        .client()
        .authorize("k-1", &request(&token), deadline())
        .await;
    assert!(too_large(r), "refused on its Content-Length");

    let endless = Provider::start(endless).await;
    let started = std::time::Instant::now();
    let r = endless
        .client()
        .authorize("k-1", &request(&token), deadline())
        .await;
    assert!(too_large(r), "cut off at the limit");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "not read to the end: {:?}",
        started.elapsed()
    );
    let e = endless
        .client()
        .authorize("k-1", &request(&token), deadline())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("psp.max_response_bytes"), "names the bound: {e}");
}

#[tokio::test]
async fn an_authorization_id_stays_one_path_segment_where_naive_formatting_changes_the_path() {
    let provider = Provider::start(authorized).await;
    let id = "../../admin/faults";

    // Naive: formatting the id into the path and joining resolves the dots.
    let naive = url::Url::parse(&provider.url)
        .unwrap()
        .join(&format!("v1/authorizations/{id}/capture"))
        .unwrap();
    assert_eq!(naive.path(), "/admin/faults/capture", "another endpoint");

    // Keel: the id is one percent-encoded segment.
    let client = provider.client();
    client.capture("k-1", id, deadline()).await.unwrap();
    client.void("k-2", "a/b?c#d", deadline()).await.unwrap();
    assert_eq!(
        provider.paths(),
        [
            "/v1/authorizations/..%2F..%2Fadmin%2Ffaults/capture",
            "/v1/authorizations/a%2Fb%3Fc%23d/void",
        ]
    );

    // `.` and `..` alone cannot be encoded as a segment: refused, nothing sent.
    for id in ["..", ".", ""] {
        let r = client.capture("k-3", id, deadline()).await;
        assert!(
            matches!(r, Err(PspError::Protocol(ProtocolError::InvalidId(_)))),
            "{id:?}: {r:?}"
        );
    }
    assert_eq!(provider.paths().len(), 2);
}

#[tokio::test]
async fn decline_codes_billing_does_not_know_become_one_safe_value() {
    async fn declined_with(code: serde_json::Value) -> PspError {
        #[derive(Clone)]
        struct Code(serde_json::Value);
        let app = axum::Router::new()
            .route(
                "/v1/authorizations",
                post(|State(Code(code)): State<Code>| async move {
                    (
                        StatusCode::PAYMENT_REQUIRED,
                        axum::Json(json!({"type": "https://psp.example/problems/card-declined",
                            "status": 402, "decline_code": code})),
                    )
                }),
            )
            .with_state(Code(code));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config: billing::Config =
            keel_testkit::config(billing::DEFAULT_CONFIG, &[("KEEL_PSP__BASE_URL", &url)]);
        let token = PaymentToken::new("tok_decline");
        PspClient::new(&config.psp)
            .unwrap()
            .authorize("k-1", &request(&token), deadline())
            .await
            .unwrap_err()
    }

    let known = declined_with(json!("insufficient_funds")).await;
    assert!(matches!(
        known,
        PspError::Declined {
            code: DeclineCode::InsufficientFunds
        }
    ));
    for unknown in [
        json!("<script>alert(1)</script>"),
        json!("x".repeat(10_000)),
        json!(42),
        serde_json::Value::Null,
    ] {
        let e = declined_with(unknown.clone()).await;
        assert!(
            matches!(
                e,
                PspError::Declined {
                    code: DeclineCode::Other
                }
            ),
            "{unknown}: {e:?}"
        );
        assert_eq!(e.to_string(), "declined: declined");
    }
}

#[test]
fn payment_tokens_never_appear_in_debug_output() {
    let secret = "tok_4242_4242_secret";
    let token = PaymentToken::new(secret);
    let psp_request = request(&token);
    let command = billing::payments::AuthorizeCommand {
        idempotency_key: "k".to_owned(),
        order_id: billing::ledger::OrderId(uuid::Uuid::nil()),
        amount: billing::ledger::Money {
            minor: 1,
            currency: billing::ledger::Currency::parse("EUR").unwrap(),
        },
        payment_token: token.clone(),
    };
    let wire = keel_contracts::billing_v1::AuthorizeRequest {
        payment_token: secret.to_owned(),
        ..Default::default()
    };
    for shown in [
        format!("{token:?}"),
        format!("{psp_request:?} {psp_request:#?}"),
        format!("{command:?} {command:#?}"),
        format!("{wire:?} {wire:#?}"),
    ] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
    // Sent as the plain string: the provider needs it.
    assert_eq!(
        serde_json::to_value(&psp_request).unwrap()["token"],
        json!(secret)
    );
}
