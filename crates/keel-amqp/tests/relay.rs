//! P02 proofs for the outbox relay, against real Postgres (through pgbouncer) and a real
//! RabbitMQ vhost per test. Each test reads like the pattern's argument: committed events are
//! published with the conventional properties; rolled-back ones never; two relays, or two
//! batches in flight in one relay, lose and reorder nothing where a naive `SKIP LOCKED` claim
//! reorders; a broker outage only delays events, and a relay stopped during one returns at
//! once. Then the faults, each made to happen on purpose: a broker nack, a confirm that never
//! comes, a commit that fails after the confirm, a row too large to send (a row of exactly
//! the bound is sent); the unpublishable row is parked while the others flow.
//!
//! The relay is at-least-once by design: a test asserts that every event arrived (no loss)
//! and in order per aggregate by first arrival, never that it arrived exactly once. Exactly
//! one *effect* is asserted only where a consumer's inbox (P03) is in play.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`) and
//! belongs to the platform-only roles `platform_owner`/`platform_app`: no service is involved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_amqp::publisher::{Outgoing, Publisher};
use keel_amqp::topology::{self, QueueSpec};
use keel_amqp::{Broker, RelayConfig};
use keel_events::Envelope;
use keel_pg::outbox::{self, NewEvent, Pending};
use keel_testkit::{FaultProxy, TestDb, TestVhost, eventually};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::PgPool;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod support;
use support::broker;

const WAIT: Duration = Duration::from_secs(20);

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 10,
        poll_interval: Duration::from_millis(20),
        publish_timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(300),
        backlog_interval: Duration::from_millis(100),
        concurrency: 1,
        max_attempts: 10,
        max_message_bytes: keel_amqp::relay::DEFAULT_MAX_MESSAGE_BYTES,
    }
}

async fn pool(db: &TestDb) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.app_url())
        .await
        .unwrap()
}

/// Commits one transaction with `events` (aggregate id, event type, data) in order.
async fn commit(pool: &PgPool, events: &[(&str, &str, serde_json::Value)]) -> Vec<Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for (aggregate_id, event_type, data) in events {
        let id = outbox::insert(
            &mut tx,
            &NewEvent {
                aggregate_type: "order",
                aggregate_id,
                event_type,
                data: data.clone(),
            },
        )
        .await
        .unwrap();
        ids.push(id);
    }
    tx.commit().await.unwrap();
    ids
}

#[derive(Debug, Clone)]
struct Received {
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
}

impl Received {
    fn message_id(&self) -> String {
        self.properties.message_id().as_ref().unwrap().to_string()
    }
    fn envelope(&self) -> Envelope {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            other => panic!("header {name} is {other:?}"),
        }
    }
}

/// Everything published to `keel.events` in the vhost, in queue order, over a direct
/// connection (never through a test's fault proxy).
struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    _conn: Connection,
}

impl Collector {
    async fn start(vhost: &TestVhost) -> Self {
        Self::bound(vhost, &["#"]).await
    }

    /// Collects only what is routed by `patterns`.
    async fn bound(vhost: &TestVhost, patterns: &[&str]) -> Self {
        let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let spec = QueueSpec {
            name: "test.everything".into(),
            bindings: patterns.iter().map(|p| (*p).to_owned()).collect(),
            delivery_limit: 5,
            max_length: 10_000,
            retry_tiers: Vec::new(),
            dead_letter_max_length: 1000,
        };
        topology::declare_queue(&channel, &spec).await.unwrap();
        let mut consumer = channel
            .basic_consume(
                "test.everything".into(),
                "collector".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                sink.lock().unwrap().push(Received {
                    routing_key: d.routing_key.to_string(),
                    properties: d.properties.clone(),
                    body: d.data.clone(),
                });
            }
        });
        Self {
            received,
            _conn: conn,
        }
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(WAIT, &format!("{n} messages published"), || async {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }

    /// How many copies of event `id` arrived.
    fn copies(&self, id: Uuid) -> usize {
        let id = id.to_string();
        self.all().iter().filter(|m| m.message_id() == id).count()
    }

    /// Waits until every one of `ids` arrived at least once.
    async fn wait_for_ids(&self, ids: &[Uuid]) {
        eventually(WAIT, &format!("{} events published", ids.len()), || async {
            let seen: HashSet<String> = self.all().iter().map(Received::message_id).collect();
            ids.iter()
                .all(|id| seen.contains(&id.to_string()))
                .then_some(())
        })
        .await;
    }
}

