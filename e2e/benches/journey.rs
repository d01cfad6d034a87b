//! `make bench`, step 2 rows (written next to step 1's in `target/bench/report.json`):
//!
//! - `relay_publish_rate`: the outbox relay draining N committed events (claim with SKIP
//!   LOCKED, publish with confirms, mark sent, commit — per batch) ÷ raw lapin publishing the
//!   same N messages with confirms in batches of the same size, to the same exchange and queue.
//!   Goal ≥ 0.8: the transactional bookkeeping may cost at most a fifth of the broker's rate.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keel_amqp::RelayConfig;
use keel_pg::outbox::{self, NewEvent};
use keel_testkit::bench::{Row, round};
use keel_testkit::{TestDb, TestVhost, eventually};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
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
        keel_contracts::events::EXCHANGE.into(),
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
                    keel_contracts::events::EXCHANGE.into(),
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
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = keel.iter().zip(&raw).map(|(k, r)| k / r).collect();
    println!(
        "relay/raw per-round ratios: {:?}",
        ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>()
    );
    let ratio = median(ratios);
    Row {
        name: "relay_publish_rate".into(),
        unit: "events/s".into(),
        keel: round(median(keel), 0),
        baseline: round(median(raw), 0),
        ratio: round(ratio, 3),
        goal: ">= 0.8 (ratio)".into(),
        met: ratio >= 0.8,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows = vec![relay_row().await];
    keel_testkit::bench::record(&rows);
}
