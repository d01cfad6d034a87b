//! The consumer's queue discipline (P05) and clean stop (P20), against a real vhost: no more
//! than `concurrency` handlers run at once, and stopping lets the running ones finish and ack
//! while the messages nobody started go back to the queue. What each answer does to the message
//! (tiers, DLQ, panics) is `tests/dead_letters.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_amqp::{Broker, ConsumerConfig, Incoming, Outcome};
use keel_testkit::{TestVhost, eventually};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

mod support;

const WAIT: Duration = Duration::from_secs(20);

/// (messages ready, consumers) of the test queue.
async fn ready(conn: &Connection) -> Option<(u32, u32)> {
    let channel = conn.create_channel().await.ok()?;
    let q = channel
        .queue_declare(
            "test.work".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "done".into()).await;
    Some((q.message_count(), q.consumer_count()))
}

fn broker(vhost: &TestVhost) -> Broker {
    support::broker(vhost.url(), &CancellationToken::new())
}

/// The consumer of `test.work`: `prefetch` messages handed over, `concurrency` handlers.
fn config(prefetch: u16, concurrency: u16) -> ConsumerConfig {
    ConsumerConfig {
        queue: "test.work".into(),
        prefetch,
        concurrency,
        delivery_limit: 5,
        max_length: 10_000,
        retry_tiers: vec![Duration::from_millis(100)],
        dead_letter_max_length: 1000,
        retry_max_backoff: Duration::from_millis(100),
        depth_interval: Duration::from_secs(1),
    }
}

/// A direct connection and a confirming channel, once the consumer is subscribed (so
/// nothing published is routed before its queue exists).
async fn publisher_once_subscribed(vhost: &TestVhost) -> (Connection, Channel) {
    let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .unwrap();
    eventually(WAIT, "consumer subscribed", || async {
        (ready(&conn).await?.1 == 1).then_some(())
    })
    .await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// Publishes one message with `message_id` to the consumer's routing key, confirmed.
async fn publish(channel: &Channel, message_id: &str) {
    let confirm = channel
        .basic_publish(
            "keel.events".into(),
            "test.work.item".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_message_id(message_id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test]
async fn concurrency_is_bounded_and_stop_finishes_in_flight_messages() {
    const MESSAGES: usize = 6;
    let vhost = TestVhost::create().await;
    let stop = CancellationToken::new();
    let broker = broker(&vhost);

    // Handlers block until the test releases them, and record how many ran at once.
    let running = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Semaphore::new(0));
    let handler = {
        let (running, started, most, release) = (
            running.clone(),
            started.clone(),
            most.clone(),
            release.clone(),
        );
        move |_msg: Incoming| {
            let (running, started, most, release) = (
                running.clone(),
                started.clone(),
                most.clone(),
                release.clone(),
            );
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                started.fetch_add(1, Ordering::SeqCst);
                most.fetch_max(now, Ordering::SeqCst);
                release.acquire().await.unwrap().forget();
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::Ack
            }
        }
    };
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        config(4, 2),
        &["test.work.#"],
        handler,
        stop.clone(),
    );

    let (conn, publisher) = publisher_once_subscribed(&vhost).await;
    for i in 0..MESSAGES {
        publish(&publisher, &format!("m-{i}")).await;
    }

    // Two handlers start; the others wait (prefetched or in the queue), none starts.
    eventually(WAIT, "two handlers running", || async {
        (running.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    eventually(WAIT, "prefetch filled", || async {
        (ready(&conn).await?.0 == (MESSAGES - 4) as u32).then_some(())
    })
    .await;
    assert_eq!(started.load(Ordering::SeqCst), 2);

    // Stop while two are in flight: they finish and are acked; the rest return to the queue.
    stop.cancel();
    release.add_permits(2);
    tokio::time::timeout(WAIT, consumer)
        .await
        .expect("consumer stops")
        .unwrap();
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "never more than `concurrency`"
    );
    assert_eq!(started.load(Ordering::SeqCst), 2, "nothing new after stop");
    // (Quorum queue counters in declare-ok may trail the queue by a moment: wait for them.)
    eventually(
        WAIT,
        "the two finished ones acked, the rest back in the queue, no consumer",
        || async { (ready(&conn).await? == ((MESSAGES - 2) as u32, 0)).then_some(()) },
    )
    .await;
    broker.close().await;
}
