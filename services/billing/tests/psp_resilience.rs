//! P24 and P25 on billing's provider client: what a failing or black-holed provider costs,
//! first without the retry budget and breaker (the failure), then with them.
//!
//! Each test runs a small provider of its own on loopback that fails on purpose and counts
//! the attempts it receives; every loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use billing::psp::{AuthorizeRequest, PaymentToken, PspClient, PspError};
use futures_util::StreamExt;
use keel_resilience::breaker::State;
use keel_testkit::eventually;
use serde_json::json;
use tokio::time::Instant;

/// Calls made in the amplification measurements.
const CALLS: usize = 500;
/// Calls in flight at once.
const CONCURRENCY: usize = 50;

/// A provider that answers 503 while `failing`, hangs (a black hole at the HTTP level: the
/// client's request timeout ends each call) while `hanging`, and otherwise authorizes.
#[derive(Clone, Default)]
struct Provider {
    attempts: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    hanging: Arc<AtomicBool>,
}

impl Provider {
    async fn start(&self) -> String {
        let this = self.clone();
        let app = axum::Router::new().fallback(move || {
            let this = this.clone();
            async move {
                this.attempts.fetch_add(1, Ordering::Relaxed);
                if this.hanging.load(Ordering::Relaxed) {
                    // Longer than any request timeout the tests configure.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                if this.failing.load(Ordering::Relaxed) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                (
                    StatusCode::CREATED,
                    axum::Json(json!({"id": "auth_1", "status": "authorized"})),
                )
                    .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }
}

fn client(url: &str, overrides: &[(&str, &str)]) -> PspClient {
    let mut env = vec![("KEEL_PSP__BASE_URL", url)];
    env.extend_from_slice(overrides);
    let config: billing::Config = keel_testkit::config(billing::DEFAULT_CONFIG, &env);
    PspClient::new(&config.psp).unwrap()
}

/// A breaker that never opens: the naive variant, and the budget measured alone.
const NO_BREAKER: [(&str, &str); 2] = [
    ("KEEL_PSP__BREAKER__FAILURE_RATE_THRESHOLD", "1.0"),
    ("KEEL_PSP__BREAKER__MINIMUM_CALLS", "1000000"),
];

/// Makes `n` authorize calls, `CONCURRENCY` at a time; returns their results.
async fn calls(client: &PspClient, n: usize) -> Vec<Result<(), PspError>> {
    let token = PaymentToken::new("tok_approve");
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (client, token) = (client.clone(), &token);
            async move {
                let request = AuthorizeRequest {
                    amount_minor: 1234,
                    currency: "EUR",
                    token,
                    reference: format!("pay_{i}"),
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                client
                    .authorize(&format!("key-{i}"), &request, deadline)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

#[tokio::test]
async fn against_a_provider_that_always_fails_retries_add_at_most_the_budget() {
    // The failure: no budget (ratio 10: ten retries per call allowed), so every call makes
    // all of psp.max_attempts (3) attempts: the outage triples the provider's load.
    let naive_provider = Provider::default();
    naive_provider.failing.store(true, Ordering::Relaxed);
    let url = naive_provider.start().await;
    let mut overrides = NO_BREAKER.to_vec();
    overrides.push(("KEEL_PSP__RETRY_BUDGET__RATIO", "10"));
    let naive = client(&url, &overrides);
    let results = calls(&naive, CALLS).await;
    assert!(results.iter().all(Result::is_err));
    let naive_ratio = naive_provider.attempts() as f64 / CALLS as f64;

    // Keel's default budget (10 %, 1 a second floor over 10 s), breaker left out so the
    // budget is measured alone.
    let provider = Provider::default();
    provider.failing.store(true, Ordering::Relaxed);
    let url = provider.start().await;
    let keel = client(&url, &NO_BREAKER);
    let results = calls(&keel, CALLS).await;
    assert!(results.iter().all(Result::is_err));
    let ratio = provider.attempts() as f64 / CALLS as f64;
    eprintln!(
        "attempts per call against a dead provider: {naive_ratio:.3} without a budget, {ratio:.3} with Keel's"
    );
    assert!(
        naive_ratio >= 2.9,
        "the naive client retried less than expected"
    );
    // 10 % of the calls plus the floor's reserve (1 a second over the 10 s window).
    let bound = 1.0 + 0.1 + 10.0 / CALLS as f64 + 0.01;
    assert!(
        ratio <= bound,
        "{ratio:.3} attempts per call, bound {bound:.3}"
    );

    // Keel's whole default (budget and breaker): once the breaker has seen enough failures
    // the provider is not called at all.
    let provider = Provider::default();
    provider.failing.store(true, Ordering::Relaxed);
    let url = provider.start().await;
    let keel = client(&url, &[]);
    let results = calls(&keel, CALLS).await;
    assert!(results.iter().all(Result::is_err));
    let full = provider.attempts() as f64 / CALLS as f64;
    eprintln!("attempts per call with budget and breaker: {full:.3}");
    assert!(full <= 1.1, "{full:.3} attempts per call");
}

#[tokio::test]
async fn a_black_holed_provider_opens_the_breaker_so_calls_fail_fast_and_it_recovers_alone() {
    let overrides = [
        ("KEEL_PSP__REQUEST_TIMEOUT", "200ms"),
        ("KEEL_PSP__BREAKER__MINIMUM_CALLS", "5"),
        ("KEEL_PSP__BREAKER__OPEN_FOR", "1s"),
    ];
    // The failure: without a breaker every call waits its whole request timeout.
    let naive_provider = Provider::default();
    naive_provider.hanging.store(true, Ordering::Relaxed);
    let url = naive_provider.start().await;
    let mut naive_overrides = overrides.to_vec();
    naive_overrides.extend_from_slice(&NO_BREAKER);
    let naive = client(&url, &naive_overrides);
    let started = Instant::now();
    for r in calls(&naive, 20).await {
        assert!(matches!(r, Err(PspError::Timeout)), "{r:?}");
    }
    let naive_took = started.elapsed();
    assert!(naive_took >= Duration::from_millis(200));

    // Keel's breaker: the first calls time out, then it opens and calls fail at once.
    let provider = Provider::default();
    provider.hanging.store(true, Ordering::Relaxed);
    let url = provider.start().await;
    let keel = client(&url, &overrides);
    for r in calls(&keel, 5).await {
        assert!(matches!(r, Err(PspError::Timeout)), "{r:?}");
    }
    assert_eq!(keel.breaker_state(), State::Open);
    let reached = provider.attempts();
    let started = Instant::now();
    let fast = calls(&keel, 100).await;
    let fast_took = started.elapsed();
    assert!(
        fast.iter()
            .all(|r| matches!(r, Err(PspError::CircuitOpen { .. }))),
        "{:?}",
        fast.iter()
            .find(|r| !matches!(r, Err(PspError::CircuitOpen { .. })))
    );
    assert_eq!(
        provider.attempts(),
        reached,
        "an open breaker sends nothing"
    );
    eprintln!(
        "black-holed provider: 20 calls took {naive_took:?} without a breaker; 100 calls refused by the open breaker in {fast_took:?}"
    );
    assert!(fast_took < Duration::from_millis(100), "{fast_took:?}");

    // The provider returns; after open_for a probe goes through and closes the breaker.
    provider.hanging.store(false, Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "the breaker closes by itself",
        || async {
            let ok = calls(&keel, 1).await.pop().unwrap().is_ok();
            (ok && keel.breaker_state() == State::Closed).then_some(())
        },
    )
    .await;
    assert!(calls(&keel, 20).await.iter().all(Result::is_ok));
}
