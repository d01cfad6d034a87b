//! Broker restart drill (P02, P03, P21, P43): RabbitMQ is stopped and started again in the
//! middle of a stream of orders. Expectation: every accepted order ends in a final state with
//! exactly one customer notification; none is lost, none is told twice.
//!
//! What carries it through: checkout keeps accepting orders (they and their events are only
//! rows in its database, P02's outbox); the relays back off while the broker is away and publish
//! what waited once it is back; the consumers reconnect, re-declare and resubscribe (P21); the
//! messages in flight when it stopped are redelivered from the durable quorum queues, and
//! notification's inbox (P03) turns the redelivered ones into no-ops.
//!
//! The broker is a node of this test's own (`keel_testkit::RabbitNode`), loading
//! `infra/rabbitmq/definitions.json` at boot as compose and kind do: stopping the machine's
//! RabbitMQ would fail every test running beside this one. It is a real `rabbitmq-server`,
//! stopped with `rabbitmqctl stop` and started again on the same data; dropping it (however the
//! test ends) kills it and removes its data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_e2e::{Journey, Options};
use keel_testkit::{RabbitNode, eventually};
use sqlx::{Connection, PgConnection};

/// Orders accepted before the stop, while the broker is down, and after it is back; the stream
/// runs (one order every [`PACE`], at most [`MAX_ORDERS`]) until the last phase is done.
const PER_PHASE: usize = 10;
const PACE: Duration = Duration::from_millis(150);
/// Only a bound on the loop, never the thing that ends it: the stream goes on while the node
/// stops and boots, and under a loaded CI run a boot took long enough that a cap of 200 (30 s
/// of orders) ran out before the last phase could count its ten. 1,200 is three minutes.
const MAX_ORDERS: usize = 1_200;
/// Every order's final state and notification, after the broker is back.
const SETTLE: Duration = Duration::from_secs(90);

async fn scalar(url: &str, query: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_order_and_notifies_each_once() {
    assert!(
        RabbitNode::available(),
        "the drill needs rabbitmq-server (Debian's package, as `make deps` installs)"
    );
    let node = tokio::task::spawn_blocking(RabbitNode::start_new)
        .await
        .unwrap();
    let journey = Arc::new(
        Journey::start(Options {
            broker_port: Some(node.port),
            saga_deadline: Duration::from_secs(60),
            ..Options::default()
        })
        .await,
    );

    // The stream: one order every PACE, each id recorded once accepted (202), until `done`.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let done = tokio_util::sync::CancellationToken::new();
    let stream = {
        let (journey, accepted, done) = (journey.clone(), accepted.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            for _ in 0..MAX_ORDERS {
                tokio::select! {
                    () = done.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let id = journey.place("tok_approve", &[("KEEL-MUG", 1)]).await;
                accepted.lock().unwrap().push(id);
            }
        })
    };
    let count = || accepted.lock().unwrap().len();
    let more = |n: usize| {
        let accepted = accepted.clone();
        async move {
            let target = accepted.lock().unwrap().len() + n;
            assert!(
                target <= MAX_ORDERS,
                "the stream ran out ({MAX_ORDERS} orders)"
            );
            eventually(
                Duration::from_secs(60),
                &format!("{target} orders accepted"),
                || async { (accepted.lock().unwrap().len() >= target).then_some(()) },
            )
            .await;
        }
    };

    more(PER_PHASE).await;
    let stopped_at = count();
    let clock = std::time::Instant::now();
    let mut node = tokio::task::spawn_blocking(move || {
        let mut node = node;
        node.stop();
        node
    })
    .await
    .unwrap();
    let stop_took = clock.elapsed();
    // Orders keep coming while the broker is down.
    more(PER_PHASE).await;
    let restarted_at = count();
    let clock = std::time::Instant::now();
    let node = tokio::task::spawn_blocking(move || {
        node.start();
        node
    })
    .await
    .unwrap();
    let start_took = clock.elapsed();
    more(PER_PHASE).await;
    done.cancel();
    stream.await.unwrap();

    let ids = accepted.lock().unwrap().clone();
    let orders = ids.len();
    eprintln!(
        "broker stopped after order {stopped_at} (stop took {stop_took:?}), started again after \
         order {restarted_at} (boot took {start_took:?}) of {orders}"
    );
    for id in &ids {
        assert_eq!(journey.final_state(id, SETTLE).await, "CONFIRMED", "{id}");
    }
    let notification_db = journey.notification_db.admin_url();
    eventually(SETTLE, "one notification per order", || async {
        let n = scalar(&notification_db, "SELECT count(*) FROM notifications").await;
        (n >= i64::try_from(orders).unwrap()).then_some(())
    })
    .await;
    // None twice: exactly one per order, and nothing left unpublished anywhere.
    let per_order = scalar(
        &notification_db,
        "SELECT count(*) FROM (SELECT order_id FROM notifications GROUP BY order_id \
         HAVING count(*) <> 1) AS twice",
    )
    .await;
    assert_eq!(per_order, 0, "an order was told twice");
    assert_eq!(
        scalar(
            &notification_db,
            "SELECT count(DISTINCT order_id) FROM notifications"
        )
        .await,
        i64::try_from(orders).unwrap(),
        "every order told once"
    );
    for db in [
        &journey.checkout_db,
        &journey.billing_db,
        &journey.notification_db,
    ] {
        let url = db.admin_url();
        eventually(SETTLE, "every outbox drained", || async {
            (scalar(&url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0)
                .then_some(())
        })
        .await;
    }
    // Nothing was parked on the way: the inbox, not the DLQ, absorbed the redeliveries. And
    // notification's own `notification.notification.recorded` events, which nobody consumes,
    // all reached keel.unrouted (at least one per order: a relay may publish one twice).
    let admin =
        lapin::Connection::connect(&node.url("keel"), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let depth = |queue: &'static str| {
        let admin = &admin;
        async move {
            let channel = admin.create_channel().await.ok()?;
            let q = channel
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..lapin::options::QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok()?;
            Some(q.message_count())
        }
    };
    // The events that tell no customer anything (payments, non-final states) may still be on
    // their way through notification's queue: wait for it to drain, then look.
    eventually(SETTLE, "notification.events drained", || async {
        (depth("notification.events").await? == 0).then_some(())
    })
    .await;
    assert_eq!(
        depth("notification.events.dlq").await,
        Some(0),
        "nothing dead-lettered"
    );
    let unrouted = depth("keel.unrouted").await.unwrap();
    assert!(
        unrouted >= u32::try_from(orders).unwrap(),
        "keel.unrouted: {unrouted} recorded events for {orders} orders"
    );
    let _ = admin.close(200, "done".into()).await;
    drop(node);
}
