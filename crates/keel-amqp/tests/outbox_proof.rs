//! P02, failure first: the dual write an outbox replaces, and the outbox under the same
//! conditions, against real Postgres (through pgbouncer) and a RabbitMQ vhost per test.
//!
//! The state change is an order row in a small table of the test's own (`proof_orders`, with
//! a `CHECK` a later step of the transaction can violate); its event is
//! `checkout.order.placed`. Each order goes one of three ways ([`Path`]):
//! - *commit, then publish* (naive): when the broker dies mid-stream, the events of orders
//!   already committed are lost, and nothing will ever publish them;
//! - *publish, then commit* (naive): when the transaction fails after the publish, the event
//!   announces an order that does not exist;
//! - *the outbox* (Keel): the event is a row written in the order's transaction
//!   (`keel_pg::outbox::insert`) and `keel_amqp::relay` publishes committed rows; under the
//!   same two conditions every committed order's event is published once the broker is back
//!   and the relay has restarted, and a rolled-back order's never.
//!
//! Delivery is at-least-once: the proofs count distinct events, never "exactly one copy".
//! A collector reads everything published to `keel.events` over a direct connection; the
//! code under test reaches RabbitMQ only through a `FaultProxy`.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`) and
//! belongs to the platform-only roles `platform_owner`/`platform_app`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_amqp::publisher::{Outgoing, Publisher};
use keel_amqp::topology::{self, QueueSpec};
use keel_amqp::{AmqpConfig, Broker, RelayConfig};
use keel_events::Envelope;
use keel_pg::outbox::{self, NewEvent};
use keel_testkit::{FaultProxy, TestDb, TestVhost, eventually};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const EVENT_TYPE: &str = "checkout.order.placed";
/// Every order's total; a discount above it violates the table's CHECK.
const TOTAL: i64 = 1000;
/// How long the broker's confirms may take, for the relay and for the naive writer alike.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How an order and its event are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The anti-pattern, for the proof only: commit the order, then publish its event (with
    /// publisher confirms: Keel's own `Publisher`, so only the outbox differs).
    CommitThenPublish,
    /// The anti-pattern, for the proof only: publish the event, then commit the order.
    PublishThenCommit,
    /// Keel: `outbox::insert` in the order's transaction; `relay` publishes.
    Outbox,
}

/// The test's state table: a stand-in for a service's orders.
async fn create_orders_table(db: &TestDb) {
    let mut admin = PgConnection::connect(&db.admin_url()).await.unwrap();
    for sql in [
        "CREATE TABLE proof_orders (
             id uuid PRIMARY KEY,
             total_minor bigint NOT NULL CHECK (total_minor >= 0))",
        "GRANT SELECT, INSERT, UPDATE ON proof_orders TO platform_app",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let _ = admin.close().await;
}

async fn app_pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.app_url())
        .await
        .unwrap()
}

fn amqp(url: String) -> AmqpConfig {
    serde_json::from_value(json!({
        "url": url,
        "connect_timeout": "2s",
        "max_backoff": "200ms",
    }))
    .unwrap()
}

fn relay_config() -> RelayConfig {
    serde_json::from_value(json!({
        "batch_size": 10,
        "poll_interval": "20ms",
        "publish_timeout": "5s",
        "max_backoff": "300ms",
        "backlog_interval": "100ms",
    }))
    .unwrap()
}

/// What placing one order did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// The order committed (its event published, or in the outbox).
    Committed,
    /// The order committed and its publish failed afterwards: the naive writer knows, and
    /// has nowhere durable to keep the event.
    CommittedPublishFailed,
    /// The transaction failed and rolled back.
    RolledBack,
}

/// One "process": a pool, a broker connection through the proxy, and either the relay or the
/// naive writer's publisher. Dropping the value (after [`Process::die`]) is the crash.
struct Process {
    path: Path,
    pool: PgPool,
    stop: CancellationToken,
    publisher: Option<Publisher>,
    relay: Option<JoinHandle<()>>,
}

