//! `keelctl dlq` and `keelctl queues` against a real broker (P01): each test has its own vhost
//! (`TestVhost`), dead-letters messages the two ways production does — Keel's consumer
//! rejecting them (`x-keel-*` headers) and the broker at the delivery limit (`x-death`) — and
//! then reads, replays and purges them as the operator would.
//!
//! keelctl connects as a user with exactly `keel_operator`'s permissions
//! (`keel_amqp::definitions::Permissions::operator`: read every queue, publish to
//! `keel.events` and `keel.retry`, configure nothing), so every test also proves those
//! permissions are enough. The arranging (declaring, publishing, consuming) is done as guest.
//!
//! What is proven: a listing shows why and when each message died and removes nothing; the
//! filters select; `show` has every header and the body; a dry run changes nothing; a replay
//! by id sends exactly that message back into the queue where it failed (through
//! `keel.retry`) with its message id and its attempts reset, acked out of the DLQ only then;
//! `--to-queue` reaches the queue it names alone, `--to-original` every queue bound to the
//! recorded routing key; a dead letter a service planted with a forged original route (a
//! billing event) goes, by default, only back into that service's queue, where with
//! `--to-original` it would have reached billing's consumers; `keel.unrouted`'s messages go
//! nowhere unless a queue or `--to-original` is named, and there by the route the broker kept;
//! a replay without a selector and a purge without `--yes` off a terminal, or of a consumer
//! queue, are refused (exit 64); `purge --yes` empties the DLQ; `queues` reports depths,
//! consumers, DLQs, tiers and what is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as Age, Utc};
use keel_amqp::definitions::{Permissions, ServiceAccess, password_hash};
use keel_amqp::topology::{self, QueueSpec, headers};
use keel_amqp::{AmqpConfig, Broker, ConsumerConfig, Incoming, Outcome};
use keel_testkit::{TestUser, TestVhost, eventually};
use keelctl::dlq::{
    self, Body, DeadLetter, DeadLetterQueue, Destination, Filter, ReplayRequest, Selection,
    TopicPattern,
};
use keelctl::queues::{self, ConsumerQueue};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");
const WAIT: Duration = Duration::from_secs(30);
/// How long a browse waits for one more message (the tests' `[dlq] idle_timeout`).
const IDLE: Duration = Duration::from_millis(500);
/// The consumer queue every test dead-letters from (its service: `fixture`).
const QUEUE: &str = "fixture.work";
const DLQ: &str = "fixture.work.dlq";
const TIER: Duration = Duration::from_millis(200);
/// Low, so the broker's own dead-lettering takes three deliveries.
const DELIVERY_LIMIT: u32 = 2;

fn spec(queue: &str) -> QueueSpec {
    QueueSpec {
        name: queue.into(),
        bindings: vec!["fixture.#".into()],
        delivery_limit: DELIVERY_LIMIT,
        max_length: 10_000,
        retry_tiers: vec![TIER],
        dead_letter_max_length: 1000,
    }
}

/// A vhost with `fixture.work` (its tier and DLQ) declared, a guest channel to arrange with,
/// and keelctl's connection as the operator.
struct Rig {
    vhost: TestVhost,
    operator: TestUser,
    /// Guest: declares, publishes, consumes, as the services would.
    admin: Connection,
    channel: Channel,
    /// keelctl's connection, as the operator.
    keelctl: Connection,
}

impl Rig {
    async fn new() -> Self {
        let vhost = TestVhost::create().await;
        let admin = Connection::connect(&vhost.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = admin.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology::declare_queue(&channel, &spec(QUEUE))
            .await
            .unwrap();
        let operator = operator(&vhost).await;
        let keelctl = keelctl::connect_broker(&operator.url.clone().into(), WAIT)
            .await
            .expect("the operator's permissions let keelctl connect");
        Self {
            vhost,
            operator,
            admin,
            channel,
            keelctl,
        }
    }

    /// Publishes to `keel.events` as a service's relay would.
    async fn publish(&self, message_id: &str, routing_key: &str, body: &Value) {
        keel_amqp::publisher::publish_confirmed(
            &self.channel,
            topology::EXCHANGE,
            routing_key,
            &serde_json::to_vec(body).unwrap(),
            BasicProperties::default()
                .with_message_id(message_id.into())
                .with_type(routing_key.into())
                .with_content_type("application/json".into())
                .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap()),
        )
        .await
        .unwrap();
    }

    async fn depth(&self, queue: &str) -> u32 {
        let p = queues::probe(&self.admin, queue).await.unwrap();
        assert!(p.exists, "{queue} exists");
        p.messages
    }

    /// Waits until `queue` holds `n` ready messages.
    async fn wait_depth(&self, queue: &str, n: u32) {
        eventually(
            WAIT,
            &format!("{queue} holds {n} ready messages"),
            || async { (self.depth(queue).await == n).then_some(()) },
        )
        .await;
    }

