//! P01, the poison-message proof for notification's consumer, against a real vhost and a real
//! database.
//!
//! The failure first: a queue as it was declared before dead-lettering existed (a quorum queue
//! with `x-delivery-limit` and nothing else) and a consumer that returns the message it cannot
//! handle: after the limit the broker drops it. It is in no queue anywhere; the customer is
//! never told, and nobody can find out why.
//!
//! Then Keel: notification's own handler behind a "bug" the test can switch off (it chokes on
//! order events whose reason is not ASCII, the kind of defect a release introduces). One such
//! event among 300 good ones goes through the retry tiers and lands in
//! `notification.events.dlq` after the configured attempts, with its error, while the good
//! ones flow; the throughput with and without it is printed. After the fix (the switch),
//! `keelctl dlq replay` sends it back into the queue where it failed, with its message id: one
//! notification, and a further copy of the same message changes nothing (the inbox).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_amqp::topology::{self, headers};
use keel_amqp::{Incoming, Outcome};
use keel_service::{BrokerReadiness, Service};
use keel_testkit::{TestBroker, TestDb, TestVhost, eventually};
use keelctl::dlq::{DeadLetterQueue, Destination, Filter, ReplayRequest, Selection, replay};
use lapin::options::{BasicConsumeOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use notification::journey_events;
use serde_json::{Value, json};
use sqlx::Connection as _;
use support::{WAIT, admin, closed_port, order_event, service_config};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use uuid::Uuid;

const GOOD: usize = 300;
/// Three short tiers, so a poison message is dead-lettered on its fourth failure.
const TIERS: &str = "100ms,200ms,300ms";

/// A rejected order (`checkout.order.rejected`) for `cust-42` with `reason`: the support's final
/// order event with its reason set. (message id, body).
fn rejected(order_id: Uuid, reason: &str) -> (String, Vec<u8>) {
    let (id, body) = order_event(order_id, "cust-42", "REJECTED");
    let mut body: Value = serde_json::from_slice(&body).unwrap();
    body["data"]["reason"] = json!(reason);
    (id, serde_json::to_vec(&body).unwrap())
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut conn = admin(db).await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    n
}

/// The failure: no dead-letter exchange, so the delivery limit is where a poison message
/// ends, in nothing.
#[tokio::test]
async fn without_a_dead_letter_exchange_a_poison_message_is_lost() {
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let channel = broker.channel().await;
    topology::declare_exchanges(&channel).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(3));
    channel
        .queue_declare(
            "naive.events".into(),
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
            "naive.events".into(),
            "keel.events".into(),
            "checkout.order.*".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (id, body) = rejected(Uuid::new_v4(), "Lagerbestand erschöpft");
    broker.publish("checkout.order.rejected", &id, &body).await;

    // The naive consumer: cannot handle it, gives it back, again and again.
    let consuming = broker.channel().await;
    let mut consumer = consuming
        .basic_consume(
            "naive.events".into(),
            "naive".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    loop {
        assert!(deliveries <= 10, "the delivery limit never applied");
        match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                d.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .unwrap();
            }
            // Nothing more is delivered, and nothing waits in the queue: it is gone.
            _ if deliveries > 0 && broker.queue("naive.events").await.unwrap().ready == 0 => {
                break;
            }
            _ => {}
        }
    }
    assert_eq!(deliveries, 4, "delivered limit + 1 times, then dropped");
    assert!(
        broker.queue("naive.events.dlq").await.is_none(),
        "no DLQ holds it: the message is gone"
    );
}

/// notification's consumer with its real handler behind the test's bug switch, and the
/// queue's retry tiers shortened; stopped with the returned sender.
async fn start(
    db: &TestDb,
    vhost: &TestVhost,
    queue: &str,
    bug: Arc<AtomicBool>,
    handled: Arc<AtomicUsize>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    // Only the consumer runs here, no email worker; its SMTP port is closed all the same.
    let config = service_config(
        db,
        vhost,
        closed_port(),
        &[
            ("KEEL_CONSUMER__QUEUE", queue),
            ("KEEL_CONSUMER__RETRY_TIERS", TIERS),
        ],
    );
    let mut service = Service::new(
        "notification-poison",
        &config.http,
        &config.shutdown,
        &config.telemetry,
    );
    let pool = service.postgres(&config.database).unwrap();
    let broker = service.broker(&config.amqp, BrokerReadiness::Required);
    service.amqp_consumer(
        "journey events",
        &broker,
        &config.consumer,
        &journey_events::BINDINGS,
        move |msg: Incoming| {
            let (pool, bug, handled) = (pool.clone(), bug.clone(), handled.clone());
            async move {
                let poison = msg
                    .envelope()
                    .ok()
                    .and_then(|e| e.data["reason"].as_str().map(|r| !r.is_ascii()))
                    .unwrap_or(false);
                if poison && bug.load(Ordering::SeqCst) {
                    return Outcome::retry("template error: the reason is not ASCII");
                }
                let outcome = journey_events::handle(pool, msg).await;
                if outcome == Outcome::Ack {
                    handled.fetch_add(1, Ordering::SeqCst);
                }
                outcome
            }
        },
    );
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        service
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, task)
}

