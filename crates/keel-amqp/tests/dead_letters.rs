//! What the consumer does with each answer (P01), against a real vhost: a transient failure goes
//! through every retry tier, in order, then to the DLQ with headers saying why; a permanent one
//! and a panic go to the DLQ at once while good messages keep flowing; an unavailable
//! dependency holds the message without counting attempts; a message nobody ever settles is
//! dead-lettered by the broker at the delivery limit; and a DLQ that refuses keeps the message
//! in its queue instead of losing it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_amqp::topology::{self, QueueSpec, headers};
use keel_amqp::{Broker, ConsumerConfig, Incoming, Outcome};
use keel_testkit::{TestBroker, TestVhost, eventually};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

mod support;

const WAIT: Duration = Duration::from_secs(30);
const QUEUE: &str = "test.work";
const TIERS: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(400)];

fn broker(vhost: &TestVhost) -> Broker {
    support::broker(vhost.url(), &CancellationToken::new())
}

fn config() -> ConsumerConfig {
    ConsumerConfig {
        queue: QUEUE.into(),
        prefetch: 4,
        concurrency: 2,
        delivery_limit: 5,
        max_length: 10_000,
        retry_tiers: TIERS.to_vec(),
        dead_letter_max_length: 1000,
        retry_max_backoff: Duration::from_millis(100),
        depth_interval: Duration::from_secs(1),
    }
}

fn spec(config: &ConsumerConfig) -> QueueSpec {
    config.queue_spec(&["test.work.#"])
}

/// The testkit's broker (publishing to `keel.events` with confirms, queue counters) and a
/// confirm-mode channel of its own for what the tests do by hand.
async fn connect(vhost: &TestVhost) -> (TestBroker, Channel) {
    let broker = TestBroker::connect(vhost).await;
    let channel = broker.channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (broker, channel)
}

/// Messages ready in `queue`.
async fn depth(broker: &TestBroker, queue: &str) -> Option<u32> {
    Some(broker.queue(queue).await?.ready)
}

/// One message with `message_id` to the consumer's routing key, confirmed.
async fn publish(broker: &TestBroker, message_id: &str, body: &[u8]) {
    broker.publish("test.work.item", message_id, body).await;
}

