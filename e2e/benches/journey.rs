//! `make bench`, the journey's rows (written next to the HTTP rows in `target/bench/report.json`):
//!
//! - `relay_publish_rate`: the outbox relay draining N committed events (claim with SKIP
//!   LOCKED, publish with confirms, mark sent, commit — per batch) ÷ raw lapin publishing the
//!   same N messages with confirms in batches of the same size, to the same exchange and queue.
//!   Goal ≥ 0.8: the transactional bookkeeping may cost at most a fifth of the broker's rate.
//!   The relay runs as the services configure it (`relay.concurrency = 2`: one batch awaits
//!   its confirms while the next is claimed); the raw side publishes batch after batch on one
//!   channel, as a hand-written publisher would.
//! - `order_placement_rate`: checkout's placement transaction (idempotency key, order, lines,
//!   history, saga, saga job, outbox event, stored answer: `checkout::orders::place_order`) ÷
//!   inserting the bare order row, both with 16 concurrent callers on the same pool through
//!   pgbouncer. Goal ≥ 0.5: everything the pattern needs costs at most as much again.
//! - `order_to_final_p50_ms` / `order_to_final_p99_ms`: POST → final state (CONFIRMED) on the
//!   four release binaries at a fixed moderate rate, measured by the database's clock
//!   (order `created_at` to the final history row). Reported; later steps set the goal.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keel_amqp::RelayConfig;
use keel_pg::outbox::{self, NewEvent};
use keel_testkit::bench::{Row, paired_ratio_row, round};
use keel_testkit::{TestDb, TestVhost, eventually};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::Connection as _;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

const EVENTS: usize = 5_000;
const BATCH: usize = 100;
const ROUNDS: usize = 3;
const QUEUE: &str = "bench.sink";

