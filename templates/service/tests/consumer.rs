//! P03 for the history consumer, against a real RabbitMQ vhost and database per test: a
//! message delivered many times has one effect, and a message that can never be processed is
//! rejected instead of looping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keel_testkit::{TestBroker, TestVhost, eventually};
use serde_json::json;
use support::{QUEUE, Running, WAIT, count, database, env, settled};
use uuid::Uuid;

/// An envelope as a relay writes it, for `skeleton.item.created`.
fn item_created(item_id: Uuid) -> (String, Vec<u8>) {
    let id = Uuid::now_v7();
    let body = json!({
        "id": id,
        "type": "skeleton.item.created",
        "schema_version": 1,
        "aggregate_id": item_id.to_string(),
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {"item_id": item_id, "name": "bolt", "quantity": 3},
    });
    (id.to_string(), serde_json::to_vec(&body).unwrap())
}

#[tokio::test]
async fn a_redelivered_message_is_recorded_once() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = Running::start(&env(&db, &vhost)).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;
    let acked_before = settled(QUEUE, "acked");

    // One event, delivered 20 times: what a relay that crashed between the broker's confirm
    // and its own commit, or a consumer that lost its ack, produces.
    let (message_id, body) = item_created(Uuid::now_v7());
    for _ in 0..20 {
        broker
            .publish("skeleton.item.created", &message_id, &body)
            .await;
    }
    eventually(WAIT, "all 20 deliveries acked", || async {
        (settled(QUEUE, "acked") - acked_before >= 20).then_some(())
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM item_history").await,
        1,
        "one effect"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_message_that_can_never_be_processed_goes_to_the_dlq_not_looped() {
    const Q: &str = "skeleton.events.rejects";
    let db = database().await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let mut vars = env(&db, &vhost);
    vars.push(("KEEL_CONSUMER__QUEUE".into(), Q.into()));
    let app = Running::start(&vars).await;
    broker.wait_for_consumer(Q, WAIT).await;

    broker
        .publish("skeleton.item.created", "garbage-1", b"not json at all")
        .await;
    // A good message after the bad one is still handled.
    let (good, body) = item_created(Uuid::now_v7());
    broker.publish("skeleton.item.created", &good, &body).await;
    eventually(
        WAIT,
        "the bad message dead-lettered, the good one recorded",
        || async {
            let recorded = count(&db, "SELECT count(*) FROM item_history").await == 1;
            (settled(Q, "dead_lettered") == 1 && recorded).then_some(())
        },
    )
    .await;
    assert_eq!(settled(Q, "requeued"), 0, "nothing was requeued");
    app.stop().await;
    let ready = broker.queue(Q).await.unwrap().ready;
    assert_eq!(ready, 0, "the bad message is out of the queue, not waiting");
    let dlq = keel_amqp::topology::dead_letter_queue(Q);
    assert_eq!(
        broker.queue(&dlq).await.unwrap().ready,
        1,
        "kept in the DLQ, for `keelctl dlq`"
    );
}
