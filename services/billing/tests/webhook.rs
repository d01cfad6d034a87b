//! P32 proofs for `POST /v1/webhooks/psp`: a valid delivery captures the payment and writes
//! its outbox row in one transaction; a replayed `webhook-id` answers 200 with no second
//! effect (also when the copies arrive at once); a bad signature or a stale timestamp is 401,
//! a malformed delivery 400 (all problem+json, nothing recorded); the rotated-in secret
//! verifies too.
//!
//! Each edge of the receiver has a test of its own, so that a mutation of it (`make mutants`)
//! fails one: the secret list given as one string (environment or file) and its validation,
//! the longest webhook-id, a capture contradicting the payment's authorization, amount or
//! currency, and a second delivery id for a capture already applied.
//!
//! The failure side first: [`NaiveReceiver`], written here, checks the signature and nothing
//! else. Given the same deliveries, it applies a replayed id once per copy and accepts a
//! delivery signed long ago; billing's receiver applies the first copy only and refuses the
//! stale one.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use billing::ledger::{self, PaymentEvent, PaymentId};
use keel_config::{ConfigError, ExposeSecret};
use keel_contracts::billing_v1 as pb;
use sqlx::PgPool;
use support::{Billing, ROTATED_SECRET, SECRET, captured_body, key, now_unix, signed};

const CAPTURED: i32 = pb::PaymentStatus::Captured as i32;

/// A secret neither the dev profile nor psp-sim holds, as a deployment would mount.
const FOREIGN_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A payment whose capture billing requested: what the provider's webhook settles.
async fn capture_pending(b: &Billing) -> (pb::Payment, String) {
    let p = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    b.capture(&key("capture"), &p.payment_id).await.unwrap();
    let auth = b.authorization_id(&p.payment_id).await;
    (p, auth)
}

fn webhook_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

async fn receipts(b: &Billing) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_receipts")
        .fetch_one(&b.pool)
        .await
        .unwrap()
}

/// A webhook receiver as it is often first written: it verifies the signature (over the raw
/// body, in constant time, with `keel_webhooks`) and applies the capture, but it accepts any
/// timestamp and keeps no record of the ids it applied. Test code only: the failure P32
/// prevents.
struct NaiveReceiver {
    url: String,
}

#[derive(Clone)]
struct Naive {
    pool: PgPool,
    verifier: std::sync::Arc<keel_webhooks::Verifier>,
}