/// Publishes `good` good events (and the poison one after the first 10, if given) and returns
/// how long the good ones took to be handled, from the first publish.
async fn run_stream(
    broker: &TestBroker,
    handled: &AtomicUsize,
    good: usize,
    poison: Option<&(String, Vec<u8>)>,
) -> Duration {
    let before = handled.load(Ordering::SeqCst);
    let started = Instant::now();
    for i in 0..good {
        if i == 10
            && let Some((id, body)) = poison
        {
            broker.publish("checkout.order.rejected", id, body).await;
        }
        let (id, body) = rejected(Uuid::new_v4(), "out_of_stock");
        broker.publish("checkout.order.rejected", &id, &body).await;
    }
    eventually(WAIT, "every good message handled", || async {
        (handled.load(Ordering::SeqCst) - before >= good).then_some(())
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_while_good_ones_flow_and_replayed_once_after_the_fix() {
    const Q: &str = "notification.events.poison";
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let bug = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let (stop, task) = start(&db, &vhost, Q, bug.clone(), handled.clone()).await;
    broker.wait_for_consumer(Q, WAIT).await;

    // Warm-up (connections, prepared statements), then the two measured runs.
    run_stream(&broker, &handled, GOOD / 3, None).await;
    let clean = run_stream(&broker, &handled, GOOD, None).await;
    let order = Uuid::new_v4();
    let poison = rejected(order, "Lagerbestand erschöpft");
    let with_poison = run_stream(&broker, &handled, GOOD, Some(&poison)).await;
    let rate = |d: Duration| GOOD as f64 / d.as_secs_f64();
    eprintln!(
        "P01 throughput of {GOOD} good messages: {:.0}/s without the poison message, {:.0}/s with it",
        rate(clean),
        rate(with_poison)
    );

    // The poison one: through the three tiers, then the DLQ, with why.
    let dlq = topology::dead_letter_queue(Q);
    eventually(WAIT, "the poison message in the DLQ", || async {
        (broker.queue(&dlq).await?.ready == 1).then_some(())
    })
    .await;
    let channel = broker.channel().await;
    let dead = channel
        .basic_get(
            dlq.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .unwrap();
    let header = |name: &str| {
        dead.delivery
            .properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)
            .cloned()
    };
    assert_eq!(header(headers::ATTEMPTS), Some(AMQPValue::LongLongInt(4)));
    assert_eq!(
        header(headers::ERROR),
        Some(AMQPValue::LongString(LongString::from(
            "template error: the reason is not ASCII"
        )))
    );
    // Back to the DLQ for keelctl (the channel's unacked message returns when it closes).
    let _ = channel.close(200, "peeked".into()).await;
    eventually(WAIT, "the peeked message back in the DLQ", || async {
        (broker.queue(&dlq).await?.ready == 1).then_some(())
    })
    .await;
    let told = format!("SELECT count(*) FROM notifications WHERE order_id = '{order}'");
    assert_eq!(count(&db, &told).await, 0, "nobody told while it is broken");

    // The fix, then the operator's replay.
    bug.store(false, Ordering::SeqCst);
    let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let summary = replay(
        &conn,
        &ReplayRequest {
            queues: vec![DeadLetterQueue::of(Q)],
            selection: Selection::Matching(Filter {
                ids: vec![poison.0.clone()],
                ..Filter::default()
            }),
            // Back into the queue where it failed (the default; spelt out for the reader).
            destination: Destination::FailedQueue,
            dry_run: false,
            rate: 50,
            limit: 100,
            idle: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    assert_eq!(summary.replayed, 1, "{summary:?}");
    eventually(WAIT, "the replayed message applied", || async {
        (count(&db, &told).await == 1).then_some(())
    })
    .await;
    // Exactly once: another copy of the same message (a second replay, a redelivery) is a
    // duplicate for the inbox.
    let acked = handled.load(Ordering::SeqCst);
    broker
        .publish("checkout.order.rejected", &poison.0, &poison.1)
        .await;
    eventually(WAIT, "the copy handled (acked as a duplicate)", || async {
        (handled.load(Ordering::SeqCst) > acked).then_some(())
    })
    .await;
    assert_eq!(count(&db, &told).await, 1, "one notification, once");
    assert_eq!(
        broker.queue(&dlq).await.unwrap().ready,
        0,
        "the DLQ is empty"
    );
    let inbox = format!(
        "SELECT count(*) FROM inbox WHERE message_id = '{}'",
        poison.0
    );
    assert_eq!(count(&db, &inbox).await, 1);

    let _ = stop.send(());
    task.await.unwrap();
}