    /// Dead-letters each `(message id, routing key, reason)` through Keel's consumer, whose
    /// handler rejects it with that reason.
    async fn reject(&self, messages: &[(&str, &str, &str)]) {
        let before = self.depth(DLQ).await;
        let reasons: Arc<HashMap<String, String>> = Arc::new(
            messages
                .iter()
                .map(|(id, _, reason)| ((*id).to_owned(), (*reason).to_owned()))
                .collect(),
        );
        let handler = move |msg: Incoming| {
            let reason = msg
                .message_id
                .as_ref()
                .and_then(|id| reasons.get(id).cloned())
                .unwrap_or_else(|| "unexpected message".to_owned());
            async move { Outcome::reject(reason) }
        };
        let stop = CancellationToken::new();
        let broker = Broker::spawn(
            AmqpConfig {
                url: self.vhost.url().into(),
                connect_timeout: Duration::from_secs(2),
                max_backoff: Duration::from_millis(200),
            },
            "keelctl-dlq-test",
            stop.clone(),
        );
        let consumer = keel_amqp::consumer::spawn(
            broker.clone(),
            consumer_config(),
            &["fixture.#"],
            handler,
            stop.clone(),
        );
        for (id, key, _) in messages {
            self.publish(id, key, &json!({ "id": id })).await;
        }
        let n = u32::try_from(messages.len()).unwrap();
        self.wait_depth(DLQ, before + n).await;
        stop.cancel();
        consumer.await.unwrap();
        broker.close().await;
    }

    /// Dead-letters one message the way the broker does: a consumer that never settles it
    /// (nack and requeue, as a crash loop would) until `x-delivery-limit` is reached.
    async fn crash_loop(&self, message_id: &str, routing_key: &str) {
        let before = self.depth(DLQ).await;
        self.publish(message_id, routing_key, &json!({ "id": message_id }))
            .await;
        let channel = self.admin.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                QUEUE.into(),
                "crasher".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut deliveries = 0;
        for round in 0.. {
            if self.depth(DLQ).await > before {
                break;
            }
            assert!(
                deliveries <= DELIVERY_LIMIT + 1 && round < 100,
                "the delivery limit never applied"
            );
            if let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
            {
                deliveries += 1;
                d.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .unwrap();
            }
        }
        channel.close(200, "done".into()).await.unwrap();
    }

    /// Takes (acks) every ready message of `queue`: (exchange, routing key, properties).
    async fn drain(&self, queue: &str) -> Vec<(String, String, BasicProperties)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push((
                m.delivery.exchange.to_string(),
                m.delivery.routing_key.to_string(),
                m.delivery.properties.clone(),
            ));
            assert!(out.len() < 100, "bounded");
        }
        out
    }
}

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        queue: QUEUE.into(),
        prefetch: 4,
        concurrency: 2,
        delivery_limit: DELIVERY_LIMIT,
        max_length: 10_000,
        retry_tiers: vec![TIER],
        dead_letter_max_length: 1000,
        retry_max_backoff: Duration::from_millis(100),
        depth_interval: Duration::from_secs(1),
    }
}

/// A user of this vhost with exactly `keel_operator`'s permissions.
async fn operator(vhost: &TestVhost) -> TestUser {
    let p = Permissions::operator();
    let topics: Vec<Value> = p
        .topics
        .iter()
        .map(|(exchange, write, read)| json!({"exchange": exchange, "write": write, "read": read}))
        .collect();
    let password = "operator-test";
    vhost
        .user(
            "operator",
            password,
            &password_hash("operator", password),
            json!({"configure": p.configure, "write": p.write, "read": p.read}),
            &topics,
        )
        .await
}

fn fixture() -> Vec<DeadLetterQueue> {
    vec![DeadLetterQueue::of(QUEUE)]
}

/// Lists `fixture.work.dlq`, then waits until the broker has made every browsed message ready
/// again (it returns them when the browse's channel closes, asynchronously), so the next
/// browse sees them all.
async fn list(rig: &Rig, filter: &Filter) -> Vec<DeadLetter> {
    let before = rig.depth(DLQ).await;
    let rows = dlq::list(&rig.keelctl, &fixture(), filter, 1000, IDLE)
        .await
        .unwrap()
        .rows;
    rig.wait_depth(DLQ, before).await;
    rows
}

fn ids(rows: &[DeadLetter]) -> Vec<String> {
    let mut ids: Vec<String> = rows.iter().filter_map(|r| r.message_id.clone()).collect();
    ids.sort();
    ids
}

fn header(p: &BasicProperties, name: &str) -> Option<AMQPValue> {
    p.headers().as_ref()?.inner().get(name).cloned()
}

fn request(selection: Selection) -> ReplayRequest {
    ReplayRequest {
        queues: fixture(),
        selection,
        destination: Destination::default(),
        dry_run: false,
        rate: 1000,
        limit: 1000,
        idle: IDLE,
    }
}