impl NaiveReceiver {
    /// Serves on 127.0.0.1:0, writing to billing's database as billing would.
    async fn serve(pool: PgPool) -> Self {
        let key = keel_webhooks::SigningKey::parse(SECRET).unwrap();
        // No window: the tolerance is as wide as it goes.
        let verifier = keel_webhooks::Verifier::new(vec![key], Duration::MAX);
        let state = Naive {
            pool,
            verifier: std::sync::Arc::new(verifier),
        };
        let app = axum::Router::new()
            .route("/v1/webhooks/psp", axum::routing::post(naive_receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/webhooks/psp", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url }
    }

    async fn post(&self, headers: &[(&str, String)], body: &str) -> u16 {
        let mut r = reqwest::Client::new()
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.send().await.unwrap().status().as_u16()
    }
}

async fn naive_receive(State(naive): State<Naive>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let id = header("webhook-id");
    let signed = keel_webhooks::Signed {
        id,
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
    };
    if naive
        .verifier
        .verify(&signed, &body, keel_webhooks::unix_now())
        .is_err()
    {
        return StatusCode::UNAUTHORIZED;
    }
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let payment: PaymentId = event["data"]["reference"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut tx = naive.pool.begin().await.unwrap();
    let current = ledger::load(&mut tx, payment).await.unwrap().unwrap();
    let captured = PaymentEvent::PaymentCaptured {
        webhook_id: id.to_owned(),
    };
    let meta = serde_json::json!({ "webhook_id": id });
    ledger::record(&mut tx, payment, Some(&current), &[captured], &meta)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    StatusCode::OK
}

/// How often `payment` was captured: ledger events and published outbox rows.
async fn captures(b: &Billing, payment: &str) -> (usize, usize) {
    let events = b.events(payment).await;
    let outbox = b.outbox(payment).await;
    (
        events.iter().filter(|e| *e == "PaymentCaptured").count(),
        outbox
            .iter()
            .filter(|e| *e == "billing.payment.captured")
            .count(),
    )
}

/// A delivery and its redeliveries, as the provider sends them: the same id and body, each
/// with a fresh timestamp and a valid signature.
const DELIVERIES: usize = 5;

async fn assert_problem(r: reqwest::Response, status: u16, slug: &str) {
    let got = r.status();
    let content_type = r.headers().get("content-type").cloned();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "expected {status} {slug}, got {got}: {text}");
    assert_eq!(
        content_type.unwrap(),
        "application/problem+json",
        "errors are problem documents"
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["type"], format!("https://keel.dev/problems/{slug}"));
}

#[tokio::test]
async fn valid_webhook_captures_the_payment_with_its_event_and_outbox_row() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let r = b
        .post_webhook(&signed(&webhook_id(), now_unix(), &body, SECRET), &body)
        .await;
    assert_eq!(r.status(), 200);

    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
    assert_eq!(
        b.events(&p.payment_id).await,
        [
            "AuthorizationRequested",
            "PaymentAuthorized",
            "CaptureRequested",
            "PaymentCaptured"
        ]
    );
    assert_eq!(
        b.outbox(&p.payment_id).await,
        [
            "billing.payment.authorized",
            "billing.payment.capture_requested",
            "billing.payment.captured"
        ]
    );
    assert_eq!(receipts(&b).await, 1);
}

#[tokio::test]
async fn a_replayed_webhook_captures_once_per_copy_through_a_naive_receiver_and_once_through_billing()
 {
    let b = Billing::start().await;

    // Naive: every copy is authentic, so every copy is applied.
    let naive = NaiveReceiver::serve(b.pool.clone()).await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let id = webhook_id();
    for n in 0..DELIVERIES {
        let headers = signed(&id, now_unix() + n as i64, &body, SECRET);
        assert_eq!(naive.post(&headers, &body).await, 200);
    }
    assert_eq!(
        captures(&b, &p.payment_id).await,
        (DELIVERIES, DELIVERIES),
        "one PaymentCaptured and one published billing.payment.captured per copy"
    );

    // Billing: the same deliveries for a payment in the same state.
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let id = webhook_id();
    let mut answers = Vec::new();
    for n in 0..DELIVERIES {
        let headers = signed(&id, now_unix() + n as i64, &body, SECRET);
        let r = b.post_webhook(&headers, &body).await;
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        answers.push(answer["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(answers[0], "applied");
    assert!(answers[1..].iter().all(|a| a == "duplicate"), "{answers:?}");
    assert_eq!(captures(&b, &p.payment_id).await, (1, 1));
    assert_eq!(receipts(&b).await, 1);
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
}

#[tokio::test]
async fn replayed_webhook_id_answers_200_with_no_second_effect() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let id = webhook_id();
    let first = b
        .post_webhook(&signed(&id, now_unix(), &body, SECRET), &body)
        .await;
    assert_eq!(first.status(), 200);
    // The provider redelivers: same id and body, fresh timestamp and signature.
    let again = b
        .post_webhook(&signed(&id, now_unix() + 1, &body, SECRET), &body)
        .await;
    assert_eq!(again.status(), 200);
    let answer: serde_json::Value = again.json().await.unwrap();
    assert_eq!(answer["status"], "duplicate");

    // Copies arriving at once: each waits on the receipt's key, none applies twice.
    let copies = (0..8).map(|_| {
        let headers = signed(&id, now_unix(), &body, SECRET);
        let body = body.clone();
        let url = format!("{}/v1/webhooks/psp", b.http);
        tokio::spawn(async move {
            let mut r = reqwest::Client::new().post(url).body(body);
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r.send().await.unwrap().status().as_u16()
        })
    });
    for c in copies.collect::<Vec<_>>() {
        assert_eq!(c.await.unwrap(), 200);
    }

    let captured = b
        .events(&p.payment_id)
        .await
        .into_iter()
        .filter(|e| e == "PaymentCaptured")
        .count();
    assert_eq!(captured, 1);
    let published = b
        .outbox(&p.payment_id)
        .await
        .into_iter()
        .filter(|e| e == "billing.payment.captured")
        .count();
    assert_eq!(published, 1);
    assert_eq!(receipts(&b).await, 1);
}

#[tokio::test]
async fn bad_signature_is_401_and_changes_nothing() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let id = webhook_id();
    // Signed by a secret billing does not hold.
    let foreign = signed(&id, now_unix(), &body, FOREIGN_SECRET);
    assert_problem(
        b.post_webhook(&foreign, &body).await,
        401,
        "webhook-signature",
    )
    .await;
    // Signed correctly, then the body altered by one byte on the way.
    let tampered = body.replace("1234", "1235");
    let headers = signed(&id, now_unix(), &body, SECRET);
    assert_problem(
        b.post_webhook(&headers, &tampered).await,
        401,
        "webhook-signature",
    )
    .await;

    assert_eq!(
        b.get(&p.payment_id).await.unwrap().status,
        pb::PaymentStatus::CapturePending as i32
    );
    assert_eq!(receipts(&b).await, 0);
}

#[tokio::test]
async fn a_stale_webhook_is_applied_by_a_naive_receiver_and_refused_by_billing() {
    let b = Billing::start().await;
    // A genuine delivery signed ten minutes ago (taken from a log, say) and never seen before.
    let stale = now_unix() - 600;

    let naive = NaiveReceiver::serve(b.pool.clone()).await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), stale, &body, SECRET);
    assert_eq!(naive.post(&headers, &body).await, 200, "accepted");
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
    assert_eq!(captures(&b, &p.payment_id).await, (1, 1));

    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), stale, &body, SECRET);
    assert_problem(b.post_webhook(&headers, &body).await, 401, "webhook-stale").await;
    assert_eq!(
        b.get(&p.payment_id).await.unwrap().status,
        pb::PaymentStatus::CapturePending as i32
    );
    assert_eq!(captures(&b, &p.payment_id).await, (0, 0));
    assert_eq!(receipts(&b).await, 0);
}

