//! P03 proofs for notification's consumer, against a real RabbitMQ vhost and a real database
//! per test, with the service started in-process on port 0. Messages are published straight
//! to `keel.events`, the way checkout's and billing's relays publish them.
//!
//! The failure first: a consumer that applies notification's effect (the customer
//! notification and its `notification.notification.recorded` event, committed before the
//! ack) but keeps no inbox, given one message delivered 100 times, tells the customer 100
//! times. Then notification itself under the same 100 deliveries: one effect. Delivery stays
//! at-least-once in both (every copy is delivered and acked); what the inbox gives is one
//! effect per message id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keel_amqp::{Incoming, Outcome};
use keel_events::JourneyEvent;
use keel_events::notification::NotificationRecorded;
use keel_pg::outbox::{self, NewEvent};
use keel_service::{BrokerReadiness, Service};
use keel_testkit::{FaultProxy, TestBroker, TestDb, TestVhost, eventually};
use lapin::options::BasicGetOptions;
use notification::customer_notifications::{self, store};
use notification::{Config, journey_events};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgPool};
use support::{
    QUEUE, Running, WAIT, admin, closed_port, metric, order_event, publish_confirmed,
    service_config,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// notification on this test's database and vhost, with `extra` overrides.
async fn start(db: &TestDb, vhost: &TestVhost, extra: &[(&str, &str)]) -> Running {
    Running::start_with(config(db, vhost, extra)).await
}

/// The support's configuration with a quick relay backoff; the email worker sends to a closed
/// port (these tests are about the consumer, and none may depend on something listening on
/// the default SMTP port).
fn config(db: &TestDb, vhost: &TestVhost, extra: &[(&str, &str)]) -> Config {
    let quick_relay = [("KEEL_RELAY__MAX_BACKOFF", "200ms")];
    let all: Vec<(&str, &str)> = quick_relay.iter().chain(extra).copied().collect();
    service_config(db, vhost, closed_port(), &all)
}

/// The naive consumer of [`naive_handle`] wired as notification wires its own (same queue,
/// bindings, prefetch, concurrency, runtime), with no HTTP API, until [`Naive::stop`].
struct Naive {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Naive {
    async fn start(db: &TestDb, vhost: &TestVhost) -> Self {
        let config = config(db, vhost, &[]);
        let mut service = Service::new(
            "notification-naive",
            &config.http,
            &config.shutdown,
            &config.telemetry,
        );
        let pool = service.postgres(&config.database).unwrap();
        let broker = service.broker(&config.amqp, BrokerReadiness::Required);
        service.amqp_consumer(
            "journey events without an inbox",
            &broker,
            &config.consumer,
            &journey_events::BINDINGS,
            move |msg| naive_handle(pool.clone(), msg),
        );
        let (shutdown, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            service
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self { shutdown, task }
    }

    /// Graceful shutdown: in-flight messages settle, unstarted ones return to the queue.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("service stops in time")
            .unwrap();
    }
}

/// The customer notifications notification's API lists for `order_id`.
async fn notifications(app: &Running, order_id: &str) -> Vec<Value> {
    let v: Value = reqwest::get(app.url(&format!("/v1/notifications?order_id={order_id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["notifications"].as_array().unwrap().clone()
}

/// The anti-pattern, for the proof only: notification's handler without its inbox. The same
/// effect in one transaction (the customer notification and its
/// `notification.notification.recorded` event in the outbox), committed before the ack, so
/// nothing is lost; but every delivery of a message applies it again.
async fn naive_handle(pool: PgPool, msg: Incoming) -> Outcome {
    let Some(message_id) = msg.message_id.clone() else {
        return Outcome::reject("no message id");
    };
    let Ok(Ok(Some(JourneyEvent::Order(kind, event)))) =
        msg.envelope().map(|e| JourneyEvent::decode(&e))
    else {
        return Outcome::reject("not a journey event");
    };
    let Some(announcement) = customer_notifications::for_order_event(kind, &event) else {
        return Outcome::Ack;
    };
    let applied = async {
        let mut tx = pool.begin().await?;
        let subject = store::Subject {
            order_id: event.order_id,
            customer_id: &event.customer_id,
            source_message_id: &message_id,
        };
        let id = store::insert(&mut tx, subject, &announcement).await?;
        let recorded = JourneyEvent::NotificationRecorded(NotificationRecorded {
            notification_id: id,
            order_id: event.order_id,
            customer_id: event.customer_id.clone(),
            kind: announcement.kind,
        });
        outbox::insert(
            &mut tx,
            &NewEvent {
                aggregate_type: "notification",
                aggregate_id: &id.to_string(),
                event_type: recorded.event_type(),
                data: recorded
                    .data()
                    .map_err(|e| keel_pg::PgError::Encode(e.to_string()))?,
            },
        )
        .await?;
        tx.commit().await?;
        Ok::<_, keel_pg::PgError>(())
    }
    .await;
    match applied {
        Ok(()) => Outcome::Ack,
        Err(e) => Outcome::retry(e),
    }
}

/// Drops `notifications.source_message_id`'s UNIQUE constraint: the second guard notification
/// keeps behind its inbox. Both sides of the P03 proof run without it, so the only thing
/// between a redelivery and a second effect is the inbox (or its absence).
async fn drop_the_unique_backstop(db: &TestDb) {
    let mut conn = admin(db).await;
    sqlx::query("ALTER TABLE notifications DROP CONSTRAINT notifications_source_message_id_key")
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
}

/// Messages ready in `queue` once the service has gone away. Waiting for the consumer count
/// to reach zero first matters: a quorum queue's declare-ok counters can trail it by a moment,
/// and the consumer's removal is what returns its unacked messages.
async fn ready_after_stop(broker: &TestBroker, queue: &str) -> u32 {
    eventually(WAIT, "the consumer is gone", || async {
        let q = broker.queue(queue).await?;
        (q.consumers == 0).then_some(q.ready)
    })
    .await
}

async fn wait_ready(broker: &TestBroker, queue: &str, n: u32, what: &str) {
    eventually(WAIT, what, || async {
        (broker.queue(queue).await?.ready == n).then_some(())
    })
    .await;
}

/// An order event of `event_type` for `cust-42`, with `reason`: the support's final order
/// event with those two replaced. (message id, body).
fn order_event_of(
    event_type: &str,
    order_id: Uuid,
    state: &str,
    reason: Option<&str>,
) -> (String, Vec<u8>) {
    let (id, body) = order_event(order_id, "cust-42", state);
    let mut body: Value = serde_json::from_slice(&body).unwrap();
    body["type"] = json!(event_type);
    body["data"]["reason"] = json!(reason);
    (id, serde_json::to_vec(&body).unwrap())
}

fn payment_event(event_type: &str, order_id: Uuid, status: &str) -> (String, Vec<u8>) {
    let id = Uuid::now_v7();
    let body = json!({
        "id": id,
        "type": event_type,
        "schema_version": 1,
        "aggregate_id": Uuid::new_v4().to_string(),
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {
            "payment_id": Uuid::new_v4(),
            "order_id": order_id,
            "amount_minor": 4200,
            "currency": "EUR",
            "status": status,
        }
    });
    (id.to_string(), serde_json::to_vec(&body).unwrap())
}

/// Messages of `queue` this process settled with `outcome` (the consumer's P06 counter).
fn settled(queue: &str, outcome: &str) -> f64 {
    metric(&format!(
        "amqp_messages_total{{queue=\"{queue}\",outcome=\"{outcome}\"}} "
    ))
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

/// One final order event, delivered 100 times with the same message id: what a relay that
/// crashed between the broker's confirm and its own commit, or a consumer that lost its ack,
/// produces (with 8 handlers running at once, copies also race each other).
async fn publish_one_event_100_times(broker: &TestBroker) -> Uuid {
    publish_confirmed(broker, "cust-42", 100).await
}

/// The failure: without an inbox every copy is applied. The customer is told 100 times about
/// one confirmed order, and 100 `notification.notification.recorded` events go out.
#[tokio::test]
async fn naive_consumer_without_an_inbox_applies_a_redelivered_message_once_per_copy() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    drop_the_unique_backstop(&db).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let naive = Naive::start(&db, &vhost).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    let order = publish_one_event_100_times(&broker).await;
    eventually(WAIT, "every copy acked", || async {
        (settled(QUEUE, "acked") == 100.0).then_some(())
    })
    .await;
    naive.stop().await;
    assert_eq!(
        ready_after_stop(&broker, QUEUE).await,
        0,
        "all 100 copies acked"
    );

    let told = count(
        &db,
        &format!("SELECT count(*) FROM notifications WHERE order_id = '{order}'"),
    )
    .await;
    eprintln!("naive consumer: {told} notifications for one message delivered 100 times");
    assert_eq!(told, 100, "one effect per delivery, not per message");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 100);
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 0);
}

/// The pattern, same 100 deliveries and the same missing backstop: the inbox row, written in
/// the effect's transaction, lets the first copy apply it and turns the other 99 into acks
/// with no effect.
#[tokio::test]
async fn redelivered_message_has_one_effect() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    drop_the_unique_backstop(&db).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = start(&db, &vhost, &[]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    let order = publish_one_event_100_times(&broker).await;

    eventually(WAIT, "every copy acked", || async {
        (settled(QUEUE, "acked") == 100.0).then_some(())
    })
    .await;
    assert_eq!(
        notifications(&app, &order.to_string()).await.len(),
        1,
        "the customer sees one notification"
    );
    // After a graceful stop an unacked copy would be back in the queue: none is.
    app.stop().await;
    assert_eq!(
        ready_after_stop(&broker, QUEUE).await,
        0,
        "all 100 copies acked"
    );

    let told = count(&db, "SELECT count(*) FROM notifications").await;
    eprintln!("notification: {told} notification for one message delivered 100 times");
    assert_eq!(told, 1, "one effect");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox").await,
        1,
        "one event about it"
    );
}

#[tokio::test]
async fn final_order_event_records_a_customer_notification_visible_over_http() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    // Someone listening to notification's own events (declared before anything is published).
    let observer = broker.channel().await;
    keel_amqp::topology::declare_queue(
        &observer,
        &keel_amqp::topology::QueueSpec {
            name: "test.observer".into(),
            bindings: vec!["notification.#".into()],
            delivery_limit: 5,
            max_length: 10_000,
            retry_tiers: Vec::new(),
            dead_letter_max_length: 1000,
        },
    )
    .await
    .unwrap();
    let app = start(&db, &vhost, &[]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    let order = Uuid::new_v4();
    let (id, body) = order_event_of(
        "checkout.order.rejected",
        order,
        "REJECTED",
        Some("out_of_stock"),
    );
    broker.publish("checkout.order.rejected", &id, &body).await;

    let list = eventually(WAIT, "the notification is visible", || async {
        let list = notifications(&app, &order.to_string()).await;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(list.len(), 1);
    let n = &list[0];
    assert_eq!(n["order_id"], order.to_string());
    assert_eq!(n["customer_id"], "cust-42");
    assert_eq!(n["kind"], "REJECTED");
    assert_eq!(n["source_message_id"], id);
    let message = n["message"].as_str().unwrap();
    assert!(
        message.contains(&order.to_string()) && message.contains("out of stock"),
        "{message}"
    );

    // The relay published notification's own event about it.
    let recorded = eventually(
        WAIT,
        "notification.notification.recorded published",
        || async {
            let m = observer
                .basic_get("test.observer".into(), BasicGetOptions { no_ack: true })
                .await
                .ok()??;
            Some(serde_json::from_slice::<Value>(&m.delivery.data).unwrap())
        },
    )
    .await;
    assert_eq!(recorded["type"], "notification.notification.recorded");
    assert_eq!(recorded["data"]["order_id"], order.to_string());
    assert_eq!(recorded["data"]["notification_id"], n["id"]);

    // Another order has none (an empty list, not a 404); a bad id is a 400 problem.
    assert!(
        notifications(&app, &Uuid::new_v4().to_string())
            .await
            .is_empty()
    );
    for query in ["?order_id=not-a-uuid", "", "?order_id="] {
        let r = reqwest::get(app.url(&format!("/v1/notifications{query}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        let p: Value = r.json().await.unwrap();
        assert!(
            p["type"].as_str().unwrap().ends_with("/invalid-query"),
            "{p}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn non_final_and_payment_events_record_no_notification() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = start(&db, &vhost, &[]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    let order = Uuid::new_v4();
    for (routing_key, (id, body)) in [
        (
            "checkout.order.placed",
            order_event_of("checkout.order.placed", order, "PENDING", None),
        ),
        (
            "billing.payment.authorized",
            payment_event("billing.payment.authorized", order, "AUTHORIZED"),
        ),
        (
            "billing.payment.captured",
            payment_event("billing.payment.captured", order, "CAPTURED"),
        ),
    ] {
        broker.publish(routing_key, &id, &body).await;
    }
    eventually(WAIT, "all three handled (inbox rows)", || async {
        (count(&db, "SELECT count(*) FROM inbox").await == 3).then_some(())
    })
    .await;
    assert!(notifications(&app, &order.to_string()).await.is_empty());
    assert_eq!(count(&db, "SELECT count(*) FROM notifications").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn ack_happens_only_after_commit() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    // The service reaches both its database and the broker through fault proxies.
    let pg = FaultProxy::to_pgbouncer().await;
    let mq = FaultProxy::to_amqp().await;
    let (amqp, database) = (mq.proxied_url(&vhost.url()), pg.proxied_url(&db.app_url()));
    let app = start(
        &db,
        &vhost,
        &[("KEEL_AMQP__URL", &amqp), ("KEEL_DATABASE__URL", &database)],
    )
    .await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    // The database goes away; a final order event arrives.
    pg.cut();
    let order = Uuid::new_v4();
    let (id, body) = order_event(order, "cust-42", "CONFIRMED");
    broker.publish("checkout.order.confirmed", &id, &body).await;
    wait_ready(&broker, QUEUE, 0, "the message delivered to the consumer").await;
    assert_eq!(count(&db, "SELECT count(*) FROM notifications").await, 0);

    // Not acked: when the consumer's connection drops, the message is back in the queue.
    mq.cut();
    wait_ready(
        &broker,
        QUEUE,
        1,
        "the unacked message returned to the queue",
    )
    .await;

    // The consumer reconnects and gets it again; the database is still down.
    mq.restore();
    wait_ready(&broker, QUEUE, 0, "the message redelivered").await;
    assert_eq!(count(&db, "SELECT count(*) FROM notifications").await, 0);

    // The database returns: the effect happens once, then the ack.
    pg.restore();
    eventually(WAIT, "the notification recorded", || async {
        (count(&db, "SELECT count(*) FROM notifications").await == 1).then_some(())
    })
    .await;
    app.stop().await;
    assert_eq!(
        ready_after_stop(&broker, QUEUE).await,
        0,
        "acked after the commit"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM notifications").await,
        1,
        "one effect"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 1);
}

/// P01: a message that can never be processed goes to the DLQ on its first delivery, with the
/// reason, instead of looping; the good message behind it is handled.
#[tokio::test]
async fn unparseable_messages_go_to_the_dlq_at_once_not_looped() {
    // A queue of its own, so this test's metric lines are its own; a delivery limit high
    // enough that a requeue loop would still be running when we look.
    const Q: &str = "notification.events.rejects";
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = start(
        &db,
        &vhost,
        &[
            ("KEEL_CONSUMER__QUEUE", Q),
            ("KEEL_CONSUMER__DELIVERY_LIMIT", "1000"),
        ],
    )
    .await;
    broker.wait_for_consumer(Q, WAIT).await;

    let unknown_version_order = Uuid::new_v4();
    let (id, body) = order_event(unknown_version_order, "cust-42", "CONFIRMED");
    let mut future: Value = serde_json::from_slice(&body).unwrap();
    future["schema_version"] = json!(99);
    broker
        .publish("checkout.order.confirmed", "garbage-1", b"not json at all")
        .await;
    broker
        .publish(
            "checkout.order.confirmed",
            &id,
            &serde_json::to_vec(&future).unwrap(),
        )
        .await;
    // A good message after the bad ones.
    let order = Uuid::new_v4();
    let (good_id, good) = order_event(order, "cust-42", "CONFIRMED");
    broker
        .publish("checkout.order.confirmed", &good_id, &good)
        .await;

    eventually(WAIT, "the good message handled", || async {
        (notifications(&app, &order.to_string()).await.len() == 1).then_some(())
    })
    .await;
    let rejected = format!("amqp_messages_total{{queue=\"{Q}\",outcome=\"dead_lettered\"}} 2");
    eventually(WAIT, "both bad messages dead-lettered", || async {
        keel_telemetry::metrics_handle()
            .render()
            .lines()
            .any(|l| l == rejected)
            .then_some(())
    })
    .await;
    app.stop().await;

    let metrics = keel_telemetry::metrics_handle().render();
    assert!(
        !metrics.contains(&format!(
            "amqp_messages_total{{queue=\"{Q}\",outcome=\"requeued\"}}"
        )),
        "nothing was requeued:\n{metrics}"
    );
    assert_eq!(
        ready_after_stop(&broker, Q).await,
        0,
        "the bad messages are out of the queue, not waiting"
    );
    assert_eq!(
        broker
            .queue(&keel_amqp::topology::dead_letter_queue(Q))
            .await
            .unwrap()
            .ready,
        2,
        "both kept in the DLQ"
    );
    assert!(app_has_no_notification(&db, unknown_version_order).await);
}

async fn app_has_no_notification(db: &TestDb, order: Uuid) -> bool {
    let mut conn = admin(db).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE order_id = $1")
        .bind(order)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    n == 0
}