fn by_id(id: &str) -> Selection {
    Selection::new(
        false,
        Filter {
            ids: vec![id.to_owned()],
            ..Filter::default()
        },
    )
    .unwrap()
}

/// Two messages rejected by their handler and one dead-lettered by the broker.
async fn three_dead_letters(rig: &Rig) {
    rig.reject(&[
        (
            "order-1",
            "fixture.order.placed",
            "body is not an event envelope",
        ),
        (
            "pay-1",
            "fixture.payment.failed",
            "unknown schema version 9",
        ),
    ])
    .await;
    rig.crash_loop("crash-1", "fixture.order.cancelled").await;
    rig.wait_depth(DLQ, 3).await;
}

#[tokio::test]
async fn a_listing_shows_why_each_message_died_and_leaves_every_one_in_the_dlq() {
    let rig = Rig::new().await;
    three_dead_letters(&rig).await;

    let rows = list(&rig, &Filter::default()).await;
    assert_eq!(ids(&rows), ["crash-1", "order-1", "pay-1"]);
    let row = |id: &str| {
        rows.iter()
            .find(|r| r.message_id.as_deref() == Some(id))
            .unwrap()
    };

    let order = row("order-1");
    assert_eq!(order.queue, DLQ);
    assert_eq!(order.origin.as_ref().unwrap().exchange, "keel.events");
    assert_eq!(
        order.origin.as_ref().unwrap().routing_key,
        "fixture.order.placed"
    );
    assert_eq!(order.failure, "rejected");
    assert_eq!(
        order.error.as_deref(),
        Some("body is not an event envelope")
    );
    assert_eq!(order.attempts, Some(1));
    assert_eq!(order.consumer_queue.as_deref(), Some(QUEUE));
    assert_eq!(order.size, br#"{"id":"order-1"}"#.len());
    assert!(order.age_seconds.unwrap() < 600, "died just now");

    // The broker's dialect: x-death, no attempts counted by a consumer.
    let crash = row("crash-1");
    assert_eq!(
        crash.origin.as_ref().unwrap().routing_key,
        "fixture.order.cancelled"
    );
    assert_eq!(crash.failure, "delivery_limit");
    assert!(crash.error.as_ref().unwrap().contains("delivery_limit"));
    assert_eq!(crash.attempts, None);
    assert!(crash.failed_at.is_some());

    // Read, not taken: all three are back, ready.
    rig.wait_depth(DLQ, 3).await;
    assert_eq!(ids(&list(&rig, &Filter::default()).await).len(), 3);

    let table = dlq::list_table(&rows);
    for line in table.lines() {
        assert!(line.chars().count() <= 100, "fits 100 columns: {line}");
    }
    for cell in [
        "order-1",
        "fixture.payment.failed",
        "delivery_limit",
        "rejected",
    ] {
        assert!(table.contains(cell), "{cell} in\n{table}");
    }
}

#[tokio::test]
async fn filters_select_by_routing_key_error_id_and_age() {
    let rig = Rig::new().await;
    three_dead_letters(&rig).await;
    // One that first failed two hours ago, as the consumer would have written it.
    let mut h = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let two_hours_ago = (Utc::now() - Age::hours(2)).to_rfc3339();
    h.insert(headers::FIRST_FAILURE.into(), text(&two_hours_ago));
    h.insert(headers::ORIGINAL_EXCHANGE.into(), text("keel.events"));
    h.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text("fixture.payment.refunded"),
    );
    h.insert(headers::ERROR.into(), text("timeout talking to the ledger"));
    h.insert(headers::FAILURE.into(), text("retries_exhausted"));
    keel_amqp::publisher::publish_confirmed(
        &rig.channel,
        topology::DEAD_LETTER_EXCHANGE,
        QUEUE,
        b"{}",
        BasicProperties::default()
            .with_message_id("old-1".into())
            .with_headers(h),
    )
    .await
    .unwrap();
    rig.wait_depth(DLQ, 4).await;

    let pattern = |p: &str| Filter {
        routing_key: Some(TopicPattern::parse(p).unwrap()),
        ..Filter::default()
    };
    assert_eq!(
        ids(&list(&rig, &pattern("fixture.order.*")).await),
        ["crash-1", "order-1"]
    );
    assert_eq!(ids(&list(&rig, &pattern("#.refunded")).await), ["old-1"]);
    let error = |e: &str| Filter {
        error: Some(e.into()),
        ..Filter::default()
    };
    assert_eq!(ids(&list(&rig, &error("SCHEMA")).await), ["pay-1"]);
    assert_eq!(
        ids(&list(&rig, &error("delivery_limit")).await),
        ["crash-1"]
    );
    let older = |d: Duration| Filter {
        older_than: Some(d),
        ..Filter::default()
    };
    assert_eq!(
        ids(&list(&rig, &older(Duration::from_secs(3600))).await),
        ["old-1"]
    );
    assert_eq!(list(&rig, &older(Duration::ZERO)).await.len(), 4);
    let both = Filter {
        ids: vec!["order-1".into(), "pay-1".into()],
        routing_key: Some(TopicPattern::parse("fixture.payment.*").unwrap()),
        ..Filter::default()
    };
    assert_eq!(
        ids(&list(&rig, &both).await),
        ["pay-1"],
        "every condition holds"
    );
    rig.wait_depth(DLQ, 4).await;
}