/// Each aggregate's `data.n` values in order of *first* arrival: a redelivered copy (the
/// relay is at-least-once) says nothing about order, a first arrival out of turn does.
fn first_arrival_order(all: &[Received]) -> HashMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for m in all {
        if seen.insert(m.message_id()) {
            let e = m.envelope();
            order
                .entry(e.aggregate_id)
                .or_default()
                .push(e.data["n"].as_u64().unwrap());
        }
    }
    order
}

/// One outbox row as the relay left it.
#[derive(Debug, sqlx::FromRow)]
struct RowState {
    attempts: i32,
    last_error: Option<String>,
    parked: bool,
    sent: bool,
    sent_at: Option<chrono::DateTime<chrono::Utc>>,
}

async fn row(pool: &PgPool, id: Uuid) -> RowState {
    sqlx::query_as(
        "SELECT attempts, last_error, parked_at IS NOT NULL AS parked,
                sent_at IS NOT NULL AS sent, sent_at
           FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn unsent(pool: &PgPool) -> i64 {
    let mut conn = pool.acquire().await.unwrap();
    outbox::backlog(&mut conn).await.unwrap().unsent
}

fn is_valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        })
        && parts[1].chars().any(|c| c != '0')
        && parts[2].chars().any(|c| c != '0')
}

#[tokio::test]
async fn relay_publishes_committed_events_with_conventional_properties() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;

    let order = Uuid::new_v4().to_string();
    let ids = commit(
        &pool,
        &[
            (&order, "checkout.order.placed", serde_json::json!({"n": 0})),
            (
                &order,
                "checkout.order.confirmed",
                serde_json::json!({"n": 1}),
            ),
        ],
    )
    .await;
    // The first row carries its producer's trace context; the second has none.
    let producer_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    sqlx::query("UPDATE outbox SET traceparent = $1 WHERE id = $2")
        .bind(producer_trace)
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &stop),
        relay_config(),
        stop.clone(),
    );
    let got = collector.wait_for(2).await;

    let created: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, created_at FROM outbox ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (i, (m, ty)) in got
        .iter()
        .zip(["checkout.order.placed", "checkout.order.confirmed"])
        .enumerate()
    {
        assert_eq!(m.message_id(), ids[i].to_string(), "message_id = event id");
        assert_eq!(m.properties.kind().as_ref().unwrap().as_str(), ty, "type");
        assert_eq!(m.routing_key, ty, "routing key = event type");
        assert_eq!(
            m.properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*m.properties.delivery_mode(), Some(2), "persistent");
        let ts = m.properties.timestamp().expect("timestamp");
        assert_eq!(
            i64::try_from(ts).unwrap(),
            created[i].1.timestamp(),
            "timestamp = when the event was written (unix seconds)"
        );
        let envelope = m.envelope();
        assert_eq!(envelope.id, ids[i]);
        assert_eq!(envelope.event_type, ty);
        assert_eq!(envelope.aggregate_id, order);
    }
    assert_eq!(
        got[0].header("traceparent").as_deref(),
        Some(producer_trace)
    );
    let fresh = got[1]
        .header("traceparent")
        .expect("every message carries one");
    assert!(is_valid_traceparent(&fresh), "{fresh}");

    eventually(WAIT, "rows marked sent", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();
}