/// Takes one message from the DLQ (acked), if there is one.
async fn take_dead_letter(channel: &Channel) -> Option<BasicGetMessage> {
    channel
        .basic_get(
            topology::dead_letter_queue(QUEUE).as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
}

fn text(message: &BasicGetMessage, name: &str) -> Option<String> {
    match message
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn int(message: &BasicGetMessage, name: &str) -> Option<i64> {
    match message
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// Declares the topology (as the consumer will) so messages published before it subscribes
/// are routed.
async fn declare(channel: &Channel, spec: &QueueSpec) {
    topology::declare_queue(channel, spec).await.unwrap();
}

#[tokio::test]
async fn a_transient_failure_goes_through_every_tier_in_order_then_to_the_dlq_with_why() {
    let vhost = TestVhost::create().await;
    let (rabbit, channel) = connect(&vhost).await;
    let config = config();
    declare(&channel, &spec(&config)).await;
    // Every call: (attempts so far, routing key seen, when).
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let seen = seen.clone();
        move |msg: Incoming| {
            seen.lock()
                .unwrap()
                .push((msg.attempts, msg.routing_key.clone(), Instant::now()));
            async { Outcome::retry("downstream answered 503") }
        }
    };
    let stop = CancellationToken::new();
    let broker = broker(&vhost);
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        config,
        &["test.work.#"],
        handler,
        stop.clone(),
    );
    publish(&rabbit, "m-1", b"{\"n\":1}").await;

    let dead = eventually(WAIT, "the message in the DLQ", || async {
        take_dead_letter(&channel).await
    })
    .await;
    let calls = seen.lock().unwrap().clone();
    let attempts: Vec<u32> = calls.iter().map(|c| c.0).collect();
    assert_eq!(
        attempts,
        [0, 1, 2],
        "first try, then one per tier: {calls:?}"
    );
    assert!(
        calls.iter().all(|c| c.1 == "test.work.item"),
        "the handler sees the original routing key on every attempt"
    );
    // Each tier held the message at least its delay (the TTL is a lower bound).
    assert!(calls[1].2 - calls[0].2 >= TIERS[0]);
    assert!(calls[2].2 - calls[1].2 >= TIERS[1]);

    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "m-1"
    );
    assert_eq!(dead.delivery.data, b"{\"n\":1}");
    assert_eq!(int(&dead, headers::ATTEMPTS), Some(3));
    assert_eq!(
        text(&dead, headers::ERROR).as_deref(),
        Some("downstream answered 503")
    );
    assert_eq!(
        text(&dead, headers::FAILURE).as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(
        text(&dead, headers::ORIGINAL_EXCHANGE).as_deref(),
        Some("keel.events")
    );
    assert_eq!(
        text(&dead, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.work.item")
    );
    assert_eq!(text(&dead, headers::QUEUE).as_deref(), Some(QUEUE));
    let first = text(&dead, headers::FIRST_FAILURE).unwrap();
    let last = text(&dead, headers::LAST_FAILURE).unwrap();
    assert!(first < last, "first failure {first} before last {last}");
    for tier in TIERS {
        assert_eq!(
            depth(&rabbit, &topology::retry_queue(QUEUE, tier)).await,
            Some(0)
        );
    }
    assert_eq!(depth(&rabbit, QUEUE).await, Some(0));
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
}

/// One poison message among good ones: it is dead-lettered on its first failure, the others are
/// acked, and a handler that panics does the same to its message without taking the consumer
/// down.
#[tokio::test]
async fn rejected_and_panicking_messages_go_to_the_dlq_at_once_while_good_ones_flow() {
    let vhost = TestVhost::create().await;
    let (rabbit, channel) = connect(&vhost).await;
    let config = config();
    declare(&channel, &spec(&config)).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let acked = acked.clone();
        move |msg: Incoming| {
            let acked = acked.clone();
            // A panic before the handler even returns its future, in the closure itself.
            assert_ne!(
                msg.message_id.as_deref(),
                Some("boom-sync"),
                "a bug outside the async block"
            );
            async move {
                let id = msg.message_id.clone().unwrap();
                match id.as_str() {
                    "poison" => Outcome::reject("body is not an event envelope"),
                    "boom" => panic!("a bug in the handler"),
                    _ => {
                        acked.lock().unwrap().push(id);
                        Outcome::Ack
                    }
                }
            }
        }
    };
    let stop = CancellationToken::new();
    let broker = broker(&vhost);
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        config,
        &["test.work.#"],
        handler,
        stop.clone(),
    );
    for id in ["good-1", "poison", "good-2", "boom", "good-3", "boom-sync"] {
        publish(&rabbit, id, b"{}").await;
    }
    eventually(WAIT, "good messages acked, three in the DLQ", || async {
        let dlq = depth(&rabbit, &topology::dead_letter_queue(QUEUE)).await?;
        (acked.lock().unwrap().len() == 3 && dlq == 3).then_some(())
    })
    .await;
    let mut dead = Vec::new();
    while let Some(m) = take_dead_letter(&channel).await {
        dead.push((
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
            text(&m, headers::FAILURE).unwrap(),
            text(&m, headers::ERROR).unwrap(),
            int(&m, headers::ATTEMPTS).unwrap(),
        ));
    }
    dead.sort();
    assert_eq!(
        dead,
        [
            (
                "boom".to_owned(),
                "panic".to_owned(),
                "handler panicked: a bug in the handler".to_owned(),
                1
            ),
            (
                "boom-sync".to_owned(),
                "panic".to_owned(),
                "handler panicked: assertion `left != right` failed: a bug outside the async block\n  left: Some(\"boom-sync\")\n right: Some(\"boom-sync\")".to_owned(),
                1
            ),
            (
                "poison".to_owned(),
                "rejected".to_owned(),
                "body is not an event envelope".to_owned(),
                1
            ),
        ]
    );
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
}

/// `Unavailable` (the handler's database is down) is not the message's fault: it is held and
/// tried again in place, no attempt counted, nothing sent to a tier or the DLQ.
#[tokio::test]
async fn an_unavailable_dependency_holds_the_message_without_counting_attempts() {
    let vhost = TestVhost::create().await;
    let (rabbit, channel) = connect(&vhost).await;
    let config = config();
    declare(&channel, &spec(&config)).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let calls = calls.clone();
        move |msg: Incoming| {
            let n = {
                let mut calls = calls.lock().unwrap();
                calls.push(msg.attempts);
                calls.len()
            };
            async move {
                if n <= 4 {
                    Outcome::Unavailable
                } else {
                    Outcome::Ack
                }
            }
        }
    };
    let stop = CancellationToken::new();
    let broker = broker(&vhost);
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        config,
        &["test.work.#"],
        handler,
        stop.clone(),
    );
    publish(&rabbit, "m-1", b"{}").await;
    eventually(WAIT, "acked on the fifth call", || async {
        (calls.lock().unwrap().len() == 5 && depth(&rabbit, QUEUE).await? == 0).then_some(())
    })
    .await;
    assert_eq!(*calls.lock().unwrap(), [0, 0, 0, 0, 0]);
    assert_eq!(
        depth(&rabbit, &topology::dead_letter_queue(QUEUE)).await,
        Some(0)
    );
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
}