#[tokio::test]
async fn show_prints_every_header_x_death_included_and_the_body() {
    let rig = Rig::new().await;
    three_dead_letters(&rig).await;

    let shown = dlq::show(&rig.keelctl, &fixture(), "crash-1", 1000, IDLE)
        .await
        .unwrap()
        .expect("crash-1 is in the DLQ");
    assert_eq!(shown.properties["message_id"], "crash-1");
    assert_eq!(shown.headers["x-first-death-reason"], "delivery_limit");
    assert_eq!(
        shown.headers["x-death"][0]["routing-keys"][0],
        "fixture.order.cancelled"
    );
    match &shown.body {
        Body::Json { value } => assert_eq!(value, &json!({ "id": "crash-1" })),
        Body::Text { .. } => panic!("the body is JSON"),
    }
    rig.wait_depth(DLQ, 3).await;
    let text = dlq::show_text(&shown);
    for line in [
        "x-death[0].reason",
        "x-death[0].routing-keys[0]",
        "fixture.order.cancelled",
        "\"id\": \"crash-1\"",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    let rejected = dlq::show(&rig.keelctl, &fixture(), "order-1", 1000, IDLE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rejected.headers[headers::ERROR],
        "body is not an event envelope"
    );
    assert_eq!(rejected.headers[headers::ATTEMPTS], 1);
    rig.wait_depth(DLQ, 3).await;
    assert!(
        dlq::show(&rig.keelctl, &fixture(), "nosuch", 1000, IDLE)
            .await
            .unwrap()
            .is_none()
    );
    rig.wait_depth(DLQ, 3).await;
}

#[tokio::test]
async fn a_dry_run_says_what_it_would_replay_and_changes_nothing() {
    let rig = Rig::new().await;
    three_dead_letters(&rig).await;

    let mut dry = request(Selection::new(true, Filter::default()).unwrap());
    dry.dry_run = true;
    let summary = dlq::replay(&rig.keelctl, &dry).await.unwrap();
    assert_eq!(
        (summary.replayed, summary.skipped, summary.failed),
        (3, 0, 0)
    );
    assert!(
        summary
            .messages
            .iter()
            .all(|m| m.outcome == dlq::Outcome::WouldReplay)
    );
    rig.wait_depth(DLQ, 3).await;
    assert_eq!(rig.depth(QUEUE).await, 0, "nothing was published");
}

#[tokio::test]
async fn replaying_one_message_sends_it_back_to_its_queue_with_its_id_and_attempts_reset() {
    let rig = Rig::new().await;
    three_dead_letters(&rig).await;

    let summary = dlq::replay(&rig.keelctl, &request(by_id("order-1")))
        .await
        .unwrap();
    assert_eq!(
        (summary.replayed, summary.skipped, summary.failed),
        (1, 2, 0)
    );
    // Acked out of the DLQ; the other two stay.
    rig.wait_depth(DLQ, 2).await;
    let back = rig.drain(QUEUE).await;
    assert_eq!(back.len(), 1);
    let (exchange, routing_key, props) = &back[0];
    // Into the queue whose DLQ it was in, by the retry exchange's binding for that queue.
    assert_eq!(exchange, "keel.retry");
    assert_eq!(routing_key, QUEUE);
    assert_eq!(
        header(props, headers::ORIGINAL_ROUTING_KEY),
        Some(AMQPValue::LongString("fixture.order.placed".into())),
        "the consumer still sees the event's routing key"
    );
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        "order-1",
        "the same message id: the consumer's inbox knows it, if it ever committed"
    );
    assert_eq!(
        header(props, headers::ATTEMPTS),
        Some(AMQPValue::LongLongInt(0))
    );
    assert_eq!(
        header(props, headers::REPLAYS),
        Some(AMQPValue::LongLongInt(1))
    );

    // The broker's dead letter goes back the same way; its x-death route is recorded for the
    // consumer as the one the consumer writes would be.
    let summary = dlq::replay(&rig.keelctl, &request(by_id("crash-1")))
        .await
        .unwrap();
    assert_eq!(summary.replayed, 1);
    rig.wait_depth(DLQ, 1).await;
    let back = rig.drain(QUEUE).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].1, QUEUE);
    assert_eq!(
        header(&back[0].2, headers::ORIGINAL_ROUTING_KEY),
        Some(AMQPValue::LongString("fixture.order.cancelled".into()))
    );
    assert_eq!(back[0].2.message_id().as_ref().unwrap().as_str(), "crash-1");
    assert_eq!(
        rig.drain(DLQ).await[0]
            .2
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "pay-1"
    );
}

