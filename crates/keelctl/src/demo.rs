//! `keelctl demo` (`make demo`): the journey's every outcome against a running stack (P04,
//! P13, P24, P25, P32).
//!
//! Places a mix of orders over the public API — approved, out of stock, declined, a flaky
//! provider, a provider that never answers, a duplicate request, and a replayed provider
//! webhook — waits (bounded, with a progress line on stderr) until each has reached a final
//! state and its notification, reports what happened next to what should have, and finishes
//! with the audit. Not generic on purpose: it is the journey's demo, so it names the services
//! it drives (checkout, notification, psp-sim) and finds their URLs in the registry's targets;
//! a new service needs nothing here, the audit's generic checks cover it.
//!
//! The orders API wants an API key: the demo issues its own for the customer `demo-customer`
//! in checkout's database through the operator's path (`keel_pg::api_keys::issue`, as
//! `keelctl api-keys create` does), so `make demo` needs nothing but a running stack. The key
//! is used and dropped, never printed.

use std::time::{Duration, Instant};

use keel_config::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Config;
use crate::audit::Report;
use crate::progress::Progress;
use crate::targets::Targets;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {source}")]
    Http {
        what: String,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("checkout database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("issuing the demo's API key: {0}")]
    ApiKey(#[from] crate::api_keys::ApiKeyError),
    #[error(
        "the demo drives {0}, which the registry does not have (with a database, for checkout)"
    )]
    NotRegistered(&'static str),
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub scenario: &'static str,
    pub expected: &'static str,
    pub order_id: String,
    /// The final state reached (with " (not settled)" when the wait ran out).
    pub state: String,
    pub note: String,
    pub ok: bool,
}

/// Everything the demo did and found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub cases: Vec<Case>,
    /// What happened to the replayed provider webhook.
    pub replayed_webhook: String,
    pub audit: Report,
    /// Every case as expected, the duplicate request replayed, and the audit passed.
    pub passed: bool,
}

impl Outcome {
    /// The cases as a table of 100 columns: the order id and the state stay whole; what was
    /// expected is said only where it differs.
    pub fn table(&self) -> comfy_table::Table {
        let mut t = crate::output::table(["scenario", "order", "final state", "ok", "note"]);
        for c in &self.cases {
            let note = if c.ok {
                c.note.clone()
            } else {
                format!("expected {}; {}", c.expected, c.note)
            };
            t.add_row([
                c.scenario.to_owned(),
                c.order_id.clone(),
                c.state.clone(),
                if c.ok { "yes" } else { "NO" }.to_owned(),
                note,
            ]);
        }
        crate::output::keep_whole(&mut t, &[1, 2, 3]);
        t
    }
}

fn http_err(what: impl Into<String>) -> impl FnOnce(reqwest::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Http { what, source }
}

/// The customer the demo's orders are placed for (its API key's customer).
pub const DEMO_CUSTOMER: &str = "demo-customer";

struct Urls {
    checkout: String,
    notification: String,
    psp: String,
}

/// Who the demo is to checkout: its API key.
struct Caller {
    api_key: SecretString,
}

async fn post_order(
    client: &reqwest::Client,
    urls: &Urls,
    caller: &Caller,
    key: &str,
    token: &str,
    lines: Value,
) -> Result<(u16, bool, Value), DemoError> {
    let res = client
        .post(format!("{}/v1/orders", urls.checkout))
        .bearer_auth(caller.api_key.expose_secret())
        .header("Idempotency-Key", key)
        .json(&json!({
            "currency": "EUR",
            "payment_token": token,
            "lines": lines,
        }))
        .send()
        .await
        .map_err(http_err("POST /v1/orders"))?;
    let status = res.status().as_u16();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    let body = res.json().await.map_err(http_err("order response"))?;
    Ok((status, replayed, body))
}

async fn get_json(client: &reqwest::Client, url: String) -> Result<Value, DemoError> {
    send_json(client.get(&url), url).await
}

async fn send_json(request: reqwest::RequestBuilder, url: String) -> Result<Value, DemoError> {
    request
        .send()
        .await
        .map_err(http_err(url.clone()))?
        .json()
        .await
        .map_err(http_err(url))
}