async fn sink(url: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    keel_amqp::topology::declare_exchange(&ch).await.unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        QUEUE.into(),
        keel_events::EXCHANGE.into(),
        "bench.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

async fn fill_outbox(pool: &sqlx::PgPool) -> Vec<Vec<u8>> {
    let mut bodies = Vec::with_capacity(EVENTS);
    let mut tx = pool.begin().await.unwrap();
    for i in 0..EVENTS {
        let aggregate = format!("agg-{i}");
        outbox::insert(
            &mut tx,
            &NewEvent {
                aggregate_type: "bench",
                aggregate_id: &aggregate,
                event_type: "bench.item.created",
                data: serde_json::json!({ "n": i, "pad": "x".repeat(200) }),
            },
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let rows: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE sent_at IS NULL ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap();
    for r in rows {
        bodies.push(serde_json::to_vec(&r).unwrap());
    }
    bodies
}

/// Raw lapin: the same bodies, confirms awaited per batch of `BATCH`.
async fn raw_publish(ch: &lapin::Channel, bodies: &[Vec<u8>]) -> f64 {
    let started = Instant::now();
    for batch in bodies.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(batch.len());
        for body in batch {
            // The same properties the relay sets (conventions: id, type, timestamp, content
            // type, persistent, traceparent), so both sides send identical messages.
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(keel_amqp::publisher::fresh_traceparent().into()),
            );
            let props = BasicProperties::default()
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_type("bench.item.created".into())
                .with_timestamp(1_700_000_000)
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            confirms.push(
                ch.basic_publish(
                    keel_events::EXCHANGE.into(),
                    "bench.item.created".into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    bodies.len() as f64 / started.elapsed().as_secs_f64()
}

async fn relay_drain(pool: &sqlx::PgPool, amqp_url: &str) -> f64 {
    let stop = CancellationToken::new();
    let broker = keel_amqp::Broker::spawn(
        keel_testkit::config::<BenchAmqp>(
            "[amqp]\nurl = \"amqp://x\"\nconnect_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
            &[("KEEL_AMQP__URL", amqp_url)],
        )
        .amqp,
        "bench",
        stop.clone(),
    );
    eventually(
        Duration::from_secs(10),
        "relay broker connected",
        || async { broker.is_connected().await.then_some(()) },
    )
    .await;
    let config = RelayConfig {
        batch_size: BATCH as u32,
        poll_interval: Duration::from_millis(10),
        publish_timeout: Duration::from_secs(10),
        max_backoff: Duration::from_secs(1),
        backlog_interval: Duration::from_secs(60),
        concurrency: 2,
        max_attempts: keel_amqp::relay::DEFAULT_MAX_ATTEMPTS,
        max_message_bytes: keel_amqp::relay::DEFAULT_MAX_MESSAGE_BYTES,
    };
    let started = Instant::now();
    let relay = keel_amqp::relay::spawn(pool.clone(), broker.clone(), config, stop.clone());
    eventually(Duration::from_secs(120), "outbox drained", || async {
        let mut c = pool.acquire().await.ok()?;
        (outbox::backlog(&mut c).await.ok()?.unsent == 0).then_some(())
    })
    .await;
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    relay.await.unwrap();
    broker.close().await;
    rate
}

#[derive(Debug, serde::Deserialize)]
struct BenchAmqp {
    amqp: keel_amqp::AmqpConfig,
}

impl keel_config::Validate for BenchAmqp {
    fn validate(&self) -> Result<(), keel_config::ConfigError> {
        self.amqp.validate()
    }
}

async fn relay_row() -> Row {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.app_url())
        .await
        .unwrap();
    let (_conn, ch) = sink(&vhost.url()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (mut keel, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        sqlx::query("DELETE FROM outbox")
            .execute(&pool)
            .await
            .unwrap();
        let bodies = fill_outbox(&pool).await;
        raw.push(raw_publish(&ch, &bodies).await);
        ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        keel.push(relay_drain(&pool, &vhost.url()).await);
        ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    paired_ratio_row("relay_publish_rate", "events/s", &keel, &raw, 0.8)
}

const PLACE_CALLERS: usize = 16;
const PLACE_SECONDS: u64 = 3;

/// Runs `op` from `PLACE_CALLERS` tasks for `PLACE_SECONDS`; returns completed ops per second.
async fn rate<F, Fut>(op: F) -> f64
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(PLACE_SECONDS);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..PLACE_CALLERS {
        let op = op.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                op(caller as u64 * 1_000_000 + n).await;
                n += 1;
            }
            n
        });
    }
    let done: u64 = tasks.join_all().await.into_iter().sum();
    done as f64 / started.elapsed().as_secs_f64()
}

async fn placement_row() -> Row {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let url = db.app_url();
    let config: checkout::Config = keel_testkit::config(
        checkout::DEFAULT_CONFIG,
        &[("KEEL_DATABASE__URL", url.as_str())],
    );
    // The service's own pool settings (size, acquire timeout), through pgbouncer.
    let pool = keel_pg::runtime_pool(&config.database, "bench").unwrap();
    let state = checkout::orders::OrdersState {
        pool: pool.clone(),
        orders: config.orders.clone(),
        saga: config.saga.clone(),
    };
    let order = checkout::orders::request::parse(
        br#"{"currency":"EUR","payment_token":"tok_approve",
             "lines":[{"sku":"KEEL-MUG","quantity":1},{"sku":"KEEL-BOOK","quantity":2}]}"#,
        checkout::orders::request::Limits {
            max_lines: config.orders.max_lines,
            max_quantity: config.orders.max_quantity,
        },
    )
    .unwrap();
    let caller = checkout::api_keys::Authenticated {
        customer: keel_events::CustomerId::from("bench"),
        key_id: "bench".to_owned(),
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (mut keel, mut bare) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (state, order, run) = (state.clone(), order.clone(), run.clone());
        let caller = caller.clone();
        keel.push(
            rate(move |n| {
                let (state, order, caller) = (state.clone(), order.clone(), caller.clone());
                let key = format!("{run}-{round}-{n}");
                async move {
                    let placed = checkout::orders::place_order(&state, &caller, &order, &key).await;
                    assert!(matches!(placed, Ok(checkout::orders::Placed::New(_))));
                }
            })
            .await,
        );
        let pool = pool.clone();
        bare.push(
            rate(move |_| {
                let pool = pool.clone();
                async move {
                    sqlx::query(
                        "INSERT INTO orders (id, customer_id, currency, total_minor, state)
                         VALUES ($1, 'bench', 'EUR', 1200, 'PENDING')",
                    )
                    .bind(uuid::Uuid::now_v7())
                    .execute(&pool)
                    .await
                    .unwrap();
                }
            })
            .await,
        );
    }
    pool.close().await;
    paired_ratio_row("order_placement_rate", "orders/s", &keel, &bare, 0.5)
}

const LATENCY_RATE: u64 = 10; // orders per second
const LATENCY_ORDERS: u64 = 100;

async fn latency_rows() -> Vec<Row> {
    let journey = keel_e2e::Journey::start(keel_e2e::Options::default()).await;
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / LATENCY_RATE));
    for _ in 0..LATENCY_ORDERS {
        tick.tick().await;
        ids.push(journey.place("tok_approve", &[("KEEL-MUG", 1)]).await);
    }
    for id in &ids {
        assert_eq!(
            journey.final_state(id, Duration::from_secs(60)).await,
            "CONFIRMED"
        );
    }
    let mut conn = sqlx::PgConnection::connect(&journey.checkout_db.admin_url())
        .await
        .unwrap();
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM h.at - o.created_at) * 1000)::float8
           FROM orders o JOIN order_history h ON h.order_id = o.id AND h.state = o.state
          WHERE o.state = 'CONFIRMED'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!(
        "POST → CONFIRMED over {} orders at {LATENCY_RATE}/s: p50 {p50:.1} ms, p99 {p99:.1} ms",
        ms.len()
    );
    let row = |name: &str, v: f64| Row {
        name: name.into(),
        unit: "ms".into(),
        keel: round(v, 1),
        baseline: 0.0,
        ratio: 0.0,
        goal: format!("report ({LATENCY_RATE} orders/s)"),
        // A reported figure with no goal: nothing to miss.
        met: true,
    };
    vec![
        row("order_to_final_p50_ms", p50),
        row("order_to_final_p99_ms", p99),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut rows = vec![placement_row().await, relay_row().await];
    rows.extend(Box::pin(latency_rows()).await);
    keel_testkit::bench::record(&rows);
}