#[tokio::test]
async fn a_replayed_message_reaches_the_fixed_handler_once_as_a_first_attempt() {
    let rig = Rig::new().await;
    rig.reject(&[("order-1", "fixture.order.placed", "bug, since fixed")])
        .await;
    dlq::replay(&rig.keelctl, &request(by_id("order-1")))
        .await
        .unwrap();
    // The fixed handler sees it once, as a first attempt.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = {
        let seen = seen.clone();
        move |msg: Incoming| {
            seen.lock().unwrap().push((
                msg.message_id.clone(),
                msg.attempts,
                msg.routing_key.clone(),
            ));
            async { Outcome::Ack }
        }
    };
    let stop = CancellationToken::new();
    let broker = Broker::spawn(
        AmqpConfig {
            url: rig.vhost.url().into(),
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(200),
        },
        "keelctl-dlq-test",
        stop.clone(),
    );
    let consumer = keel_amqp::consumer::spawn(
        broker.clone(),
        consumer_config(),
        &["fixture.#"],
        handler,
        stop.clone(),
    );
    eventually(WAIT, "the replay handled", || async {
        (!seen.lock().unwrap().is_empty() && rig.depth(QUEUE).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    consumer.await.unwrap();
    broker.close().await;
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            Some("order-1".to_owned()),
            0,
            "fixture.order.placed".to_owned()
        )]
    );
    assert_eq!(rig.depth(DLQ).await, 0);
}

#[tokio::test]
async fn to_queue_reaches_that_consumer_queue_and_no_other() {
    let rig = Rig::new().await;
    // A second consumer of the same events.
    let other = "other.work";
    topology::declare_queue(&rig.channel, &spec(other))
        .await
        .unwrap();
    rig.reject(&[
        ("order-1", "fixture.order.placed", "rejected"),
        ("order-2", "fixture.order.placed", "rejected"),
        ("order-3", "fixture.order.placed", "rejected"),
    ])
    .await;
    // other.work has no consumer: the originals wait there, processed or not.
    rig.channel
        .queue_purge(other.into(), QueuePurgeOptions::default())
        .await
        .unwrap();

    // --to-queue: the queue named, through keel.retry, and no other.
    let mut to_other = request(by_id("order-1"));
    to_other.destination = Destination::Queue(other.into());
    let summary = dlq::replay(&rig.keelctl, &to_other).await.unwrap();
    assert_eq!(summary.replayed, 1);
    let to = summary.messages[0].to.clone().unwrap();
    assert_eq!(
        (to.exchange.as_str(), to.routing_key.as_str()),
        ("keel.retry", other)
    );
    rig.wait_depth(other, 1).await;
    assert_eq!(rig.depth(QUEUE).await, 0, "--to-queue reaches one queue");
    let back = rig.drain(other).await;
    assert_eq!(
        header(&back[0].2, headers::ORIGINAL_ROUTING_KEY),
        Some(AMQPValue::LongString("fixture.order.placed".into())),
        "the consumer still sees the event's routing key"
    );

    // The default: the queue where it failed, and no other.
    rig.wait_depth(DLQ, 2).await;
    dlq::replay(&rig.keelctl, &request(by_id("order-2")))
        .await
        .unwrap();
    rig.wait_depth(QUEUE, 1).await;
    assert_eq!(rig.depth(other).await, 0, "the default reaches one queue");
    rig.drain(QUEUE).await;

    // --to-original: every queue bound to the recorded routing key gets the copy.
    rig.wait_depth(DLQ, 1).await;
    let mut original = request(by_id("order-3"));
    original.destination = Destination::Original;
    let summary = dlq::replay(&rig.keelctl, &original).await.unwrap();
    let to = summary.messages[0].to.clone().unwrap();
    assert_eq!(
        (to.exchange.as_str(), to.routing_key.as_str()),
        ("keel.events", "fixture.order.placed")
    );
    rig.wait_depth(QUEUE, 1).await;
    rig.wait_depth(other, 1).await;
    rig.wait_depth(DLQ, 0).await;
}

/// A user of this vhost with exactly the permissions the definitions file gives a service
/// named `fixture` that consumes `fixture.work` and publishes `fixture.#`.
async fn fixture_service(vhost: &TestVhost) -> TestUser {
    let p = Permissions::for_service(&ServiceAccess {
        service: "fixture".into(),
        publishes: vec!["fixture.#".into()],
        queues: vec![spec(QUEUE)],
    });
    let topics: Vec<Value> = p
        .topics
        .iter()
        .map(|(exchange, write, read)| json!({"exchange": exchange, "write": write, "read": read}))
        .collect();
    let password = "fixture-test";
    vhost
        .user(
            "fixture",
            password,
            &password_hash("fixture", password),
            json!({"configure": p.configure, "write": p.write, "read": p.read}),
            &topics,
        )
        .await
}

