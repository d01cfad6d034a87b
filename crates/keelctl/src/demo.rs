//! `keelctl demo` (`make demo`): the journey's every outcome against a running stack.
//!
//! Places a mix of orders over the public API — approved, out of stock, declined, a flaky
//! provider, a provider that never answers, a duplicate request, and a replayed provider
//! webhook — waits (bounded) until each has reached a final state and its notification,
//! prints what happened next to what should have, and finishes with the audit. Exit 1 when
//! any outcome or audit check is wrong.
// The table is the command's output, for the operator's terminal.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Config;

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
}

struct Case {
    scenario: &'static str,
    expected: &'static str,
    order_id: String,
    state: String,
    note: String,
}

fn http_err(what: impl Into<String>) -> impl FnOnce(reqwest::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Http { what, source }
}

async fn post_order(
    client: &reqwest::Client,
    config: &Config,
    key: &str,
    token: &str,
    lines: Value,
) -> Result<(u16, bool, Value), DemoError> {
    let res = client
        .post(format!("{}/v1/orders", config.demo.checkout_url))
        .header("Idempotency-Key", key)
        .json(&json!({
            "customer_id": "demo-customer",
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
    client
        .get(&url)
        .send()
        .await
        .map_err(http_err(url.clone()))?
        .json()
        .await
        .map_err(http_err(url))
}

/// Runs the demo and prints its table and the audit. `Ok(true)` when everything held.
pub async fn run(config: &Config) -> Result<bool, DemoError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(http_err("HTTP client"))?;
    let key = || uuid::Uuid::new_v4().to_string();
    let line = |sku: &str, q: i64| json!([{ "sku": sku, "quantity": q }]);

    // The scarcest product: order one more than is left.
    let mut checkout = crate::connect(&config.checkout).await?;
    let (scarce, left): (String, i32) =
        sqlx::query_as("SELECT sku, available FROM stock ORDER BY available, sku LIMIT 1")
            .fetch_one(&mut checkout)
            .await?;

    let plan: Vec<(&str, &str, &str, Value)> = vec![
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
        let (status, _, body) = post_order(&client, config, &key(), token, lines).await?;
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
        });
    }

    // The same request twice with one key: one order, the second answer is a replay.
    let dup = key();
    let (_, _, first) =
        post_order(&client, config, &dup, "tok_approve", line("KEEL-MUG", 1)).await?;
    let (status, replayed, second) =
        post_order(&client, config, &dup, "tok_approve", line("KEEL-MUG", 1)).await?;
    let same = first["id"] == second["id"];
    cases.push(Case {
        scenario: "duplicate request, one key",
        expected: "CONFIRMED",
        order_id: first["id"].as_str().unwrap_or_default().to_owned(),
        state: String::new(),
        note: format!("second POST: {status}, replayed={replayed}, same order={same}"),
    });
    let dup_ok = same && replayed;

    // Wait for every order to end and be notified.
    let deadline = Instant::now() + config.demo.settle_timeout;
    for case in &mut cases {
        loop {
            let order = get_json(
                &client,
                format!("{}/v1/orders/{}", config.demo.checkout_url, case.order_id),
            )
            .await?;
            let state = order["state"].as_str().unwrap_or_default().to_owned();
            let notes = get_json(
                &client,
                format!(
                    "{}/v1/notifications?order_id={}",
                    config.demo.notification_url, case.order_id
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
                break;
            }
            if Instant::now() >= deadline {
                case.state = format!("{state} (not settled)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // A replayed provider webhook: psp-sim sends its first webhook again, same id and body.
    let hooks = get_json(&client, format!("{}/admin/webhooks", config.demo.psp_url)).await?;
    let replay_note = match hooks["webhooks"].as_array().and_then(|h| h.first()) {
        Some(h) => {
            let id = h["id"].as_str().unwrap_or_default();
            let res = client
                .post(format!(
                    "{}/admin/webhooks/{id}/redeliver",
                    config.demo.psp_url
                ))
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

    let mut all_ok = dup_ok;
    println!(
        "{:<32} {:<36} {:<17} {:<17} {:<4} note",
        "scenario", "order", "expected", "final state", "ok"
    );
    for c in &cases {
        let ok = c.state == c.expected;
        all_ok &= ok;
        println!(
            "{:<32} {:<36} {:<17} {:<17} {:<4} {}",
            c.scenario,
            c.order_id,
            c.expected,
            c.state,
            if ok { "yes" } else { "NO" },
            c.note
        );
    }
    println!("replayed webhook: {replay_note} (the audit below checks it had no second effect)");
    println!();

    // Audit with bounds that fit a demo that has just waited for its orders to settle.
    let mut audit_config = config.clone();
    audit_config.audit.settle_within = Duration::from_secs(1);
    let report = wait_for_audit(&audit_config).await?;
    println!("{report}");
    Ok(all_ok && report.passed())
}

/// The replayed webhook and the last notifications settle within moments of the orders;
/// give the audit a few bounded tries before reporting it.
async fn wait_for_audit(config: &Config) -> Result<crate::audit::Report, DemoError> {
    let mut report = crate::audit::run(config).await?;
    for _ in 0..20 {
        if report.passed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        report = crate::audit::run(config).await?;
    }
    Ok(report)
}