/// The broker's backstop: a consumer that never settles a message (it crashes each time, here
/// a raw consumer that nacks with requeue) gets it at most `x-delivery-limit` + 1 times; then the
/// broker dead-letters it to the DLQ (at least once), where `x-death` says why.
#[tokio::test]
async fn the_broker_dead_letters_a_message_nobody_settles_at_the_delivery_limit() {
    let vhost = TestVhost::create().await;
    let (rabbit, channel) = connect(&vhost).await;
    let mut config = config();
    config.delivery_limit = 2;
    declare(&channel, &spec(&config)).await;
    publish(&rabbit, "crash-loop", b"{}").await;

    let consuming = rabbit.channel().await;
    let mut consumer = consuming
        .basic_consume(
            QUEUE.into(),
            "crasher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    let dead = loop {
        if let Some(m) = take_dead_letter(&channel).await {
            break m;
        }
        assert!(deliveries < 10, "the delivery limit never applied");
        let next = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        if let Ok(Some(Ok(delivery))) = next {
            deliveries += 1;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .unwrap();
        }
    };
    assert_eq!(deliveries, 3, "delivered limit + 1 times");
    let first_death_reason = text(&dead, "x-first-death-reason");
    assert_eq!(first_death_reason.as_deref(), Some("delivery_limit"));
}

/// A DLQ that refuses (full, `reject-publish`) must not cost the message, nor spin it: the
/// consumer keeps it unacked and tries the DLQ again after a backoff, and once there is room it
/// lands there, handled once.
#[tokio::test]
async fn a_message_the_full_dlq_refuses_is_held_until_there_is_room() {
    let vhost = TestVhost::create().await;
    let (rabbit, channel) = connect(&vhost).await;
    let config = config();
    let mut spec = spec(&config);
    spec.dead_letter_max_length = 1;
    declare(&channel, &spec).await;
    // Fill the DLQ until it refuses: a quorum queue applies `reject-publish` once it is at its
    // limit, so the first message (or two) still get in.
    let mut fillers = 0;
    loop {
        let filled = keel_amqp::publisher::publish_confirmed(
            &channel,
            "keel.dlx",
            QUEUE,
            b"filler",
            BasicProperties::default(),
        )
        .await;
        if filled.is_err() {
            break;
        }
        fillers += 1;
        assert!(fillers < 5, "the DLQ never refused");
    }
    let calls = Arc::new(Mutex::new(0_u32));
    let handler = {
        let calls = calls.clone();
        move |_msg: Incoming| {
            *calls.lock().unwrap() += 1;
            async { Outcome::reject("poison") }
        }
    };
    let stop = CancellationToken::new();
    let broker = broker(&vhost);
    let consumer = tokio::spawn(keel_amqp::consumer::run(
        broker.clone(),
        spec,
        config,
        handler,
        stop.clone(),
    ));
    publish(&rabbit, "poison", b"{}").await;
    eventually(WAIT, "the poison message handled", || async {
        (*calls.lock().unwrap() == 1).then_some(())
    })
    .await;
    // Held, not lost: the fillers are all the DLQ has, and the queue has nothing ready.
    assert_eq!(
        depth(&rabbit, &topology::dead_letter_queue(QUEUE)).await,
        Some(fillers)
    );
    assert_eq!(depth(&rabbit, QUEUE).await, Some(0));
    // Make room: the held message gets in.
    for _ in 0..fillers {
        assert_eq!(
            take_dead_letter(&channel).await.unwrap().delivery.data,
            b"filler"
        );
    }
    let dead = eventually(WAIT, "the poison message in the DLQ", || async {
        take_dead_letter(&channel).await
    })
    .await;
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "poison"
    );
    assert_eq!(*calls.lock().unwrap(), 1, "handled once, never redelivered");
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
}