/// A dead letter that claims to be a captured payment: the headers Keel's consumer writes,
/// naming `keel.events` and `billing.payment.captured`, and a billing event's body.
fn forged(message_id: &str) -> (Vec<u8>, BasicProperties) {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut h = FieldTable::default();
    h.insert(headers::ORIGINAL_EXCHANGE.into(), text("keel.events"));
    h.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text("billing.payment.captured"),
    );
    h.insert(headers::FAILURE.into(), text("retries_exhausted"));
    h.insert(headers::ERROR.into(), text("smtp timeout"));
    h.insert(headers::QUEUE.into(), text(QUEUE));
    let body = json!({ "type": "billing.payment.captured", "data": { "amount_minor": 1 } });
    (
        serde_json::to_vec(&body).unwrap(),
        BasicProperties::default()
            .with_message_id(message_id.into())
            .with_type("billing.payment.captured".into())
            .with_headers(h),
    )
}

/// A classic queue bound to `billing.#` on `keel.events`: what a billing consumer would get.
async fn billing_spy(rig: &Rig) -> &'static str {
    const SPY: &str = "billing.spy";
    rig.channel
        .queue_declare(
            SPY.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    rig.channel
        .queue_bind(
            SPY.into(),
            topology::EXCHANGE.into(),
            "billing.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    SPY
}

#[tokio::test]
async fn a_dead_letter_with_a_forged_origin_goes_back_to_its_own_queue_not_to_billing() {
    let rig = Rig::new().await;
    let spy = billing_spy(&rig).await;
    // A compromised fixture service, with exactly its own broker permissions.
    let service = fixture_service(&rig.vhost).await;
    let conn = Connection::connect(&service.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let plant = |id: &'static str| {
        let channel = channel.clone();
        async move {
            let (body, props) = forged(id);
            // keel.dlx with its own queue's key: what its consumer does when it dead-letters.
            keel_amqp::publisher::publish_confirmed(
                &channel,
                topology::DEAD_LETTER_EXCHANGE,
                QUEUE,
                &body,
                props,
            )
            .await
            .expect("a service may dead-letter into its own DLQ")
        }
    };
    // It cannot publish a billing event itself: the topic permission refuses it.
    let own = conn.create_channel().await.unwrap();
    own.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (body, props) = forged("direct-1");
    let direct = keel_amqp::publisher::publish_confirmed(
        &own,
        topology::EXCHANGE,
        "billing.payment.captured",
        &body,
        props,
    )
    .await;
    assert!(direct.is_err(), "not a publisher of billing.#: {direct:?}");

    // The failure: following the headers (the old default, now `--to-original`), the
    // operator's replay publishes the forged event to billing's consumers.
    plant("forged-1").await;
    rig.wait_depth(DLQ, 1).await;
    let listed = list(&rig, &Filter::default()).await;
    assert_eq!(
        listed[0].origin.as_ref().unwrap().routing_key,
        "billing.payment.captured",
        "the listing shows what the message claims"
    );
    let mut follow_headers = request(by_id("forged-1"));
    follow_headers.destination = Destination::Original;
    let summary = dlq::replay(&rig.keelctl, &follow_headers).await.unwrap();
    assert_eq!(summary.replayed, 1);
    let got = rig.drain(spy).await;
    assert_eq!(got.len(), 1, "billing got a payment nobody captured");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str()),
        ("keel.events", "billing.payment.captured")
    );
    assert_eq!(got[0].2.message_id().as_ref().unwrap().as_str(), "forged-1");

    // The default: back into the queue whose DLQ it was in; billing gets nothing.
    plant("forged-2").await;
    rig.wait_depth(DLQ, 1).await;
    let summary = dlq::replay(
        &rig.keelctl,
        &request(Selection::new(true, Filter::default()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.replayed, summary.skipped, summary.failed),
        (1, 0, 0)
    );
    let to = summary.messages[0].to.clone().unwrap();
    assert_eq!(
        (to.exchange.as_str(), to.routing_key.as_str()),
        ("keel.retry", QUEUE)
    );
    rig.wait_depth(DLQ, 0).await;
    let back = rig.drain(QUEUE).await;
    assert_eq!(back.len(), 1);
    assert_eq!(
        back[0].2.message_id().as_ref().unwrap().as_str(),
        "forged-2"
    );
    // The copy was confirmed, so routed: a classic queue would hold it by now.
    assert!(rig.drain(spy).await.is_empty(), "billing got nothing");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_keel_unrouted_message_is_replayed_only_where_the_operator_names_by_the_brokers_route() {
    let rig = Rig::new().await;
    let spy = billing_spy(&rig).await;
    // Published to a key nobody is bound to, claiming in its headers to be a billing event.
    let (body, props) = forged("lost-1");
    keel_amqp::publisher::publish_confirmed(
        &rig.channel,
        topology::EXCHANGE,
        "late.order.placed",
        &body,
        props,
    )
    .await
    .unwrap();
    rig.wait_depth(topology::UNROUTED_QUEUE, 1).await;
    let unrouted = || {
        let mut r = request(by_id("lost-1"));
        r.queues = vec![DeadLetterQueue::unrouted()];
        r
    };

    // No consumer queue failed it: the default has nowhere to send it.
    let summary = dlq::replay(&rig.keelctl, &unrouted()).await.unwrap();
    assert_eq!(
        (summary.replayed, summary.skipped, summary.failed),
        (0, 1, 0)
    );
    match &summary.messages[0].outcome {
        dlq::Outcome::Skipped { reason } => {
            assert!(
                reason.contains("--to-queue") && reason.contains("--to-original"),
                "says how: {reason}"
            );
        }
        other => panic!("skipped, not {other:?}"),
    }
    rig.wait_depth(topology::UNROUTED_QUEUE, 1).await;

    // A queue binds to its key later; --to-original delivers it there, by the key it was
    // published with (the broker's record), not the one its headers claim.
    let late = "late.work";
    let mut late_spec = spec(late);
    late_spec.bindings = vec!["late.#".into()];
    topology::declare_queue(&rig.channel, &late_spec)
        .await
        .unwrap();
    let mut original = unrouted();
    original.destination = Destination::Original;
    let summary = dlq::replay(&rig.keelctl, &original).await.unwrap();
    assert_eq!(summary.replayed, 1, "{summary:?}");
    let to = summary.messages[0].to.clone().unwrap();
    assert_eq!(
        (to.exchange.as_str(), to.routing_key.as_str()),
        ("keel.events", "late.order.placed")
    );
    rig.wait_depth(late, 1).await;
    assert!(rig.drain(spy).await.is_empty(), "billing got nothing");
    rig.wait_depth(topology::UNROUTED_QUEUE, 0).await;

    // --to-queue: the queue named.
    rig.publish("lost-2", "nobody.listens.here", &json!({}))
        .await;
    rig.wait_depth(topology::UNROUTED_QUEUE, 1).await;
    let mut to_queue = unrouted();
    to_queue.selection = by_id("lost-2");
    to_queue.destination = Destination::Queue(QUEUE.into());
    let summary = dlq::replay(&rig.keelctl, &to_queue).await.unwrap();
    assert_eq!(summary.replayed, 1, "{summary:?}");
    rig.wait_depth(QUEUE, 1).await;
    rig.wait_depth(topology::UNROUTED_QUEUE, 0).await;
}

#[tokio::test]
async fn queues_reports_depth_consumers_dead_letters_tiers_and_what_is_missing() {
    let rig = Rig::new().await;
    rig.reject(&[("order-1", "fixture.order.placed", "rejected")])
        .await;
    rig.publish("ready-1", "fixture.order.placed", &json!({}))
        .await;
    // An event nobody is bound to is kept in keel.unrouted.
    rig.publish("lost-1", "nobody.listens.here", &json!({}))
        .await;
    rig.wait_depth(topology::UNROUTED_QUEUE, 1).await;

    let consumed = [
        ConsumerQueue {
            service: "fixture".into(),
            queue: QUEUE.into(),
        },
        ConsumerQueue {
            service: "ghost".into(),
            queue: "ghost.work".into(),
        },
    ];
    let tiers = [TIER, Duration::from_secs(60)];
    let rows = queues::status(&rig.keelctl, &consumed, &tiers)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let work = &rows[0];
    assert!(work.exists);
    assert_eq!((work.ready, work.consumers), (1, 0));
    assert_eq!(work.dead_letters.as_ref().unwrap().messages, 1);
    assert_eq!(work.retry_tiers.len(), 2);
    assert!(work.retry_tiers[0].exists);
    assert_eq!(work.missing(), ["fixture.work.retry.60s"]);
    let ghost = &rows[1];
    assert!(
        !ghost.exists,
        "a queue nobody declared is missing, not an error"
    );
    assert_eq!(ghost.missing().len(), 4);
    let unrouted = &rows[2];
    assert_eq!(unrouted.queue, "keel.unrouted");
    assert_eq!(unrouted.ready, 1);
    assert!(unrouted.dead_letters.is_none());

    let table = queues::table(&rows).to_string();
    assert!(table.contains("missing"), "{table}");

    // keel.unrouted's messages are dead letters too: kept as published, replayable.
    let lost = dlq::list(
        &rig.keelctl,
        &[DeadLetterQueue::unrouted()],
        &Filter::default(),
        50,
        IDLE,
    )
    .await
    .unwrap()
    .rows;
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].failure, "unrouted");
    assert_eq!(
        lost[0].origin.as_ref().unwrap().routing_key,
        "nobody.listens.here"
    );
}