/// Runs the demo; `progress` shows the waits.
pub async fn run(config: &Config, progress: &mut Progress) -> Result<Outcome, DemoError> {
    let targets = config.targets().map_err(|e| DemoError::Audit(e.into()))?;
    let http = |name: &'static str| {
        targets
            .get(name)
            .map(|t| t.http_url.clone())
            .ok_or(DemoError::NotRegistered(name))
    };
    let urls = Urls {
        checkout: http("checkout")?,
        notification: http("notification")?,
        // Only psp-sim's admin routes are used: they listen on its registry `admin` port
        // (loopback only), never on its public one. `KEEL_PSP_SIM__ADMIN_URL` points elsewhere.
        psp: targets
            .get("psp-sim")
            .and_then(|t| t.admin_url.clone())
            .ok_or(DemoError::NotRegistered("psp-sim"))?,
    };
    let checkout_db = targets
        .get("checkout")
        .and_then(|t| t.database_url.clone())
        .ok_or(DemoError::NotRegistered("checkout"))?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(http_err("HTTP client"))?;
    let key = || uuid::Uuid::new_v4().to_string();
    let line = |sku: &str, q: i64| json!([{ "sku": sku, "quantity": q }]);

    // The scarcest product: order one more than is left.
    let mut checkout = crate::connect(&checkout_db).await?;
    let (scarce, left): (String, i32) =
        sqlx::query_as("SELECT sku, available FROM stock ORDER BY available, sku LIMIT 1")
            .fetch_one(&mut checkout)
            .await?;
    // Issued as the operator (the one INSERT keel_operator may make); everything else the
    // demo reads goes through the read-only connection above.
    let operator_url = targets
        .get("checkout")
        .and_then(|t| t.operator_url.clone())
        .ok_or(DemoError::NotRegistered("checkout"))?;
    let mut operator = crate::connect(&operator_url).await?;
    let caller = Caller {
        api_key: keel_pg::api_keys::issue(&mut operator, DEMO_CUSTOMER)
            .await?
            .key,
    };
    drop(operator);

    let plan: Vec<(&'static str, &'static str, &str, Value)> = vec![
        ("approved", "CONFIRMED", "tok_approve", line("KEEL-MUG", 2)),
        ("approved", "CONFIRMED", "tok_approve", line("KEEL-BOOK", 1)),
        (
            "out of stock",
            "REJECTED",
            "tok_approve",
            line(&scarce, i64::from(left) + 1),
        ),
        (
            "card declined",
            "PAYMENT_DECLINED",
            "tok_decline",
            line("KEEL-HOODIE", 1),
        ),
        (
            "insufficient funds",
            "PAYMENT_DECLINED",
            "tok_insufficient_funds",
            line("KEEL-TEE-M", 1),
        ),
        (
            "flaky provider (503, 503, ok)",
            "CONFIRMED",
            "tok_flaky",
            line("KEEL-TEE-L", 1),
        ),
        (
            "slow provider",
            "CONFIRMED",
            "tok_slow",
            line("KEEL-STICKERS", 2),
        ),
        (
            "provider never answers",
            "PAYMENT_FAILED",
            "tok_timeout",
            line("KEEL-STICKERS", 1),
        ),
    ];
    let mut cases = Vec::new();
    for (scenario, expected, token, lines) in plan {
        let (status, _, body) = post_order(&client, &urls, &caller, &key(), token, lines).await?;
        if status != 202 {
            return Err(DemoError::Unexpected(format!(
                "{scenario}: POST /v1/orders answered {status}: {body}"
            )));
        }
        cases.push(Case {
            scenario,
            expected,
            order_id: body["id"].as_str().unwrap_or_default().to_owned(),
            state: String::new(),
            note: String::new(),
            ok: false,
        });
    }

    // The same request twice with one key: one order, the second answer is a replay.
    let dup = key();
    let (_, _, first) = post_order(
        &client,
        &urls,
        &caller,
        &dup,
        "tok_approve",
        line("KEEL-MUG", 1),
    )
    .await?;
    let (status, replayed, second) = post_order(
        &client,
        &urls,
        &caller,
        &dup,
        "tok_approve",
        line("KEEL-MUG", 1),
    )
    .await?;
    let same = first["id"] == second["id"];
    cases.push(Case {
        scenario: "duplicate request, one key",
        expected: "CONFIRMED",
        order_id: first["id"].as_str().unwrap_or_default().to_owned(),
        state: String::new(),
        note: format!("second POST: {status}, replayed={replayed}, same order={same}"),
        ok: false,
    });
    let dup_ok = same && replayed;

    settle(&client, &urls, &caller, config, &mut cases, progress).await?;

    // A replayed provider webhook: psp-sim sends its first webhook again, same id and body.
    let hooks = get_json(&client, format!("{}/admin/webhooks", urls.psp)).await?;
    let replayed_webhook = match hooks["webhooks"].as_array().and_then(|h| h.first()) {
        Some(h) => {
            let id = h["id"].as_str().unwrap_or_default();
            let res = client
                .post(format!("{}/admin/webhooks/{id}/redeliver", urls.psp))
                .send()
                .await
                .map_err(http_err("redeliver webhook"))?;
            format!(
                "webhook {id} sent again: psp-sim answered {}",
                res.status().as_u16()
            )
        }
        None => "no webhook to replay (no capture happened)".to_owned(),
    };

    for c in &mut cases {
        c.ok = c.state == c.expected;
    }
    let cases_ok = dup_ok && cases.iter().all(|c| c.ok);

    // Audit with bounds that fit a demo that has just waited for its orders to settle.
    let mut audit_config = config.clone();
    audit_config.audit.settle_within = Duration::from_secs(1);
    let audit = wait_for_audit(&audit_config, &targets, progress).await?;
    Ok(Outcome {
        passed: cases_ok && audit.passed(),
        cases,
        replayed_webhook,
        audit,
    })
}

