//! `make bench`'s messaging rows (P01, P03, P05):
//! - `consumer_vs_bare_lapin` (goal >= 0.9): keel-amqp's consumer with a no-op handler (acks
//!   every message; tiers, DLQ, metrics, panic guard all in place) against a bare lapin consumer
//!   that acks every delivery, same prefetch, draining the same pre-filled quorum queue;
//! - `publisher_vs_bare_lapin` (goal >= 0.9): `Publisher::publish_batch` (mandatory, confirms,
//!   the conventional properties) against bare lapin confirmed publishing with the same
//!   pipelining (a batch sent, then its confirms awaited);
//! - `notification_end_to_end` (reported): notification's real handler (inbox row + customer
//!   notification + outbox event in one transaction, through pgbouncer) behind the consumer,
//!   messages/s from a pre-filled queue.
//!
//! Paired rounds (Keel, then the baseline, back to back) so a slow phase of the shared machine
//! hits both alike; the ratio is the median of the per-round ratios.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_amqp::publisher::{Outgoing, Publisher};
use keel_amqp::topology::{self, QueueSpec};
use keel_amqp::{ConsumerConfig, Incoming, Outcome};
use keel_testkit::bench::{Durability, ProductionDurability, Row, paired_ratio_row, round};
use keel_testkit::{TestDb, TestVhost, eventually};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3;
const MESSAGES: usize = 10_000;
const BATCH: usize = 100;
const PREFETCH: u16 = 32;
const QUEUE: &str = "bench.events";
const E2E_MESSAGES: usize = 2_000;

fn consumer_config(queue: &str) -> ConsumerConfig {
    ConsumerConfig {
        queue: queue.into(),
        prefetch: PREFETCH,
        concurrency: 8,
        delivery_limit: 20,
        max_length: 1_000_000,
        retry_tiers: vec![Duration::from_secs(1)],
        dead_letter_max_length: 1000,
        retry_max_backoff: Duration::from_secs(1),
        depth_interval: Duration::from_secs(5),
    }
}

fn spec(queue: &str) -> QueueSpec {
    consumer_config(queue).queue_spec(&["bench.#"])
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap()
}