// ---- the binary: exit codes and output, as an operator runs it ----

/// A scratch registry with one service, `fixture`, consuming `fixture.work`.
fn scratch_registry() -> PathBuf {
    let path = std::env::temp_dir().join(format!("keelctl-dlq-registry-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        "[[service]]\nname = \"fixture\"\nports = { http = 18998 }\nbroker = true\n\
         consumes = [\"fixture.work\"]\nready = \"http://127.0.0.1:{fixture.http}/readyz\"\n",
    )
    .unwrap();
    path
}

/// Runs keelctl with `args` against `rig`'s vhost as the operator; stdin is not a terminal.
fn keelctl(rig: &Rig, registry: &PathBuf, args: &[&str]) -> Output {
    let mut cmd = Command::new(KEELCTL);
    cmd.arg("--registry").arg(registry).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.env("KEEL_RABBITMQ__URL", &rig.operator.url)
        .env("KEEL_DLQ__IDLE_TIMEOUT", "500ms")
        .stdin(Stdio::null());
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

#[tokio::test]
async fn the_binary_refuses_a_replay_without_selector_and_a_purge_it_cannot_confirm() {
    let rig = Rig::new().await;
    let registry = scratch_registry();
    rig.reject(&[
        ("order-1", "fixture.order.placed", "rejected"),
        ("order-2", "fixture.order.placed", "rejected"),
    ])
    .await;

    let out = keelctl(&rig, &registry, &["dlq", "replay"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--all"), "says how to select");
    let out = keelctl(&rig, &registry, &["dlq", "replay", "--all", "--id", "x"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "--all with a selector is ambiguous"
    );
    let out = keelctl(
        &rig,
        &registry,
        &[
            "dlq",
            "replay",
            "--all",
            "--to-queue",
            QUEUE,
            "--to-original",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "one destination at most");

    let out = keelctl(&rig, &registry, &["dlq", "purge", "--queue", DLQ]);
    assert_eq!(out.status.code(), Some(64), "no terminal, no --yes");
    assert!(stderr(&out).contains("--yes"));
    let out = keelctl(
        &rig,
        &registry,
        &["dlq", "purge", "--queue", QUEUE, "--yes"],
    );
    assert_eq!(
        out.status.code(),
        Some(64),
        "a consumer queue is never purged"
    );
    assert!(stderr(&out).contains(DLQ), "names the DLQ meant");
    rig.wait_depth(DLQ, 2).await;
    assert_eq!(rig.depth(QUEUE).await, 0, "nothing was replayed");

    // The registry's queues are the default; JSON for scripts.
    let out = keelctl(&rig, &registry, &["dlq", "list", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_out(&out).as_array().unwrap().len(), 2);
    rig.wait_depth(DLQ, 2).await;
    let out = keelctl(&rig, &registry, &["queues", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let rows = json_out(&out);
    assert_eq!(rows[0]["queue"], QUEUE);
    assert_eq!(rows[0]["dead_letters"]["messages"], 2);
    assert_eq!(rows[1]["queue"], "keel.unrouted");

    let out = keelctl(
        &rig,
        &registry,
        &["dlq", "purge", "--queue", DLQ, "--yes", "-o", "json"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_out(&out)["purged"], 2);
    assert_eq!(rig.depth(DLQ).await, 0);
    let _ = std::fs::remove_file(&registry);
}

#[tokio::test]
async fn the_binary_replays_by_id_and_prints_the_summary() {
    let rig = Rig::new().await;
    let registry = scratch_registry();
    rig.reject(&[
        ("order-1", "fixture.order.placed", "rejected"),
        ("order-2", "fixture.order.placed", "rejected"),
    ])
    .await;
    let out = keelctl(
        &rig,
        &registry,
        &["dlq", "replay", "--id", "order-2", "--dry-run"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("dry run: would replay 1, skipped 1"));
    rig.wait_depth(DLQ, 2).await;

    let out = keelctl(
        &rig,
        &registry,
        &["dlq", "replay", "--id", "order-2", "-o", "json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let summary = json_out(&out);
    assert_eq!(summary["replayed"], 1);
    assert_eq!(summary["messages"][0]["message_id"], "order-2");
    assert_eq!(summary["messages"][0]["outcome"], "replayed");
    assert_eq!(
        summary["messages"][0]["to"],
        json!({"exchange": "keel.retry", "routing_key": QUEUE}),
        "back into the queue where it failed"
    );
    rig.wait_depth(DLQ, 1).await;
    rig.wait_depth(QUEUE, 1).await;
    let _ = std::fs::remove_file(&registry);
}