#[tokio::test]
async fn stale_timestamp_is_401_even_with_a_valid_signature() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    // webhook.tolerance is 5 minutes, either way.
    for ts in [now_unix() - 600, now_unix() + 600] {
        let headers = signed(&webhook_id(), ts, &body, SECRET);
        assert_problem(b.post_webhook(&headers, &body).await, 401, "webhook-stale").await;
    }
    assert_eq!(receipts(&b).await, 0);
    // Within the tolerance it is fine.
    let headers = signed(&webhook_id(), now_unix() - 120, &body, SECRET);
    assert_eq!(b.post_webhook(&headers, &body).await.status(), 200);
}

#[tokio::test]
async fn rotated_in_second_secret_is_accepted() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), now_unix(), &body, ROTATED_SECRET);
    assert_eq!(b.post_webhook(&headers, &body).await.status(), 200);
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
}

#[tokio::test]
async fn malformed_webhook_is_400_problem() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);

    let mut missing = signed(&webhook_id(), now_unix(), &body, SECRET);
    missing.retain(|(k, _)| *k != "webhook-signature");
    assert_problem(
        b.post_webhook(&missing, &body).await,
        400,
        "webhook-malformed",
    )
    .await;
    let mut bad_ts = signed(&webhook_id(), now_unix(), &body, SECRET);
    bad_ts[1].1 = "yesterday".into();
    assert_problem(
        b.post_webhook(&bad_ts, &body).await,
        400,
        "webhook-malformed",
    )
    .await;

    // Authentic but not JSON, or JSON without the fields a capture needs.
    for junk in [
        "{not json",
        r#"{"type":"payment.captured","data":{"reference":"x"}}"#,
    ] {
        let headers = signed(&webhook_id(), now_unix(), junk, SECRET);
        assert_problem(
            b.post_webhook(&headers, junk).await,
            400,
            "webhook-malformed",
        )
        .await;
    }
    assert_eq!(receipts(&b).await, 0);
}