/// Polls (bounded by `demo.settle_timeout`) until every case's order is final and notified.
async fn settle(
    client: &reqwest::Client,
    urls: &Urls,
    caller: &Caller,
    config: &Config,
    cases: &mut [Case],
    progress: &mut Progress,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + config.demo.settle_timeout;
    let mut last_state = vec![String::new(); cases.len()];
    loop {
        for (case, last) in cases.iter_mut().zip(&mut last_state) {
            if !case.state.is_empty() {
                continue;
            }
            let url = format!("{}/v1/orders/{}", urls.checkout, case.order_id);
            let order = send_json(
                client.get(&url).bearer_auth(caller.api_key.expose_secret()),
                url,
            )
            .await?;
            let state = order["state"].as_str().unwrap_or_default().to_owned();
            let notes = get_json(
                client,
                format!(
                    "{}/v1/notifications?order_id={}",
                    urls.notification, case.order_id
                ),
            )
            .await?;
            let notified = notes["notifications"]
                .as_array()
                .is_some_and(|n| !n.is_empty());
            if crate::audit::FINAL_STATES.contains(&state.as_str()) && notified {
                if let Some(reason) = order["reason"].as_str() {
                    case.note = if case.note.is_empty() {
                        format!("reason: {reason}")
                    } else {
                        format!("{}; reason: {reason}", case.note)
                    };
                }
                case.state = state;
            } else {
                *last = state;
            }
        }
        let done = cases.iter().filter(|c| !c.state.is_empty()).count();
        let left = deadline.saturating_duration_since(Instant::now());
        progress.update(
            "orders final and notified",
            done,
            cases.len(),
            &format!("({} s left)", left.as_secs()),
        );
        if done == cases.len() {
            break;
        }
        if left.is_zero() {
            for (case, last) in cases.iter_mut().zip(&last_state) {
                if case.state.is_empty() {
                    case.state = format!("{last} (not settled)");
                }
            }
            break;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish();
    Ok(())
}

/// The replayed webhook and the last notifications settle within moments of the orders; give
/// the audit a few bounded tries before reporting it.
async fn wait_for_audit(
    config: &Config,
    targets: &Targets,
    progress: &mut Progress,
) -> Result<Report, DemoError> {
    const TRIES: usize = 20;
    let mut report = Report::default();
    for attempt in 1..=TRIES {
        report = crate::audit::run_on(targets, &config.audit, &config.rabbitmq).await?;
        let passing = report.checks.iter().filter(|c| c.passed()).count();
        progress.update(
            "audit checks passing",
            passing,
            report.checks.len(),
            &format!("(try {attempt}/{TRIES})"),
        );
        if report.passed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress.finish();
    Ok(report)
}