impl Process {
    async fn start(path: Path, db: &TestDb, amqp_url: &str) -> Self {
        let pool = app_pool(db).await;
        let stop = CancellationToken::new();
        let broker = Broker::spawn(amqp(amqp_url.to_owned()), "outbox-proof", stop.clone());
        eventually(WAIT, "connected to the broker", || async {
            broker.is_connected().await.then_some(())
        })
        .await;
        let (publisher, relay) = match path {
            Path::Outbox => (
                None,
                Some(keel_amqp::relay::spawn(
                    pool.clone(),
                    broker,
                    relay_config(),
                    stop.clone(),
                )),
            ),
            Path::CommitThenPublish | Path::PublishThenCommit => {
                (Some(Publisher::new(broker, CONFIRM_TIMEOUT)), None)
            }
        };
        Self {
            path,
            pool,
            stop,
            publisher,
            relay,
        }
    }

    /// Places order `id` with `discount` off its total (more than the total fails the
    /// transaction after the event was written or sent).
    async fn place(&mut self, id: Uuid, discount: i64) -> Placed {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO proof_orders (id, total_minor) VALUES ($1, $2)")
            .bind(id)
            .bind(TOTAL)
            .execute(&mut *tx)
            .await
            .unwrap();
        match self.path {
            Path::Outbox => {
                outbox::insert(
                    &mut tx,
                    &NewEvent {
                        aggregate_type: "order",
                        aggregate_id: &id.to_string(),
                        event_type: EVENT_TYPE,
                        data: json!({ "order_id": id }),
                    },
                )
                .await
                .unwrap();
            }
            Path::PublishThenCommit => {
                // The broker confirms it before the transaction knows whether it will commit.
                assert!(self.publish(id).await, "the broker is up in this scenario");
            }
            Path::CommitThenPublish => {}
        }
        if apply_discount(&mut tx, id, discount).await.is_err() {
            tx.rollback().await.unwrap();
            return Placed::RolledBack;
        }
        tx.commit().await.unwrap();
        if self.path == Path::CommitThenPublish && !self.publish(id).await {
            return Placed::CommittedPublishFailed;
        }
        Placed::Committed
    }

    /// Publishes order `id`'s event with confirms; `true` once the broker confirmed it.
    async fn publish(&mut self, id: Uuid) -> bool {
        let envelope = Envelope {
            id: Uuid::now_v7(),
            event_type: EVENT_TYPE.to_owned(),
            schema_version: keel_events::SCHEMA_VERSION,
            aggregate_id: id.to_string(),
            occurred_at: chrono::Utc::now(),
            data: json!({ "order_id": id }),
        };
        let message = Outgoing {
            id: envelope.id,
            event_type: EVENT_TYPE.to_owned(),
            body: serde_json::to_vec(&envelope).unwrap(),
            traceparent: None,
            timestamp: u64::try_from(envelope.occurred_at.timestamp()).unwrap(),
        };
        let publisher = self.publisher.as_mut().expect("a naive writer");
        matches!(
            publisher.publish_batch(&[message]).await.as_deref(),
            Ok([Ok(())])
        )
    }

    /// The process dies: its tasks stop wherever they are, its connections close, and
    /// whatever it kept in memory is gone.
    async fn die(self) {
        if let Some(relay) = &self.relay {
            relay.abort();
        }
        self.stop.cancel();
        self.pool.close().await;
    }
}

/// A later step of the order's transaction: fails the `CHECK` when `discount` > the total.
async fn apply_discount(
    conn: &mut PgConnection,
    id: Uuid,
    discount: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE proof_orders SET total_minor = total_minor - $2 WHERE id = $1")
        .bind(id)
        .bind(discount)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Everything published to `keel.events` in the vhost: the orders its events are about, over
/// a direct connection (never through the proxy).
struct Collector {
    orders: Arc<Mutex<Vec<String>>>,
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
            max_length: 100_000,
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
        let orders = Arc::new(Mutex::new(Vec::new()));
        let sink = orders.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let envelope: Envelope = serde_json::from_slice(&d.data).unwrap();
                sink.lock().unwrap().push(envelope.aggregate_id);
            }
        });
        Self {
            orders,
            _conn: conn,
        }
    }

    /// The distinct orders an event was published for (a redelivered copy counts once).
    fn orders(&self) -> BTreeSet<String> {
        self.orders.lock().unwrap().iter().cloned().collect()
    }

    async fn wait_for(&self, order: Uuid) {
        let order = order.to_string();
        eventually(
            WAIT,
            &format!("order {order}'s event published"),
            || async { self.orders().contains(&order).then_some(()) },
        )
        .await;
    }
}

async fn committed_orders(db: &TestDb) -> BTreeSet<String> {
    let mut admin = PgConnection::connect(&db.admin_url()).await.unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM proof_orders")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    ids.iter().map(Uuid::to_string).collect()
}