#[tokio::test]
async fn unknown_payment_is_404_and_not_recorded_so_a_redelivery_can_apply() {
    let b = Billing::start().await;
    let (mut p, auth) = capture_pending(&b).await;
    let real = p.payment_id.clone();
    p.payment_id = uuid::Uuid::new_v4().to_string();
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), now_unix(), &body, SECRET);
    assert_problem(
        b.post_webhook(&headers, &body).await,
        404,
        "webhook-unknown-payment",
    )
    .await;
    assert_eq!(receipts(&b).await, 0);
    assert_eq!(
        b.get(&real).await.unwrap().status,
        pb::PaymentStatus::CapturePending as i32
    );
}

#[tokio::test]
async fn webhook_that_overtakes_the_capture_answer_still_settles_it_once() {
    let b = Billing::start().await;
    let p = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    let auth = b.authorization_id(&p.payment_id).await;
    // The provider's webhook lands before billing recorded CaptureRequested.
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), now_unix(), &body, SECRET);
    assert_eq!(b.post_webhook(&headers, &body).await.status(), 200);
    // Capture then finds it captured: success, no provider call, no extra event.
    let after = b.capture(&key("capture"), &p.payment_id).await.unwrap();
    assert_eq!(after.status, CAPTURED);
    assert!(b.psp.calls("capture").is_empty());
    assert_eq!(
        b.events(&p.payment_id).await,
        [
            "AuthorizationRequested",
            "PaymentAuthorized",
            "PaymentCaptured"
        ]
    );
}

/// billing's configuration as the process loads it under `KEEL_PROFILE=dev`, with `vars`
/// added to its environment.
fn load_config(vars: &[(&str, &str)]) -> Result<billing::Config, ConfigError> {
    let env = std::iter::once(("KEEL_PROFILE", "dev"))
        .chain(vars.iter().copied())
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    keel_config::load_from(billing::DEFAULT_CONFIG, env)
}

fn secrets_of(config: &billing::Config) -> Vec<&str> {
    config
        .webhook
        .secrets
        .iter()
        .map(|s| s.expose_secret())
        .collect()
}

