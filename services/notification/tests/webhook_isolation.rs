//! P33/P25 isolation proof (step 6, item 8): three endpoints, dead, slow and healthy, receive
//! deliveries at once, and the healthy one's delivery latency stays within 20 % of its
//! latency alone.
//!
//! Latency is from the delivery's creation (`webhook_deliveries.created_at`, the consumer's
//! transaction) to the healthy receiver getting it; the medians of the two conditions are
//! compared. Each variant runs on its own database, in rounds: the healthy endpoint alone, then
//! with a dead endpoint (accepts, never answers: every attempt waits for the 500 ms answer
//! timeout) and a slow one (answers after 1 s) registered beside it by the same customer, so
//! that every notification is three deliveries at once; then those two are deleted and the
//! next round starts (new endpoints: their breakers start closed again).
//!
//! The failing side first: the same worker with its guards off (`per_endpoint_concurrency`
//! equal to the worker's slots, a breaker that never opens) lets the dead and slow endpoints
//! take every slot, and the healthy endpoint's deliveries wait behind them. Then Keel's
//! settings: one slot per endpoint and a breaker, and the healthy endpoint does not notice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use keel_testkit::{TestBroker, TestDb, TestVhost, eventually};
use support::{
    Behaviour, QUEUE, Receiver, Running, api_key, closed_port, register, service_config,
};
use uuid::Uuid;

/// Notifications per phase, one every [`PACE`].
const PACE: Duration = Duration::from_millis(100);
const BOUND: Duration = Duration::from_secs(120);

/// Both variants: 4 slots, a 500 ms answer timeout, deliveries to loopback allowed.
const COMMON: [(&str, &str); 7] = [
    ("KEEL_WEBHOOKS__ALLOW_HTTP", "true"),
    ("KEEL_WEBHOOKS__EGRESS__ALLOW", "127.0.0.0/8"),
    ("KEEL_WEBHOOKS__CONCURRENCY", "4"),
    ("KEEL_WEBHOOKS__LIMITS__RESPONSE_TIMEOUT", "500ms"),
    ("KEEL_WEBHOOKS__LIMITS__TOTAL_TIMEOUT", "2s"),
    (
        "KEEL_WEBHOOKS__RETRY_SCHEDULE",
        "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
    ),
    ("KEEL_WEBHOOKS__BUSY_RETRY", "200ms"),
];

/// Guards off: any endpoint may take all 4 slots; the breaker never judges.
const NAIVE: [(&str, &str); 2] = [
    ("KEEL_WEBHOOKS__PER_ENDPOINT_CONCURRENCY", "4"),
    ("KEEL_WEBHOOKS__BREAKER__MINIMUM_CALLS", "1000000"),
];

/// Keel's guards: one slot per endpoint; the breaker opens after 2 failed attempts in 10 s,
/// for 2 s (then a probe: the dead endpoint keeps costing a slot now and then, as it would; and
/// a deleted one's postponed deliveries come due soon, so a round settles quickly).
const GUARDED: [(&str, &str); 4] = [
    ("KEEL_WEBHOOKS__PER_ENDPOINT_CONCURRENCY", "1"),
    ("KEEL_WEBHOOKS__BREAKER__MINIMUM_CALLS", "2"),
    ("KEEL_WEBHOOKS__BREAKER__WINDOW", "10s"),
    ("KEEL_WEBHOOKS__BREAKER__OPEN_FOR", "2s"),
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() * 9 / 10]
}

/// Publishes `n` confirmed orders for `customer`, one every PACE, and returns the healthy
/// receiver's latency for each (creation of the delivery to its arrival).
async fn phase(
    db: &TestDb,
    broker: &TestBroker,
    healthy: &Receiver,
    endpoint: Uuid,
    customer: &str,
    n: usize,
) -> Vec<Duration> {
    let before = healthy.received().len();
    let mut tick = tokio::time::interval(PACE);
    for _ in 0..n {
        tick.tick().await;
        support::publish_confirmed(broker, customer, 1).await;
    }
    let got = eventually(
        BOUND,
        &format!("{n} deliveries to the healthy endpoint"),
        || async {
            let got = healthy.received();
            (got.len() >= before + n).then_some(got)
        },
    )
    .await;
    let mut admin = support::admin(db).await;
    let mut latencies = Vec::new();
    for r in &got[before..] {
        let id: Uuid = r.header("webhook-id").parse().unwrap();
        let created: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT created_at FROM webhook_deliveries WHERE id = $1 AND endpoint_id = $2",
        )
        .bind(id)
        .bind(endpoint)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        latencies.push((r.at - created).to_std().unwrap_or_default());
    }
    latencies
}