#[tokio::test]
async fn rolled_back_events_are_never_published() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &stop),
        relay_config(),
        stop.clone(),
    );

    // The state change fails after the event was written: both roll back together.
    let mut tx = pool.begin().await.unwrap();
    let phantom = outbox::insert(
        &mut tx,
        &NewEvent {
            aggregate_type: "order",
            aggregate_id: "rolled-back",
            event_type: "checkout.order.placed",
            data: serde_json::json!({}),
        },
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // A committed event afterwards: once it arrives, the relay has passed the phantom's place.
    let kept = commit(
        &pool,
        &[("committed", "checkout.order.placed", serde_json::json!({}))],
    )
    .await;

    collector.wait_for(1).await;
    eventually(WAIT, "backlog drained", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();

    // At least once: the committed event may arrive more than once; the phantom never.
    let ids: HashSet<String> = collector.all().iter().map(Received::message_id).collect();
    assert_eq!(ids, HashSet::from([kept[0].to_string()]));
    assert!(!ids.contains(&phantom.to_string()));
}

#[tokio::test]
async fn two_relays_publish_every_event_and_keep_per_aggregate_order() {
    const AGGREGATES: usize = 20;
    const EVENTS: usize = 5;
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;

    // Two relays, each with its own connection, as two service instances would have.
    let stop = CancellationToken::new();
    let config = RelayConfig {
        batch_size: 7,
        ..relay_config()
    };
    let relays = [
        keel_amqp::relay::spawn(
            pool.clone(),
            broker(vhost.url(), &stop),
            config.clone(),
            stop.clone(),
        ),
        keel_amqp::relay::spawn(
            pool.clone(),
            broker(vhost.url(), &stop),
            config.clone(),
            stop.clone(),
        ),
    ];

    // Writers commit while the relays run: each aggregate's events in its own transactions,
    // in order, all aggregates concurrently.
    let mut writers = tokio::task::JoinSet::new();
    for a in 0..AGGREGATES {
        let pool = pool.clone();
        writers.spawn(async move {
            let aggregate = format!("order-{a:02}");
            for n in 0..EVENTS {
                commit(
                    &pool,
                    &[(
                        &aggregate,
                        "checkout.order.placed",
                        serde_json::json!({ "n": n }),
                    )],
                )
                .await;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.unwrap();
    }

    let total = AGGREGATES * EVENTS;
    eventually(WAIT, "every event published", || async {
        let distinct: HashSet<String> = collector.all().iter().map(Received::message_id).collect();
        (distinct.len() == total).then_some(())
    })
    .await;
    eventually(WAIT, "backlog drained", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    for r in relays {
        r.await.unwrap();
    }

    // Every event arrived (at least once), and each aggregate's in order of first arrival.
    let order = first_arrival_order(&collector.all());
    assert_eq!(order.len(), AGGREGATES);
    for (aggregate, ns) in order {
        assert_eq!(ns, (0..EVENTS as u64).collect::<Vec<_>>(), "{aggregate}");
    }
}

#[tokio::test]
async fn events_accumulate_while_the_broker_is_unreachable_and_drain_after() {
    const N: usize = 25;
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;

    // The relay reaches RabbitMQ only through the proxy; the collector connects directly.
    let proxy = FaultProxy::to_amqp().await;
    let stop = CancellationToken::new();
    let broker = broker(proxy.proxied_url(&vhost.url()), &stop);
    let relay = keel_amqp::relay::spawn(pool.clone(), broker.clone(), relay_config(), stop.clone());

    let warmup = commit(
        &pool,
        &[("warmup", "checkout.order.placed", serde_json::json!({}))],
    )
    .await;
    collector.wait_for(1).await;

    // The broker becomes unreachable for the relay.
    proxy.cut();
    eventually(WAIT, "relay's broker connection lost", || async {
        (!broker.is_connected().await).then_some(())
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..N {
        let aggregate = format!("order-{}", i % 5);
        ids.extend(
            commit(
                &pool,
                &[(
                    &aggregate,
                    "checkout.order.placed",
                    serde_json::json!({"n": i}),
                )],
            )
            .await,
        );
    }
    // Let the relay keep failing for a while: wait for several reconnect attempts to be
    // refused after the events were committed.
    let refused = proxy.refused();
    eventually(WAIT, "reconnect attempts refused", || async {
        (proxy.refused() >= refused + 2).then_some(())
    })
    .await;
    assert_eq!(
        unsent(&pool).await,
        N as i64,
        "the events wait in the outbox"
    );
    assert_eq!(
        collector.all().len(),
        1,
        "nothing published during the outage"
    );

    proxy.restore();
    collector.wait_for(1 + N).await;
    eventually(WAIT, "backlog drained", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();

    // No loss: every committed event arrived at least once (copies are the relay's right).
    let all_ids: HashSet<String> = collector.all().iter().map(Received::message_id).collect();
    assert_eq!(all_ids.len(), 1 + N);
    assert!(all_ids.contains(&warmup[0].to_string()));
    for id in ids {
        assert!(all_ids.contains(&id.to_string()), "{id} published");
    }
}

/// Shutdown (P20 for relays): the runtime stops the relays *after* the consumers and job
/// workers, so that the relays publish what those stages committed on their way out. A relay
/// that ends at `stop` after its current batch leaves the rows committed during its last poll
/// interval in the outbox until the next start (here 5 s of them). Keel's relay, told to
/// stop, keeps claiming until a claim comes back empty, then returns.
#[tokio::test]
async fn rows_committed_just_before_stop_are_published_before_the_relay_returns() {
    const N: usize = 25;
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;

    // The broker outlives the relay, as in the runtime (it closes in a later stage).
    let broker_stop = CancellationToken::new();
    let stop = CancellationToken::new();
    let config = RelayConfig {
        poll_interval: Duration::from_secs(5),
        ..relay_config()
    };
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &broker_stop),
        config,
        stop.clone(),
    );
    // Once the warm-up event is marked sent, the relay's next claim finds nothing and it
    // waits out its poll interval: the rows below land in that wait.
    commit(
        &pool,
        &[("warmup", "checkout.order.placed", serde_json::json!({}))],
    )
    .await;
    collector.wait_for(1).await;
    eventually(WAIT, "warm-up marked sent", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;

    let mut ids = Vec::new();
    for i in 0..N {
        let aggregate = format!("order-{}", i % 5);
        ids.extend(
            commit(
                &pool,
                &[(
                    &aggregate,
                    "checkout.order.placed",
                    serde_json::json!({ "n": i }),
                )],
            )
            .await,
        );
    }
    // The stage stops the relay at once, well before its next poll.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), relay)
        .await
        .expect("the relay returns without waiting for another poll")
        .unwrap();

    assert_eq!(
        unsent(&pool).await,
        0,
        "every row committed before stop is marked sent when the relay returns"
    );
    let all = collector.wait_for(1 + N).await;
    let published: HashSet<String> = all.iter().map(Received::message_id).collect();
    for id in ids {
        assert!(published.contains(&id.to_string()), "{id} published");
    }
    broker_stop.cancel();
}

/// A broker connection for a test's own publisher, connected before it returns.
async fn connected_broker(url: String, stop: &CancellationToken) -> Broker {
    let broker = broker(url, stop);
    eventually(WAIT, "broker connected", || async {
        broker.is_connected().await.then_some(())
    })
    .await;
    broker
}

/// The claim a naive relay would write: the oldest unsent rows, `SKIP LOCKED`, and nothing
/// about aggregates.
async fn naive_claim(conn: &mut sqlx::PgConnection, limit: i64) -> Vec<Pending> {
    sqlx::query_as(
        "SELECT id, seq, event_type, payload, traceparent, created_at, attempts
           FROM outbox WHERE sent_at IS NULL
          ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Publishes `rows` and marks the confirmed ones sent on `tx`, then commits: one relay batch.
async fn publish_and_commit(
    publisher: &mut Publisher,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[Pending],
) {
    let batch: Vec<Outgoing> = rows
        .iter()
        .map(|r| Outgoing::from_outbox(r).unwrap())
        .collect();
    for result in publisher.publish_batch(&batch).await.unwrap() {
        result.unwrap();
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    outbox::mark_sent(&mut tx, &ids).await.unwrap();
    tx.commit().await.unwrap();
}

fn ns(rows: &[Pending]) -> Vec<u64> {
    rows.iter()
        .map(|r| r.payload["data"]["n"].as_u64().unwrap())
        .collect()
}

/// Two batches in flight at once (two relays, or `relay.concurrency = 2`), made deterministic:
/// the first claims, the second claims, the second's batch goes out first — nothing orders
/// two batches on two channels. A naive `SKIP LOCKED` claim hands the second batch the
/// aggregate's later events, and the broker receives them before the earlier ones. Keel's
/// claim hands the first batch only the aggregate's oldest event and the second nothing of it.
#[tokio::test]
async fn a_naive_skip_locked_claim_reorders_an_aggregate_across_two_batches_and_keels_claim_does_not()
 {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let stop = CancellationToken::new();
    let mut publisher = Publisher::new(
        connected_broker(vhost.url(), &stop).await,
        Duration::from_secs(5),
    );
    let events = |aggregate: &'static str| {
        (0..6)
            .map(move |n| {
                (
                    aggregate,
                    "checkout.order.placed",
                    serde_json::json!({ "n": n }),
                )
            })
            .collect::<Vec<_>>()
    };

    // Naive: the second batch takes events 3..6 while the first holds 0..3.
    commit(&pool, &events("naive")).await;
    let mut first = pool.begin().await.unwrap();
    let first_rows = naive_claim(&mut first, 3).await;
    let mut second = pool.begin().await.unwrap();
    let second_rows = naive_claim(&mut second, 3).await;
    assert_eq!(ns(&first_rows), [0, 1, 2]);
    assert_eq!(ns(&second_rows), [3, 4, 5]);
    publish_and_commit(&mut publisher, second, &second_rows).await;
    publish_and_commit(&mut publisher, first, &first_rows).await;
    let order = first_arrival_order(&collector.wait_for(6).await);
    assert_eq!(
        order["naive"],
        [3, 4, 5, 0, 1, 2],
        "the naive claim reorders the aggregate"
    );

    // Keel's claim under the same interleaving.
    commit(&pool, &events("keel")).await;
    let mut first = pool.begin().await.unwrap();
    let first_rows = outbox::claim(&mut first, 3).await.unwrap();
    let mut second = pool.begin().await.unwrap();
    let second_rows = outbox::claim(&mut second, 3).await.unwrap();
    assert_eq!(
        ns(&first_rows),
        [0],
        "only the aggregate's oldest unsent event"
    );
    assert!(
        second_rows.is_empty(),
        "nothing of an aggregate another batch holds"
    );
    publish_and_commit(&mut publisher, second, &second_rows).await;
    publish_and_commit(&mut publisher, first, &first_rows).await;
    stop.cancel();
}

/// `relay.concurrency = 2` (the services' setting): two batch loops in one relay, many events
/// over few aggregates, so both loops keep wanting the same aggregates. Every event arrives
/// and each aggregate's arrive in order.
#[tokio::test]
async fn relay_concurrency_two_keeps_per_aggregate_order_over_many_events() {
    const AGGREGATES: usize = 3;
    const EVENTS: usize = 60;
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &stop),
        RelayConfig {
            batch_size: 5,
            concurrency: 2,
            ..relay_config()
        },
        stop.clone(),
    );

    let mut writers = tokio::task::JoinSet::new();
    for a in 0..AGGREGATES {
        let pool = pool.clone();
        writers.spawn(async move {
            let aggregate = format!("order-{a}");
            // Some events alone, some several to a transaction: both kinds of batch boundary.
            let mut n = 0;
            while n < EVENTS {
                let take = 1 + n % 3;
                let batch: Vec<(&str, &str, serde_json::Value)> = (n..(n + take).min(EVENTS))
                    .map(|i| {
                        (
                            aggregate.as_str(),
                            "checkout.order.placed",
                            serde_json::json!({ "n": i }),
                        )
                    })
                    .collect();
                commit(&pool, &batch).await;
                n += take;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.unwrap();
    }
    let total = AGGREGATES * EVENTS;
    eventually(WAIT, "every event published", || async {
        let distinct: HashSet<String> = collector.all().iter().map(Received::message_id).collect();
        (distinct.len() == total).then_some(())
    })
    .await;
    eventually(WAIT, "backlog drained", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();

    let order = first_arrival_order(&collector.all());
    assert_eq!(order.len(), AGGREGATES);
    for (aggregate, ns) in order {
        assert_eq!(ns, (0..EVENTS as u64).collect::<Vec<_>>(), "{aggregate}");
    }
}

/// A quorum queue that refuses every message: `x-max-length = 0` with
/// `x-overflow = reject-publish`, so the broker nacks whatever is routed to it.
async fn declare_full_queue(channel: &lapin::Channel, name: &str, binding: &str) {
    topology::declare_exchanges(channel).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.into(),
            topology::EXCHANGE.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Commits one event per aggregate `prefix-0 .. prefix-(n-1)`; their ids.
async fn commit_spread(pool: &PgPool, prefix: &str, n: usize) -> Vec<Uuid> {
    let aggregates: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let events: Vec<(&str, &str, serde_json::Value)> = aggregates
        .iter()
        .map(|a| {
            (
                a.as_str(),
                "checkout.order.placed",
                serde_json::json!({ "n": 0 }),
            )
        })
        .collect();
    commit(pool, &events).await
}

/// P02 under a broker that says no. The failure first: a publish routed to a full queue with
/// `reject-publish` is nacked (a real `basic.nack`, not a simulated one). A naive relay retries
/// such a row forever. Keel's counts each refusal, backs the row off on its own, parks it
/// after `relay.max_attempts` with the reason, and keeps publishing every other aggregate at
/// full speed. The later row of the parked row's own aggregate waits behind it (publishing it
/// would break that aggregate's order); once an operator has fixed the cause and returned the
/// row, both go out, in order.
#[tokio::test]
async fn a_row_the_broker_keeps_nacking_is_parked_while_other_aggregates_keep_flowing() {
    const MAX_ATTEMPTS: u32 = 3;
    const BURST: usize = 500;
    let metrics = keel_telemetry::metrics_handle();
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    // Collects the journey's events only; `fixture.*` goes to the full queue alone.
    let collector = Collector::bound(&vhost, &["checkout.#"]).await;
    let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_full_queue(&channel, "test.full", "fixture.#").await;

    // The failure: the broker refuses what is routed to the full queue. A quorum queue's
    // limit is soft: the message that takes it over is accepted, the ones after are nacked.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for _ in 0..5 {
        let confirm = channel
            .basic_publish(
                topology::EXCHANGE.into(),
                "fixture.order.refused".into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        confirms.push(confirm);
        if confirms.last().is_some_and(lapin::Confirmation::is_nack) {
            break;
        }
    }
    assert!(
        confirms.last().is_some_and(lapin::Confirmation::is_nack),
        "the broker nacks: {confirms:?}"
    );

    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &stop),
        RelayConfig {
            max_attempts: MAX_ATTEMPTS,
            ..relay_config()
        },
        stop.clone(),
    );

    // Throughput of a burst over many aggregates with nothing refused, for comparison.
    let started = Instant::now();
    let baseline = commit_spread(&pool, "before", BURST).await;
    collector.wait_for_ids(&baseline).await;
    let baseline_rate = BURST as f64 / started.elapsed().as_secs_f64();

    // The poison row, a later row of its aggregate, and rows of other aggregates.
    let poison = commit(
        &pool,
        &[(
            "stuck",
            "fixture.order.refused",
            serde_json::json!({ "n": 0 }),
        )],
    )
    .await[0];
    let behind = commit(
        &pool,
        &[(
            "stuck",
            "checkout.order.placed",
            serde_json::json!({ "n": 1 }),
        )],
    )
    .await[0];
    let parking = Instant::now();
    let others = commit_spread(&pool, "other", 20).await;
    collector.wait_for_ids(&others).await;

    let parked = eventually(WAIT, "the refused row parked", || async {
        let r = row(&pool, poison).await;
        r.parked.then_some(r)
    })
    .await;
    let time_to_park = parking.elapsed();
    assert_eq!(
        parked.attempts, MAX_ATTEMPTS as i32,
        "parked after N refusals"
    );
    assert!(!parked.sent);
    assert_eq!(
        parked.last_error.as_deref(),
        Some("broker nacked the message"),
        "the reason is kept"
    );

    // Every other aggregate keeps flowing while the row is parked: a second burst.
    let started = Instant::now();
    let burst = commit_spread(&pool, "after", BURST).await;
    collector.wait_for_ids(&burst).await;
    let parked_rate = BURST as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "parked after {MAX_ATTEMPTS} refusals in {time_to_park:?}; other aggregates: \
         {baseline_rate:.0} events/s before, {parked_rate:.0} events/s with a row parked"
    );

    // The row behind it, in the same aggregate, waits: unsent, untried, not parked itself.
    eventually(
        WAIT,
        "only the parked row and the one behind it unsent",
        || async {
            let mut c = pool.acquire().await.unwrap();
            let b = outbox::backlog(&mut c).await.unwrap();
            (b.unsent == 1 && b.parked == 1).then_some(())
        },
    )
    .await;
    let waiting = row(&pool, behind).await;
    assert!(
        !waiting.sent && !waiting.parked && waiting.attempts == 0,
        "{waiting:?}"
    );
    assert_eq!(collector.copies(behind), 0, "never published out of order");

    // Counted by the metrics: the counter at once, the gauge at the next backlog refresh;
    // every refusal counts as a publish failure.
    eventually(WAIT, "parked row in the metrics", || async {
        let text = metrics.render();
        (text.contains("outbox_parked_total 1") && text.contains("outbox_parked_rows 1"))
            .then_some(())
    })
    .await;
    let failures: f64 = metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("outbox_publish_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        failures >= f64::from(MAX_ATTEMPTS),
        "{failures} publish failures counted for {MAX_ATTEMPTS} refusals"
    );

    // The operator fixes the cause (the full queue goes) and returns the row to the relay.
    channel
        .queue_delete("test.full".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let mut c = pool.acquire().await.unwrap();
    assert!(outbox::unpark(&mut c, poison).await.unwrap());
    assert!(!outbox::unpark(&mut c, poison).await.unwrap(), "once");
    drop(c);
    collector.wait_for_ids(&[behind]).await;
    let (poison, behind) = (row(&pool, poison).await, row(&pool, behind).await);
    assert!(poison.sent && behind.sent);
    assert!(
        poison.sent_at < behind.sent_at,
        "the aggregate's order is kept through the parking: {poison:?} {behind:?}"
    );
    stop.cancel();
    relay.await.unwrap();
}

/// A row larger than `relay.max_message_bytes` is never sent: it is parked at once (its size
/// will not change by retrying) with the reason, and the rows of other aggregates go out. The
/// bound is inclusive: a message of exactly `max_message_bytes` is sent.
#[tokio::test]
async fn a_row_above_max_message_bytes_is_parked_as_too_large_without_being_published() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let edge = commit(
        &pool,
        &[(
            "edge",
            "checkout.order.placed",
            serde_json::json!({ "n": 0, "notes": "x".repeat(1024) }),
        )],
    )
    .await[0];
    // The bound is the edge row's message body, measured as the relay encodes it.
    let max = {
        let mut tx = pool.begin().await.unwrap();
        let rows = outbox::claim(&mut tx, 10).await.unwrap();
        let body = Outgoing::from_outbox(&rows[0]).unwrap().body;
        tx.rollback().await.unwrap();
        body.len()
    };
    let big = commit(
        &pool,
        &[(
            "big",
            "checkout.order.placed",
            serde_json::json!({ "n": 0, "notes": "x".repeat(2048) }),
        )],
    )
    .await[0];
    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(vhost.url(), &stop),
        RelayConfig {
            max_message_bytes: u32::try_from(max).unwrap(),
            ..relay_config()
        },
        stop.clone(),
    );
    let small = commit(
        &pool,
        &[(
            "small",
            "checkout.order.placed",
            serde_json::json!({ "n": 0 }),
        )],
    )
    .await;
    collector.wait_for_ids(&small).await;
    collector.wait_for_ids(&[edge]).await;
    let parked = eventually(WAIT, "the large row parked", || async {
        let r = row(&pool, big).await;
        r.parked.then_some(r)
    })
    .await;
    assert_eq!(parked.attempts, 1, "parked at the first refusal");
    let reason = parked.last_error.unwrap();
    assert!(
        reason.starts_with("too large") && reason.contains(&format!("is {max}")),
        "{reason}"
    );
    eventually(WAIT, "the backlog is the parked row alone", || async {
        let mut c = pool.acquire().await.unwrap();
        let b = outbox::backlog(&mut c).await.unwrap();
        (b.unsent == 0 && b.parked == 1).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();
    assert_eq!(collector.copies(big), 0, "never sent to the broker");
}

/// A confirm that never comes. The relay reaches RabbitMQ through a fault proxy that then
/// holds every byte for seconds: the publish leaves, no confirm returns. The failure first: a
/// publisher that awaits its confirm without a deadline is still waiting long after the
/// relay's deadline (and would wait as long as the stall lasts). Keel's relay gives up at
/// `relay.publish_timeout`, notes why on the row, backs off and retries it; a timeout is the
/// path's failure, not the row's, so it never counts towards parking (here
/// `max_attempts = 1`: one counted refusal would park it). When the link recovers the row is
/// published (possibly twice: the first copy may reach the broker late).
#[tokio::test]
async fn a_confirm_that_never_comes_times_out_and_the_row_is_retried_not_parked() {
    const CONFIRM_TIMEOUT: Duration = Duration::from_millis(500);
    const STALL: Duration = Duration::from_secs(3);
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let proxy = FaultProxy::to_amqp().await;
    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        pool.clone(),
        broker(proxy.proxied_url(&vhost.url()), &stop),
        RelayConfig {
            publish_timeout: CONFIRM_TIMEOUT,
            max_attempts: 1,
            ..relay_config()
        },
        stop.clone(),
    );
    let warmup = commit(
        &pool,
        &[("warmup", "checkout.order.placed", serde_json::json!({}))],
    )
    .await;
    collector.wait_for_ids(&warmup).await;
    let naive = Connection::connect(
        &proxy.proxied_url(&vhost.url()),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let naive = naive.create_channel().await.unwrap();
    naive
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // The stall: from now on every byte through the proxy waits STALL, both ways.
    proxy.set_latency(STALL);

    // The failure: without a deadline the confirm does not come within three of the relay's.
    let confirm = naive
        .basic_publish(
            topology::EXCHANGE.into(),
            "test.naive.published".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_message_id(Uuid::new_v4().to_string().into()),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(3 * CONFIRM_TIMEOUT, confirm)
            .await
            .is_err(),
        "a confirm-awaiting publisher without a deadline is still waiting"
    );

    let started = Instant::now();
    let id = commit(
        &pool,
        &[("late", "checkout.order.placed", serde_json::json!({}))],
    )
    .await[0];
    let timed_out = eventually(WAIT, "the missing confirm noticed", || async {
        let r = row(&pool, id).await;
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("confirm timed out"))
            .then_some(r)
    })
    .await;
    let detected = started.elapsed();
    assert!(
        detected < 2 * STALL,
        "noticed at the relay's deadline, not when a late confirm could come back: {detected:?}"
    );
    assert!(!timed_out.sent, "never marked sent without a confirm");
    assert!(
        !timed_out.parked,
        "a timeout is not the row's fault: not parked"
    );
    assert_eq!(timed_out.attempts, 0, "nor counted towards parking");

    // The link recovers: the row is retried and published.
    proxy.set_latency(Duration::ZERO);
    eventually(WAIT, "the row marked sent after a retry", || async {
        row(&pool, id).await.sent.then_some(())
    })
    .await;
    collector.wait_for_ids(&[id]).await;
    eprintln!(
        "missing confirm detected {detected:?} after commit (publish_timeout {CONFIRM_TIMEOUT:?}); \
         {} cop(ies) delivered",
        collector.copies(id)
    );
    stop.cancel();
    relay.await.unwrap();
}

/// At-least-once, made to happen: the relay's database connection goes through a fault proxy
/// that is slowed, so the relay is still between the broker's confirm and its COMMIT when
/// the event reaches the broker; the test cuts the connection there. The row stays unsent
/// (nothing lost), the relay publishes it again once the database is back, and the broker
/// delivers the event twice. A naive consumer applies both copies; Keel's consumer, with the
/// inbox (P03) in the effect's transaction, applies it once.
#[tokio::test]
async fn a_commit_that_fails_after_the_confirm_republishes_and_the_inbox_applies_it_once() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let pool = pool(&db).await;
    let collector = Collector::start(&vhost).await;
    let proxy = FaultProxy::to_pgbouncer().await;
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&proxy.proxied_url(&db.app_url()))
        .unwrap();
    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(
        relay_pool,
        broker(vhost.url(), &stop),
        relay_config(),
        stop.clone(),
    );
    let warmup = commit(
        &pool,
        &[("warmup", "checkout.order.placed", serde_json::json!({}))],
    )
    .await;
    collector.wait_for_ids(&warmup).await;

    // Every round trip of the relay to the database now takes a second: between the confirm
    // and the COMMIT there are two of them (mark_sent, then COMMIT itself).
    proxy.set_latency(Duration::from_millis(500));
    let id = commit(
        &pool,
        &[("order-1", "checkout.order.placed", serde_json::json!({}))],
    )
    .await[0];
    collector.wait_for_ids(&[id]).await;
    // The broker has the event; the relay has not committed. The database goes away.
    proxy.cut();
    assert!(
        !row(&pool, id).await.sent,
        "the failed commit left the row unsent"
    );

    proxy.set_latency(Duration::ZERO);
    proxy.restore();
    eventually(WAIT, "the row published again and marked sent", || async {
        row(&pool, id).await.sent.then_some(())
    })
    .await;
    let copies = eventually(WAIT, "the second copy delivered", || async {
        let n = collector.copies(id);
        (n >= 2).then_some(n)
    })
    .await;
    stop.cancel();
    relay.await.unwrap();

    // Each copy delivered, to a naive consumer and to one with the inbox. The effect is a job
    // the consumer enqueues (what notification does with an event).
    let deliveries: Vec<Received> = collector
        .all()
        .into_iter()
        .filter(|m| m.message_id() == id.to_string())
        .collect();
    for m in &deliveries {
        let mut tx = pool.begin().await.unwrap();
        effect(&mut tx, "naive-effects").await;
        tx.commit().await.unwrap();

        let mut tx = pool.begin().await.unwrap();
        if keel_pg::inbox::try_record(&mut tx, "test-consumer", &m.message_id())
            .await
            .unwrap()
        {
            effect(&mut tx, "inbox-effects").await;
        }
        tx.commit().await.unwrap();
    }
    let effects = |queue: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE queue = $1")
                .bind(queue)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    eprintln!("{copies} copies delivered after the failed commit");
    assert_eq!(
        effects("naive-effects").await,
        copies as i64,
        "without an inbox every copy is applied"
    );
    assert_eq!(
        effects("inbox-effects").await,
        1,
        "with the inbox, one effect"
    );
}

async fn effect(conn: &mut sqlx::PgConnection, queue: &str) {
    keel_pg::jobs::enqueue(
        conn,
        &keel_pg::jobs::NewJob {
            queue,
            payload: serde_json::json!({}),
            max_attempts: 1,
            delay: Duration::ZERO,
            id: None,
        },
    )
    .await
    .unwrap();
}

/// Stopping while the broker cannot be reached: the final drain tries once, fails and the
/// relay returns at once, leaving the rows in the outbox for the next start. Backing off and
/// trying again on the way out would keep the process from stopping for as long as the
/// broker is down (the stop has fired, so each pause ends at once: a hot loop).
#[tokio::test]
async fn a_relay_stopped_while_the_broker_is_unreachable_returns_at_once_and_keeps_the_rows() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    // Port 1 refuses at once: no broker there.
    let broker_stop = CancellationToken::new();
    let broker = broker("amqp://guest:guest@127.0.0.1:1/%2f".into(), &broker_stop);
    commit(&pool, &[("o-1", "order.placed", serde_json::json!({}))]).await;

    let stop = CancellationToken::new();
    let relay = keel_amqp::relay::spawn(pool.clone(), broker, relay_config(), stop.clone());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .expect("the relay returns promptly although the broker is down")
        .unwrap();
    assert_eq!(unsent(&pool).await, 1, "the row waits for the next start");
    broker_stop.cancel();
}