#[test]
fn secrets_given_as_one_string_split_into_exactly_the_secrets() {
    // From the environment: commas, spaces and tabs, doubled and at either end.
    let one = format!(" {ROTATED_SECRET}, {FOREIGN_SECRET}\t,{SECRET},, ");
    let config = load_config(&[("KEEL_WEBHOOK__SECRETS", &one)])
        .unwrap_or_else(|e| panic!("{one:?} refused: {e}"));
    assert_eq!(
        secrets_of(&config),
        [ROTATED_SECRET, FOREIGN_SECRET, SECRET]
    );

    // From a mounted file (KEEL_WEBHOOK__SECRETS_FILE): one secret a line.
    let path = std::env::temp_dir().join(format!("keel-secrets-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, format!("{FOREIGN_SECRET}\n{ROTATED_SECRET}\n")).unwrap();
    let loaded = load_config(&[("KEEL_WEBHOOK__SECRETS_FILE", path.to_str().unwrap())]);
    std::fs::remove_file(&path).unwrap();
    let config = loaded.unwrap();
    assert_eq!(secrets_of(&config), [FOREIGN_SECRET, ROTATED_SECRET]);
}

#[tokio::test]
async fn secrets_from_one_environment_string_are_the_ones_the_receiver_accepts() {
    // The rotation's last step: the old secret dropped, a new one added, set as one string.
    let list = format!("{FOREIGN_SECRET}, {ROTATED_SECRET}");
    let b = Billing::start_with(&[("KEEL_WEBHOOK__SECRETS", &list)]).await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    let dropped = signed(&webhook_id(), now_unix(), &body, SECRET);
    assert_problem(
        b.post_webhook(&dropped, &body).await,
        401,
        "webhook-signature",
    )
    .await;
    let new = signed(&webhook_id(), now_unix(), &body, FOREIGN_SECRET);
    assert_eq!(b.post_webhook(&new, &body).await.status(), 200);
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
}

#[test]
fn an_invalid_secret_list_tolerance_or_receipt_age_is_refused_at_validation_naming_its_key() {
    let five = [
        SECRET,
        ROTATED_SECRET,
        FOREIGN_SECRET,
        "whsec_UF/5aqBsR3/U4Zn2TNOSb0m7Lie00tJo",
        "whsec_HCd4DRYEygQxVPp6teSYPT2KKGPyGoZU",
    ];
    // webhook.rs's MAX_SECRETS is 4: rotation needs two, five is a mistake.
    let too_many = five.join(" ");
    let four = five[..4].join(" ");
    let with_a_bad_one = format!("{SECRET} sk_live_not_a_whsec");
    let refused = [
        ("KEEL_WEBHOOK__SECRETS", "", "webhook.secrets"),
        ("KEEL_WEBHOOK__SECRETS", " , ", "webhook.secrets"),
        (
            "KEEL_WEBHOOK__SECRETS",
            too_many.as_str(),
            "webhook.secrets",
        ),
        (
            "KEEL_WEBHOOK__SECRETS",
            with_a_bad_one.as_str(),
            "webhook.secrets",
        ),
        // The prefix is right but the key is 3 bytes: too short to sign with.
        ("KEEL_WEBHOOK__SECRETS", "whsec_AAAA", "webhook.secrets"),
        ("KEEL_WEBHOOK__TOLERANCE", "0s", "webhook.tolerance"),
        ("KEEL_WEBHOOK__TOLERANCE", "61m", "webhook.tolerance"),
        // Shorter than the provider's redeliveries (days) would let one apply twice.
        (
            "KEEL_WEBHOOK__RECEIPTS_KEPT",
            "6d 23h",
            "webhook.receipts_kept",
        ),
        (
            "KEEL_WEBHOOK__RECEIPTS_KEPT",
            "3651d",
            "webhook.receipts_kept",
        ),
    ];
    for (var, value, key) in refused {
        match load_config(&[(var, value)]) {
            Err(ConfigError::Invalid { key: named, reason }) => {
                assert!(named.starts_with(key), "{var}={value:?}: {named}: {reason}");
                for secret in value.split([' ', ',']).filter(|s| !s.is_empty()) {
                    assert!(
                        !reason.contains(secret),
                        "the error shows a secret: {reason}"
                    );
                }
            }
            Err(e) => panic!("{var}={value:?} should be refused naming {key}, got: {e}"),
            Ok(_) => panic!("{var}={value:?} was accepted; it should be refused naming {key}"),
        }
    }
    // The bounds themselves are allowed.
    let config = load_config(&[("KEEL_WEBHOOK__SECRETS", &four)]).unwrap();
    assert_eq!(secrets_of(&config).len(), 4);
    load_config(&[("KEEL_WEBHOOK__TOLERANCE", "1s")]).unwrap();
    load_config(&[("KEEL_WEBHOOK__TOLERANCE", "1h")]).unwrap();
    for kept in ["7d", "3650d"] {
        let config = load_config(&[("KEEL_WEBHOOK__RECEIPTS_KEPT", kept)]).unwrap();
        assert_eq!(
            config.webhook.receipts_kept,
            keel_config::parse_duration(kept).unwrap()
        );
    }
}

#[test]
fn a_webhook_section_without_receipts_kept_keeps_receipts_90_days() {
    // Read on its own, without billing's embedded defaults (which set the key): the struct's
    // own default is the documented 90 days.
    let section = serde_json::json!({"secrets": [SECRET], "tolerance": "5m"});
    let config: billing::webhook::WebhookConfig = serde_json::from_value(section).unwrap();
    assert_eq!(config.receipts_kept, Duration::from_secs(90 * 86_400));
}

/// The longest webhook-id billing accepts (`MAX_ID_LEN` in webhook.rs; the provider's are
/// about 36 bytes).
const MAX_ID_LEN: usize = 128;

#[tokio::test]
async fn a_webhook_id_of_the_longest_length_is_accepted_and_one_byte_more_is_400() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);

    let too_long = format!("msg_{}", "x".repeat(MAX_ID_LEN + 1 - 4));
    assert_eq!(too_long.len(), MAX_ID_LEN + 1);
    let headers = signed(&too_long, now_unix(), &body, SECRET);
    assert_problem(
        b.post_webhook(&headers, &body).await,
        400,
        "webhook-malformed",
    )
    .await;
    assert_eq!(receipts(&b).await, 0);
    assert_eq!(
        b.get(&p.payment_id).await.unwrap().status,
        pb::PaymentStatus::CapturePending as i32
    );

    let longest = format!("msg_{}", "x".repeat(MAX_ID_LEN - 4));
    assert_eq!(longest.len(), MAX_ID_LEN);
    let headers = signed(&longest, now_unix(), &body, SECRET);
    let r = b.post_webhook(&headers, &body).await;
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "applied");
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
    assert_eq!(receipts(&b).await, 1);
}