async fn unsent(db: &TestDb) -> i64 {
    let mut admin = PgConnection::connect(&db.admin_url()).await.unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    n
}

/// Whether the relay has claimed rows and is waiting for their confirms: its transaction is
/// open and idle, its last statement the claim.
async fn relay_batch_in_flight(db: &TestDb) -> bool {
    let mut admin = PgConnection::connect(&db.admin_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = $1 AND state = 'idle in transaction'
            AND query LIKE '%FROM outbox%SKIP LOCKED%'",
    )
    .bind(&db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let _ = admin.close().await;
    n > 0
}

/// What a scenario left behind.
struct Outcome {
    committed: BTreeSet<String>,
    published: BTreeSet<String>,
}

impl Outcome {
    /// Committed orders whose event nobody will ever see.
    fn lost(&self) -> Vec<&String> {
        self.committed.difference(&self.published).collect()
    }

    /// Events about orders that do not exist.
    fn invented(&self) -> Vec<&String> {
        self.published.difference(&self.committed).collect()
    }
}

/// Orders placed while the broker dies mid-stream, during the outage, and after the
/// process that wrote them has died and a new one started with the broker back:
/// 1. five orders with the broker up, all published;
/// 2. the proxy starts holding everything sent to the broker (30 s latency), three orders
///    are placed and, once the first one's event is on its way (the naive writer committed
///    it and is waiting for the confirm; the relay has claimed and sent its batch), the
///    broker is cut: what was on its way never arrives;
/// 3. ten more orders while the broker is unreachable, one of which rolls back;
/// 4. the process dies; the broker returns; a new process starts and places one more order;
///    the scenario ends once that order's event is published (and, for the outbox, the
///    backlog is drained): the new process has published whatever it was going to.
async fn broker_dies_mid_stream(path: Path) -> Outcome {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    create_orders_table(&db).await;
    let vhost = TestVhost::create().await;
    let collector = Collector::start(&vhost).await;
    let proxy = FaultProxy::to_amqp().await;
    let amqp_url = proxy.proxied_url(&vhost.url());

    // 1. The broker is up.
    let mut process = Process::start(path, &db, &amqp_url).await;
    let mut warm = Vec::new();
    for _ in 0..5 {
        let id = Uuid::now_v7();
        assert_eq!(process.place(id, 0).await, Placed::Committed);
        warm.push(id);
    }
    for id in warm {
        collector.wait_for(id).await;
    }

    // 2. Mid-stream. The naive writer places its orders in a task: it waits for a confirm.
    proxy.set_latency(Duration::from_secs(30));
    let mid: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let writer = tokio::spawn({
        let mid = mid.clone();
        async move {
            let mut placed = Vec::new();
            for id in mid {
                placed.push(process.place(id, 0).await);
            }
            (process, placed)
        }
    });
    if path == Path::Outbox {
        eventually(WAIT, "the relay's batch is on its way", || async {
            relay_batch_in_flight(&db).await.then_some(())
        })
        .await;
    } else {
        let first = mid[0].to_string();
        eventually(WAIT, "the first order committed", || async {
            committed_orders(&db).await.contains(&first).then_some(())
        })
        .await;
    }
    proxy.cut();
    let (mut process, placed) = writer.await.unwrap();
    if path == Path::CommitThenPublish {
        assert!(
            placed.iter().all(|p| *p == Placed::CommittedPublishFailed),
            "committed, then the publish failed: {placed:?}"
        );
    }

    // 3. The outage.
    for i in 0..10 {
        let discount = if i == 4 { 5 * TOTAL } else { 0 };
        let placed = process.place(Uuid::now_v7(), discount).await;
        assert_eq!(placed == Placed::RolledBack, i == 4, "{placed:?}");
    }

    // 4. The process dies; the broker returns; a new process starts.
    process.die().await;
    proxy.set_latency(Duration::ZERO);
    proxy.restore();
    let mut process = Process::start(path, &db, &amqp_url).await;
    let last = Uuid::now_v7();
    assert_eq!(process.place(last, 0).await, Placed::Committed);
    collector.wait_for(last).await;
    if path == Path::Outbox {
        eventually(WAIT, "the outbox drained", || async {
            (unsent(&db).await == 0).then_some(())
        })
        .await;
    }
    process.die().await;
    Outcome {
        committed: committed_orders(&db).await,
        published: collector.orders(),
    }
}

/// The failure: the events of the 12 orders committed from the moment the broker died (three
/// mid-stream, nine during the outage; the tenth rolled back) are lost. The writer knew each
/// publish failed, but a retry kept in memory dies with the process, and after the restart
/// nothing knows those orders still need announcing.
#[tokio::test]
async fn naive_commit_then_publish_loses_the_events_of_orders_committed_while_the_broker_dies() {
    let outcome = broker_dies_mid_stream(Path::CommitThenPublish).await;
    eprintln!(
        "commit then publish: {} orders committed, {} events published, {} lost",
        outcome.committed.len(),
        outcome.published.len(),
        outcome.lost().len()
    );
    assert_eq!(outcome.committed.len(), 5 + 3 + 9 + 1);
    assert_eq!(outcome.lost().len(), 12, "committed, never announced");
    assert!(outcome.invented().is_empty());
}

/// The pattern, same conditions: every committed order's event is published once the broker
/// is back and a new relay runs (the batch that was on its way when the broker died stayed
/// unsent, because the relay marks a row sent only after the broker confirmed it), and the
/// rolled-back order's event never is.
#[tokio::test]
async fn outbox_publishes_every_committed_event_after_the_broker_dies_and_the_relay_restarts() {
    let outcome = broker_dies_mid_stream(Path::Outbox).await;
    eprintln!(
        "outbox: {} orders committed, {} events published, {} lost",
        outcome.committed.len(),
        outcome.published.len(),
        outcome.lost().len()
    );
    assert_eq!(outcome.committed.len(), 5 + 3 + 9 + 1);
    assert!(outcome.lost().is_empty(), "lost: {:?}", outcome.lost());
    assert!(
        outcome.invented().is_empty(),
        "invented: {:?}",
        outcome.invented()
    );
}

/// Ten orders with the broker up; every third one's transaction fails after its event was
/// written (naive: sent and confirmed) and rolls back. Ends once the last order's event is
/// published (and, for the outbox, the backlog is drained).
async fn transactions_fail_after_their_event(path: Path) -> (Outcome, usize) {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    create_orders_table(&db).await;
    let vhost = TestVhost::create().await;
    let collector = Collector::start(&vhost).await;
    let proxy = FaultProxy::to_amqp().await;
    let mut process = Process::start(path, &db, &proxy.proxied_url(&vhost.url())).await;

    let mut rolled_back = 0;
    for i in 0..10 {
        let discount = if i % 3 == 1 { 5 * TOTAL } else { 0 };
        if process.place(Uuid::now_v7(), discount).await == Placed::RolledBack {
            rolled_back += 1;
        }
    }
    let last = Uuid::now_v7();
    assert_eq!(process.place(last, 0).await, Placed::Committed);
    collector.wait_for(last).await;
    if path == Path::Outbox {
        eventually(WAIT, "the outbox drained", || async {
            (unsent(&db).await == 0).then_some(())
        })
        .await;
    }
    process.die().await;
    let outcome = Outcome {
        committed: committed_orders(&db).await,
        published: collector.orders(),
    };
    (outcome, rolled_back)
}

/// The failure: the three orders whose transaction rolled back were announced anyway,
/// confirmed by the broker before the database said no.
#[tokio::test]
async fn naive_publish_then_commit_announces_orders_that_rolled_back() {
    let (outcome, rolled_back) = transactions_fail_after_their_event(Path::PublishThenCommit).await;
    eprintln!(
        "publish then commit: {rolled_back} rolled back, {} events about orders that do not exist",
        outcome.invented().len()
    );
    assert_eq!(rolled_back, 3);
    assert_eq!(
        outcome.invented().len(),
        3,
        "an event per rolled-back order"
    );
    assert!(outcome.lost().is_empty());
}

/// The pattern, same conditions: the event rolls back with its order, so only the eight
/// committed orders are announced.
#[tokio::test]
async fn outbox_never_publishes_the_event_of_a_rolled_back_order() {
    let (outcome, rolled_back) = transactions_fail_after_their_event(Path::Outbox).await;
    assert_eq!(rolled_back, 3);
    assert_eq!(outcome.committed.len(), 8);
    assert!(
        outcome.invented().is_empty(),
        "invented: {:?}",
        outcome.invented()
    );
    assert!(outcome.lost().is_empty(), "lost: {:?}", outcome.lost());
}