/// One variant, `rounds` times: the healthy endpoint alone for `n` notifications, then with a
/// new dead and a new slow endpoint beside it for `n` more (deleted again at the end of the
/// round). Rounds interleave the two conditions, so that whatever else the machine does in the
/// meantime weighs on both alike. Returns (latencies alone, latencies beside them).
async fn run(guards: &[(&str, &str)], rounds: usize, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let all: Vec<(&str, &str)> = COMMON.iter().chain(guards).copied().collect();
    let app = Running::start_with(service_config(&db, &vhost, closed_port(), &all)).await;
    let healthy = Receiver::start(Behaviour::Healthy).await;
    let slow = Receiver::start(Behaviour::Slow(Duration::from_secs(1))).await;
    let dead = Receiver::start(Behaviour::Dead).await;
    let key = api_key(&db, "acme").await;
    let (endpoint, _) = register(&app, &key, &healthy.url(), &["order.confirmed"]).await;
    broker
        .wait_for_consumer(QUEUE, Duration::from_secs(20))
        .await;

    let (mut alone, mut together) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        alone.extend(phase(&db, &broker, &healthy, endpoint, "acme", n).await);
        let (slow_id, _) = register(&app, &key, &slow.url(), &["order.confirmed"]).await;
        let (dead_id, _) = register(&app, &key, &dead.url(), &["order.confirmed"]).await;
        together.extend(phase(&db, &broker, &healthy, endpoint, "acme", n).await);
        for id in [slow_id, dead_id] {
            let status = reqwest::Client::new()
                .delete(app.url(&format!("/v1/webhook-endpoints/{id}")))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 204);
        }
        // The next "alone" starts alone: no attempt to the deleted two still in flight, and
        // none of their deliveries due (postponed ones, behind an open breaker, stay asleep).
        let groups = vec![slow_id.to_string(), dead_id.to_string()];
        eventually(BOUND, "the deleted endpoints' work settled", || async {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE queue = 'webhook.deliver'
                    AND payload ->> 'endpoint_id' = ANY ($1)
                    AND (state = 'running' OR (state = 'queued' AND run_at <= now()))",
            )
            .bind(&groups)
            .fetch_one(&mut support::admin(&db).await)
            .await
            .unwrap();
            (busy == 0).then_some(())
        })
        .await;
    }
    assert!(
        !slow.received().is_empty(),
        "the slow endpoint was delivered to"
    );
    app.stop().await;
    (alone, together)
}

fn report(name: &str, alone: &[Duration], together: &[Duration]) {
    eprintln!(
        "{name}: healthy endpoint latency alone p50 {:?} p90 {:?}; beside dead and slow p50 {:?} p90 {:?} (n = {})",
        median(alone.to_vec()),
        p90(alone.to_vec()),
        median(together.to_vec()),
        p90(together.to_vec()),
        alone.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_and_a_slow_endpoint_do_not_delay_a_healthy_one() {
    // The failing side: guards off.
    let (alone, together) = run(&NAIVE, 1, 12).await;
    report("guards off", &alone, &together);
    assert!(
        median(together.clone()) > median(alone.clone()) * 3,
        "without the guards the healthy endpoint should wait behind the others"
    );

    // Keel's guards, the same conditions.
    let (alone, together) = run(&GUARDED, 3, 15).await;
    report("guarded", &alone, &together);
    let (a, t) = (median(alone), median(together));
    assert!(
        t.as_secs_f64() <= a.as_secs_f64() * 1.2,
        "healthy latency beside dead and slow endpoints: p50 {t:?} vs {a:?} alone (> 20 % more)"
    );
    assert!(
        support::metric("webhook_breaker_transitions_total{to=\"open\"} ") >= 1.0,
        "the dead endpoint's breaker opened"
    );
}
