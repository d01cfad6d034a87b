//! P02 proofs for the outbox relay, against real Postgres (through pgbouncer) and a real
//! RabbitMQ vhost per test. Each test reads like the pattern's argument: committed events are
//! published with the conventional properties; rolled-back ones never; two relays at once lose
//! and reorder nothing; a broker outage only delays events.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`) and
//! belongs to the platform-only roles `platform_owner`/`platform_app`: no service is involved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_amqp::topology::{self, QueueSpec};
use keel_amqp::{AmqpConfig, Broker, RelayConfig};
use keel_events::Envelope;
use keel_pg::outbox::{self, NewEvent};
use keel_testkit::{FaultProxy, TestDb, TestVhost, eventually};
use lapin::options::BasicConsumeOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::PgPool;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 10,
        poll_interval: Duration::from_millis(20),
        publish_timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(300),
        backlog_interval: Duration::from_millis(100),
        concurrency: 1,
    }
}

fn broker(url: String, stop: &CancellationToken) -> Broker {
    Broker::spawn(
        AmqpConfig {
            url: url.into(),
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(200),
        },
        "keel-amqp-test",
        stop.clone(),
    )
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
        let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let spec = QueueSpec {
            name: "test.everything".into(),
            bindings: vec!["#".into()],
            delivery_limit: 5,
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

    let ids: Vec<String> = collector.all().iter().map(Received::message_id).collect();
    assert_eq!(ids, vec![kept[0].to_string()]);
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

    let all = collector.all();
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    let mut duplicates = 0;
    for m in &all {
        if !seen.insert(m.message_id()) {
            duplicates += 1;
            continue;
        }
        let e = m.envelope();
        order
            .entry(e.aggregate_id)
            .or_default()
            .push(e.data["n"].as_u64().unwrap());
    }
    assert_eq!(duplicates, 0, "no crash, no duplicate");
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
    let all = collector.wait_for(1 + N).await;
    eventually(WAIT, "backlog drained", || async {
        (unsent(&pool).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();

    let all_ids: Vec<String> = collector.all().iter().map(Received::message_id).collect();
    let distinct: HashSet<&String> = all_ids.iter().collect();
    assert_eq!(all_ids.len(), 1 + N, "exactly once: {}", all.len());
    assert_eq!(distinct.len(), 1 + N);
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