/// Publishes `n` messages to `keel.events` with `routing_key`, confirmed, in batches.
async fn fill(conn: &Connection, n: usize, routing_key: &str, body: impl Fn(usize) -> Vec<u8>) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for start in (0..n).step_by(BATCH) {
        let mut confirms = Vec::with_capacity(BATCH);
        for i in start..(start + BATCH).min(n) {
            let id = uuid::Uuid::new_v4().to_string();
            confirms.push(
                ch.basic_publish(
                    keel_events::EXCHANGE.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &body(i),
                    BasicProperties::default()
                        .with_message_id(id.into())
                        .with_type(routing_key.into())
                        .with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    let _ = ch.close(200, "filled".into()).await;
}

async fn ready(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;
    q.message_count()
}

/// Bare lapin: one consumer, same prefetch, ack each delivery as it arrives.
async fn bare_consume(conn: &Connection, n: usize) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let d = consumer.next().await.unwrap().unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    rate
}

async fn keel_broker(url: &str, stop: &CancellationToken) -> keel_amqp::Broker {
    let broker = keel_amqp::Broker::spawn(
        keel_amqp::AmqpConfig {
            url: url.to_owned().into(),
            connect_timeout: Duration::from_secs(3),
            max_backoff: Duration::from_secs(1),
        },
        "bench",
        stop.clone(),
    );
    eventually(Duration::from_secs(10), "broker connected", || async {
        broker.is_connected().await.then_some(())
    })
    .await;
    broker
}

/// keel-amqp's consumer with a no-op handler, until `n` messages are acked.
async fn keel_consume(url: &str, n: usize) -> f64 {
    let stop = CancellationToken::new();
    let broker = keel_broker(url, &stop).await;
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let started = Instant::now();
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        consumer_config(QUEUE),
        &["bench.#"],
        move |_msg: Incoming| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Outcome::Ack }
        },
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while done.load(Ordering::Relaxed) < n {
        tick.tick().await;
        assert!(Instant::now() < deadline, "consumer too slow");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
    rate
}

async fn consumer_row(url: &str) -> Row {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.unwrap();
    topology::declare_queue(&ch, &spec(QUEUE)).await.unwrap();
    let (mut keel, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        fill(&conn, MESSAGES, "bench.item.created", |_| b"{}".to_vec()).await;
        keel.push(keel_consume(url, MESSAGES).await);
        fill(&conn, MESSAGES, "bench.item.created", |_| b"{}".to_vec()).await;
        bare.push(bare_consume(&conn, MESSAGES).await);
        // Acks are asynchronous: start the next round on an empty queue.
        eventually(Duration::from_secs(30), "queue drained", || async {
            (ready(&conn, QUEUE).await == 0).then_some(())
        })
        .await;
    }
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    paired_ratio_row("consumer_vs_bare_lapin", "msgs/s", &keel, &bare, Some(0.9))
}

fn outgoing(i: usize) -> Outgoing {
    Outgoing {
        id: uuid::Uuid::new_v4(),
        event_type: "bench.item.created".into(),
        body: format!("{{\"n\":{i}}}").into_bytes(),
        traceparent: None,
        timestamp: 1_700_000_000,
    }
}

/// keel-amqp's publisher: `publish_batch` per batch (mandatory, confirms).
async fn keel_publish(url: &str) -> f64 {
    let stop = CancellationToken::new();
    let broker = keel_broker(url, &stop).await;
    let mut publisher = Publisher::new(broker.clone(), Duration::from_secs(30));
    let batches: Vec<Vec<Outgoing>> = (0..MESSAGES)
        .step_by(BATCH)
        .map(|s| (s..s + BATCH).map(outgoing).collect())
        .collect();
    publisher.ready().await.unwrap();
    let started = Instant::now();
    for batch in &batches {
        let results = publisher.publish_batch(batch).await.unwrap();
        assert!(results.iter().all(Result::is_ok));
    }
    let rate = MESSAGES as f64 / started.elapsed().as_secs_f64();
    publisher.discard().await;
    broker.close().await;
    rate
}

/// Bare lapin with the same pipelining: a batch sent, then its confirms awaited; the same
/// properties (id, type, timestamp, content type, persistent, traceparent), mandatory too.
async fn bare_publish(conn: &Connection) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let messages: Vec<Outgoing> = (0..MESSAGES).map(outgoing).collect();
    let started = Instant::now();
    for chunk in messages.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(keel_amqp::publisher::fresh_traceparent().into()),
            );
            confirms.push(
                ch.basic_publish(
                    keel_events::EXCHANGE.into(),
                    m.event_type.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &m.body,
                    BasicProperties::default()
                        .with_message_id(m.id.to_string().into())
                        .with_type(m.event_type.as_str().into())
                        .with_timestamp(m.timestamp)
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    let rate = MESSAGES as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    rate
}

async fn publisher_row(url: &str) -> Row {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.unwrap();
    topology::declare_queue(&ch, &spec(QUEUE)).await.unwrap();
    let (mut keel, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        keel.push(keel_publish(url).await);
        ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        bare.push(bare_publish(&conn).await);
        ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    paired_ratio_row("publisher_vs_bare_lapin", "msgs/s", &keel, &bare, Some(0.9))
}

fn final_order_event(_: usize) -> Vec<u8> {
    let order = uuid::Uuid::new_v4();
    serde_json::to_vec(&json!({
        "id": uuid::Uuid::now_v7(),
        "type": "checkout.order.confirmed",
        "schema_version": 1,
        "aggregate_id": order.to_string(),
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {
            "order_id": order,
            "customer_id": "cust-bench",
            "state": "CONFIRMED",
            "total_minor": 4200,
            "currency": "EUR",
            "reason": null,
        }
    }))
    .unwrap()
}

/// notification's handler behind the consumer as notification configures it, draining
/// `E2E_MESSAGES` final order events.
async fn notification_row(vhost: &TestVhost) -> (Row, Durability) {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let durability = Durability::require(&db.app_url()).await;
    let config: notification::Config = keel_testkit::config(
        notification::DEFAULT_CONFIG,
        &[
            ("KEEL_DATABASE__URL", &db.app_url()),
            ("KEEL_AMQP__URL", &vhost.url()),
        ],
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .connect(&db.app_url())
        .await
        .unwrap();
    let conn = connect(&vhost.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = config
        .consumer
        .queue_spec(&notification::journey_events::BINDINGS);
    topology::declare_queue(&ch, &queue).await.unwrap();
    fill(
        &conn,
        E2E_MESSAGES,
        "checkout.order.confirmed",
        final_order_event,
    )
    .await;

    let stop = CancellationToken::new();
    let broker = keel_broker(&vhost.url(), &stop).await;
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let started = Instant::now();
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        config.consumer.clone(),
        &notification::journey_events::BINDINGS,
        move |msg: Incoming| {
            let (pool, counter) = (pool.clone(), counter.clone());
            async move {
                let outcome = notification::journey_events::handle(pool, msg).await;
                if outcome == Outcome::Ack {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                outcome
            }
        },
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while done.load(Ordering::Relaxed) < E2E_MESSAGES {
        tick.tick().await;
        assert!(Instant::now() < deadline, "notification too slow");
    }
    let rate = E2E_MESSAGES as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
    println!(
        "notification_end_to_end: {E2E_MESSAGES} final order events, prefetch {}, concurrency {}, pool {}",
        config.consumer.prefetch, config.consumer.concurrency, config.database.max_connections
    );
    (
        Row::reported("notification_end_to_end", "msgs/s", round(rate, 0)),
        durability,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _durable = ProductionDurability::ensure().await;
    let vhost = TestVhost::create().await;
    let mut rows = vec![
        consumer_row(&vhost.url()).await,
        publisher_row(&vhost.url()).await,
    ];
    let e2e_vhost = TestVhost::create().await;
    let (row, durability) = notification_row(&e2e_vhost).await;
    rows.push(row);
    keel_testkit::bench::record(&rows, &durability);
}