/// `captured_body` with one field of `data` replaced.
fn captured_body_with(
    p: &pb::Payment,
    auth: &str,
    field: &str,
    value: serde_json::Value,
) -> String {
    let mut body: serde_json::Value = serde_json::from_str(&captured_body(p, auth)).unwrap();
    body["data"][field] = value;
    body.to_string()
}

#[tokio::test]
async fn a_capture_contradicting_the_authorization_amount_or_currency_is_409_and_not_recorded() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let amount = p.amount.as_ref().unwrap();
    // Each differs from the payment in one field only: any one difference is a contradiction.
    let contradictions = [
        ("authorization_id", serde_json::json!("auth_someone_else")),
        ("amount_minor", serde_json::json!(amount.amount_minor + 1)),
        ("currency", serde_json::json!("USD")),
    ];
    assert_ne!(amount.currency, "USD");
    for (field, value) in contradictions {
        let body = captured_body_with(&p, &auth, field, value);
        let headers = signed(&webhook_id(), now_unix(), &body, SECRET);
        assert_problem(
            b.post_webhook(&headers, &body).await,
            409,
            "webhook-conflict",
        )
        .await;
        assert_eq!(
            receipts(&b).await,
            0,
            "{field}: a refused delivery is not recorded"
        );
        assert_eq!(captures(&b, &p.payment_id).await, (0, 0), "{field}");
        assert_eq!(
            b.get(&p.payment_id).await.unwrap().status,
            pb::PaymentStatus::CapturePending as i32,
            "{field}"
        );
    }
    // The genuine capture still applies.
    let body = captured_body(&p, &auth);
    let headers = signed(&webhook_id(), now_unix(), &body, SECRET);
    assert_eq!(b.post_webhook(&headers, &body).await.status(), 200);
    assert_eq!(captures(&b, &p.payment_id).await, (1, 1));
}

#[tokio::test]
async fn a_second_delivery_id_for_a_captured_payment_answers_applied_with_no_second_effect() {
    let b = Billing::start().await;
    let (p, auth) = capture_pending(&b).await;
    let body = captured_body(&p, &auth);
    // The provider sends the same capture twice under two ids (a resend, not a redelivery).
    for n in 0..2 {
        let headers = signed(&webhook_id(), now_unix(), &body, SECRET);
        let r = b.post_webhook(&headers, &body).await;
        assert_eq!(r.status(), 200, "delivery {n}");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["status"], "applied", "delivery {n}");
    }
    assert_eq!(captures(&b, &p.payment_id).await, (1, 1));
    // Both ids are recorded: a redelivery of either is a duplicate.
    assert_eq!(receipts(&b).await, 2);
    assert_eq!(b.get(&p.payment_id).await.unwrap().status, CAPTURED);
}
