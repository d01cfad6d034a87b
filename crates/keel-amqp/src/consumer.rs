//! The consumer framework every service uses (P01 dead letters, P03's broker half, P05 queue
//! discipline, P06 outcome counts).
//!
//! [`run`] subscribes to one consumer queue (declared with its retry tiers and DLQ, see
//! [`crate::topology`]) and calls a handler per message. The handler answers an [`Outcome`]:
//! - [`Outcome::Ack`]: done (the effect committed, or it was a duplicate). **The ack follows
//!   the handler's commit**, never precedes it: a crash anywhere before leaves the message
//!   unacked and the broker redelivers it; the handler's inbox (`keel_pg::inbox`) makes the
//!   redelivery harmless. At-least-once delivery with exactly-once *effects*.
//! - [`Outcome::Retry`] (transient, with a reason): the message goes to the queue's next retry
//!   tier (`<queue>.retry.1s`, then `.10s`, `.60s`, …), which the broker returns it from when
//!   its TTL expires; the attempt count travels in a header. After the last tier it goes to the
//!   DLQ. The message leaves the queue while it waits, so it blocks nothing behind it.
//! - [`Outcome::Reject`] (permanent, with a reason): to the DLQ at once. A handler that
//!   **panics** is treated the same way (the panic hook has logged it once, with its location).
//! - [`Outcome::Unavailable`]: the handler's own dependency (its database) is down, which no
//!   message can fix: keep the message and call the handler again after a capped, jittered
//!   backoff, without counting an attempt. An outage slows consumption down to nothing instead
//!   of pushing every message through the tiers into the DLQ.
//!
//! Moving a message to a tier or the DLQ is a publish with confirms and `mandatory` on the
//! consuming channel, *then* the ack of the original: until the copy is confirmed the original
//! stays unacked here (a full DLQ refuses with `reject-publish`: the consumer tries again after
//! a backoff, `amqp_forward_failures_total` counts it), and goes back to its queue if the
//! subscription ends first. A failure to dead-letter never loses the message. Dead-lettered messages carry [`crate::topology::headers`]: the
//! error, the attempts, the original exchange and routing key, the first and last failure
//! times (what `keelctl dlq` lists and `replay` uses).
//!
//! Bounded: the broker hands over at most `prefetch` unacked messages (`basic.qos`), and at most
//! `concurrency` handlers run at once. Raising either does not make a saturated dependency
//! faster; the bounds keep its load, and this process's memory, fixed (P05).
//!
//! Survives reconnects: when the channel or connection is lost, the consumer waits for the
//! [`Broker`] supervisor to reconnect (jittered backoff), re-declares its topology and
//! subscribes again. Unacked messages of the lost channel go back to the queue; handlers still
//! waiting on them are told to give up ([`Incoming::cancelled`]).
//!
//! Stops cleanly on the stop token: cancel the subscription, let in-flight handlers finish and
//! settle their messages, close the channel (prefetched, unstarted messages return to the
//! queue).
//!
//! Metrics (label `queue`): `amqp_messages_total{outcome}` — finished outcomes, P06: `acked`,
//! `retried` (sent to a tier), `dead_lettered`, `requeued` (returned to the queue because the
//! consumer stopped or lost its channel first); `amqp_dead_lettered_total{reason}` (`rejected`,
//! `retries_exhausted`, `panic`); `amqp_handler_unavailable_total`;
//! `amqp_handler_duration_seconds`; `amqp_messages_in_flight`; `amqp_settle_failures_total`;
//! and, refreshed every `depth_interval`, `amqp_queue_depth{queue}` and
//! `amqp_queue_consumers{queue}` for the queue, its tiers and its DLQ.
//!
//! Must not break: the ack follows the handler's commit, and the ack of a message moved to a
//! tier or the DLQ follows the broker's confirm of the copy.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use keel_config::{ConfigError, Validate, ensure_range};
use keel_events::Envelope;
use keel_resilience::backoff::BackoffPolicy;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Consumer};
use serde::{Deserialize, Deserializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::ms;
use crate::publisher;
use crate::topology::{self, QueueSpec, headers};
use crate::{AmqpError, Broker};

/// `[consumer]` section of a consuming service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The service's own durable queue (`notification.events`): `<service>.<purpose>`.
    pub queue: String,
    /// Most unacked messages the broker hands this consumer (`basic.qos`).
    pub prefetch: u16,
    /// Most handlers running at once.
    pub concurrency: u16,
    /// `x-delivery-limit` of the queue: deliveries the broker allows before it dead-letters a
    /// message the consumer never settled (a crash loop). Fixed when the queue is first
    /// declared (see [`crate::topology`]).
    pub delivery_limit: u32,
    /// `x-max-length` of the queue and of each retry tier (fixed at first declaration).
    pub max_length: u32,
    /// Delays of the retry tiers, in order (`["1s", "10s", "60s"]`); a message that failed
    /// transiently after the last tier goes to the DLQ. Each delay is a queue of its own.
    #[serde(deserialize_with = "durations")]
    pub retry_tiers: Vec<Duration>,
    /// `x-max-length` of the DLQ (fixed at first declaration). A full DLQ refuses: the
    /// consumer then returns the message to its queue rather than lose it.
    pub dead_letter_max_length: u32,
    /// Cap of the backoff between attempts of a handler that answered
    /// [`Outcome::Unavailable`].
    #[serde(with = "keel_config::duration")]
    pub retry_max_backoff: Duration,
    /// How often queue and DLQ depths are read for the metrics.
    #[serde(with = "keel_config::duration")]
    pub depth_interval: Duration,
}

/// A list of humantime durations: `["1s", "10s"]` in a file, `1s,10s` in an environment
/// variable (`KEEL_CONSUMER__RETRY_TIERS=1s,10s,60s`; an empty value means no tiers).
fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<String>),
        Text(String),
    }
    let items: Vec<String> = match List::deserialize(d)? {
        List::Items(items) => items,
        List::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    items
        .iter()
        .map(|s| keel_config::parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

impl Validate for ConsumerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.queue.is_empty() || self.queue.len() > 200 {
            return Err(ConfigError::invalid(
                "consumer.queue",
                "must be 1..=200 bytes",
            ));
        }
        if !self.queue.contains('.') || self.queue.starts_with("keel.") {
            // Permissions are granted by prefix (`<service>.`, see crate::definitions).
            return Err(ConfigError::invalid(
                "consumer.queue",
                "must be <service>.<purpose> (and not under the platform's keel. prefix)",
            ));
        }
        ensure_range("consumer.prefetch", self.prefetch, 1, 1000)?;
        ensure_range("consumer.concurrency", self.concurrency, 1, 256)?;
        if self.concurrency > self.prefetch {
            // More slots than messages the broker will hand over: the extra slots never run.
            return Err(ConfigError::invalid(
                "consumer.concurrency",
                format!(
                    "{} exceeds consumer.prefetch ({})",
                    self.concurrency, self.prefetch
                ),
            ));
        }
        ensure_range("consumer.delivery_limit", self.delivery_limit, 1, 1000)?;
        ensure_range("consumer.max_length", self.max_length, 100, 10_000_000)?;
        ensure_range(
            "consumer.dead_letter_max_length",
            self.dead_letter_max_length,
            100,
            10_000_000,
        )?;
        ensure_range(
            "consumer.retry_tiers (count)",
            self.retry_tiers.len(),
            0,
            10,
        )?;
        for (i, tier) in self.retry_tiers.iter().enumerate() {
            ensure_range("consumer.retry_tiers (ms)", ms(*tier), 100, 86_400_000)?;
            if i > 0 && *tier <= self.retry_tiers[i - 1] {
                return Err(ConfigError::invalid(
                    "consumer.retry_tiers",
                    "delays must increase (each is its own queue)",
                ));
            }
        }
        ensure_range(
            "consumer.retry_max_backoff (ms)",
            ms(self.retry_max_backoff),
            10,
            300_000,
        )?;
        ensure_range(
            "consumer.depth_interval (ms)",
            ms(self.depth_interval),
            100,
            300_000,
        )
    }
}

impl ConsumerConfig {
    /// The queue this consumer owns, bound to `bindings` on `keel.events`, with its tiers and
    /// DLQ.
    pub fn queue_spec(&self, bindings: &[&str]) -> QueueSpec {
        QueueSpec {
            name: self.queue.clone(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            delivery_limit: self.delivery_limit,
            max_length: self.max_length,
            retry_tiers: self.retry_tiers.clone(),
            dead_letter_max_length: self.dead_letter_max_length,
        }
    }
}

/// What to do with a message once its handler returned (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (the effect committed, or it was a duplicate): ack it.
    Ack,
    /// A transient failure of this message: through the retry tiers, then the DLQ.
    Retry(Cow<'static, str>),
    /// Never processable (unparseable, unknown schema version): to the DLQ now.
    Reject(Cow<'static, str>),
    /// The handler's own dependency is unavailable: keep the message, try again after a
    /// backoff, count no attempt.
    Unavailable,
}

impl Outcome {
    /// [`Outcome::Retry`] with `reason` (shown by `keelctl dlq` if the tiers run out).
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Self::Retry(Cow::Owned(reason.to_string()))
    }

    /// [`Outcome::Reject`] with `reason` (shown by `keelctl dlq`).
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        Self::Reject(Cow::Owned(reason.to_string()))
    }
}

/// What the consumer did with a message: the `outcome` label of `amqp_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Acked,
    Retried,
    DeadLettered,
    Requeued,
}

impl Settled {
    fn label(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::Requeued => "requeued",
        }
    }
}

/// Why a message is dead-lettered: `x-keel-failure` and the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Rejected,
    RetriesExhausted,
    Panic,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Panic => "panic",
        }
    }
}

/// A delivered message, as a handler sees it. Cheap to clone (the body is shared).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// AMQP `message_id`: the event id, the inbox key (P03).
    pub message_id: Option<String>,
    /// AMQP `type`: the event type.
    pub event_type: Option<String>,
    /// The routing key it was *published* with (after a retry tier, the original one).
    pub routing_key: String,
    /// Set by the broker on every delivery after the first.
    pub redelivered: bool,
    /// Earlier unsettled deliveries (`x-delivery-count`, set by quorum queues; 0 at first).
    pub delivery_count: u64,
    /// Failed attempts before this one ([`headers::ATTEMPTS`]; 0 at first).
    pub attempts: u32,
    /// W3C trace context of the producer, if the message carried one.
    pub traceparent: Option<String>,
    pub body: Arc<[u8]>,
    cancel: CancellationToken,
}

impl Incoming {
    fn from_delivery(delivery: &Delivery, cancel: CancellationToken) -> Self {
        let props = &delivery.properties;
        let headers = props.headers().as_ref();
        Self {
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            event_type: props.kind().as_ref().map(|s| s.to_string()),
            routing_key: text_header(headers, headers::ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| delivery.routing_key.to_string()),
            redelivered: delivery.redelivered,
            delivery_count: int_header(headers, "x-delivery-count"),
            attempts: u32::try_from(int_header(headers, headers::ATTEMPTS)).unwrap_or(u32::MAX),
            traceparent: text_header(headers, "traceparent"),
            body: Arc::from(delivery.data.as_slice()),
            cancel,
        }
    }

    /// The body as an event [`Envelope`].
    pub fn envelope(&self) -> Result<Envelope, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// Resolves when the consumer is stopping or this delivery's channel is gone: a handler
    /// waiting on something slow may give up (its message will be redelivered).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }
}

/// An integer header (`x-delivery-count` is a signed 64-bit integer from quorum queues; other
/// widths are accepted so a header set by a shovel or a test tool is read too). Absent or
/// negative: 0.
fn int_header(headers: Option<&FieldTable>, name: &str) -> u64 {
    match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u64::from(*n),
        _ => 0,
    }
}

/// A text header: a long string as Keel sends it, or a short string as some clients encode
/// short text.
fn text_header(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// Starts [`run`] as a task. Await the handle at shutdown: it resolves once in-flight
/// messages are settled.
pub fn spawn<H, Fut>(
    broker: Broker,
    config: ConsumerConfig,
    bindings: &[&str],
    handler: H,
    stop: CancellationToken,
) -> JoinHandle<()>
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let queue = config.queue_spec(bindings);
    tokio::spawn(run(broker, queue, config, handler, stop))
}

/// Consumes `queue` until `stop` (see the module docs). The topology is declared on every
/// (re)subscription; prefetch, concurrency and backoffs come from `config` (build `queue` with
/// [`ConsumerConfig::queue_spec`]).
pub async fn run<H, Fut>(
    broker: Broker,
    queue: QueueSpec,
    config: ConsumerConfig,
    handler: H,
    stop: CancellationToken,
) where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let worker = Worker {
        handler: Arc::new(handler),
        slots: Arc::new(Semaphore::new(usize::from(config.concurrency))),
        queue: Arc::new(queue),
        retry_max_backoff: config.retry_max_backoff,
    };
    let depths = tokio::spawn(watch_depths(
        broker.clone(),
        worker.queue.clone(),
        config.depth_interval,
        stop.clone(),
    ));
    let name = worker.queue.name.clone();
    let mut tasks = JoinSet::new();
    let mut reconnect =
        BackoffPolicy::new(Duration::from_millis(100), config.retry_max_backoff).backoff();
    let mut failing = false;
    while !stop.is_cancelled() {
        match subscribe(&broker, &worker.queue, config.prefetch).await {
            Ok((channel, consumer)) => {
                if failing {
                    tracing::info!(queue = %name, "consumer subscribed again");
                }
                reconnect.reset();
                // Fires when this subscription ends for any reason, so handlers still waiting
                // on its messages give up (the broker redelivers them on the next one).
                let subscription = stop.child_token();
                let end = worker
                    .consume(&channel, consumer, &subscription, &stop, &mut tasks)
                    .await;
                subscription.cancel();
                if end == End::Stopped {
                    // Acks need the channel: settle in-flight messages first, then close it.
                    while tasks.join_next().await.is_some() {}
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        channel.close(200, "shutdown".into()),
                    )
                    .await;
                    break;
                }
                // Warned once here; the failed attempts until the next subscription are debug.
                tracing::warn!(queue = %name, "consumer lost its channel; resubscribing");
                failing = true;
            }
            Err(e) => {
                let pause = reconnect.next_delay_without_deadline();
                if failing {
                    tracing::debug!(queue = %name, error = %e, "consumer still cannot subscribe");
                } else {
                    tracing::warn!(queue = %name, error = %e, backoff_ms = ms(pause),
                        "consumer cannot subscribe; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let _ = depths.await;
    tracing::info!(queue = %name, "consumer stopped");
}

async fn subscribe(
    broker: &Broker,
    queue: &QueueSpec,
    prefetch: u16,
) -> Result<(Channel, Consumer), AmqpError> {
    let channel = broker.channel().await?;
    let setup = async {
        topology::ensure_exchanges(broker).await?;
        topology::declare_own(&channel, queue).await?;
        // Confirm mode: a copy sent to a tier or the DLQ is acked by the broker before the
        // original is acked to it (see `Worker::forward`).
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}-{}", queue.name, uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                topology::short(&queue.name)?,
                topology::short(&tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, AmqpError>(consumer)
    };
    // Bounded like opening the channel: a connection that just died may never answer.
    match tokio::time::timeout(broker.operation_timeout(), setup).await {
        Ok(Ok(consumer)) => Ok((channel, consumer)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(AmqpError::Timeout("queue declare / basic.consume")),
    }
}

/// Reads the depth and consumer count of the queue, its tiers and its DLQ every `every`, into
/// `amqp_queue_depth` and `amqp_queue_consumers` (P05: the backlog and the DLQ are visible).
async fn watch_depths(
    broker: Broker,
    queue: Arc<QueueSpec>,
    every: Duration,
    stop: CancellationToken,
) {
    let names: Vec<String> = queue.declarations().into_iter().map(|d| d.name).collect();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut channel: Option<Channel> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = broker.channel().await.ok();
        }
        let Some(ch) = channel.as_ref() else { continue };
        for name in &names {
            let Ok(q) = topology::short(name) else {
                continue;
            };
            let read = tokio::time::timeout(
                broker.operation_timeout(),
                ch.queue_declare(
                    q,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            match read {
                Ok(Ok(state)) => {
                    metrics::gauge!("amqp_queue_depth", "queue" => name.clone())
                        .set(f64::from(state.message_count()));
                    metrics::gauge!("amqp_queue_consumers", "queue" => name.clone())
                        .set(f64::from(state.consumer_count()));
                }
                // Not declared yet (a passive declare closes the channel): next tick.
                _ => {
                    channel = None;
                    break;
                }
            }
        }
    }
    if let Some(ch) = channel {
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "done".into())).await;
    }
}

/// The subscription's channel, as its handlers settle on it.
#[derive(Clone)]
struct Link {
    channel: Channel,
    /// One forward (a mandatory publish and its confirm) at a time on the channel: lapin hands
    /// a `basic.return` to the next confirm that completes, so with two forwards in flight a
    /// return could be matched to the other message, which would then be acked as stored while
    /// its copy was dropped. Forwards happen only on failures; serialising them costs nothing
    /// on the happy path.
    forwarding: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Stopped,
    Lost,
}

struct Worker<H> {
    handler: Arc<H>,
    slots: Arc<Semaphore>,
    queue: Arc<QueueSpec>,
    retry_max_backoff: Duration,
}

impl<H, Fut> Worker<H>
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    /// Takes deliveries from `consumer` until `stop` or until the channel is gone.
    async fn consume(
        &self,
        channel: &Channel,
        mut consumer: Consumer,
        subscription: &CancellationToken,
        stop: &CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> End {
        // A replaced connection does not always end the stream at once; look every second.
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let link = Link {
            channel: channel.clone(),
            forwarding: Arc::new(tokio::sync::Mutex::new(())),
        };
        loop {
            while tasks.try_join_next().is_some() {}
            // A free slot first, then a delivery: at most `concurrency` handlers run, and the
            // rest wait in the prefetch buffer (bounded by `prefetch`), not in our memory.
            let permit = tokio::select! {
                // Stop wins over ready work: nothing new starts once stopping.
                biased;
                () = stop.cancelled() => return self.cancel(channel, &consumer).await,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return End::Stopped, // the semaphore is never closed
                },
            };
            let delivery = loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return self.cancel(channel, &consumer).await,
                    next = consumer.next() => break next,
                    _ = health.tick() => {
                        if !channel.status().connected() {
                            return End::Lost;
                        }
                    }
                }
            };
            match delivery {
                Some(Ok(delivery)) => {
                    tasks.spawn(self.handle(link.clone(), delivery, permit, subscription.clone()));
                }
                Some(Err(e)) => {
                    tracing::debug!(queue = %self.queue.name, error = %e, "consumer stream error");
                    return End::Lost;
                }
                // The broker cancelled the subscription (queue deleted) or the channel closed.
                None => return End::Lost,
            }
        }
    }

    /// Stops new deliveries (bounded); prefetched ones return to the queue when the channel
    /// closes.
    async fn cancel(&self, channel: &Channel, consumer: &Consumer) -> End {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        End::Stopped
    }

    fn handle(
        &self,
        link: Link,
        delivery: Delivery,
        permit: OwnedSemaphorePermit,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let handler = self.handler.clone();
        let queue = self.queue.clone();
        let retry_max_backoff = self.retry_max_backoff;
        async move {
            let incoming = Incoming::from_delivery(&delivery, cancel);
            let span = tracing::info_span!(
                "message",
                queue = %queue.name,
                message_id = incoming.message_id.as_deref().unwrap_or_default(),
                event_type = incoming.event_type.as_deref().unwrap_or_default(),
                attempts = incoming.attempts,
                delivery_count = incoming.delivery_count,
            );
            if let Some(tp) = &incoming.traceparent {
                keel_telemetry::propagation::set_parent(&span, tp);
            }
            let label = queue.name.clone();
            let in_flight = metrics::gauge!("amqp_messages_in_flight", "queue" => label.clone());
            in_flight.increment(1.0);
            async {
                let started = Instant::now();
                let decision = decide(&handler, &incoming, retry_max_backoff, &label).await;
                metrics::histogram!("amqp_handler_duration_seconds", "queue" => label.clone())
                    .record(started.elapsed().as_secs_f64());
                let settled =
                    settle(&link, &queue, &delivery, &incoming, decision, retry_max_backoff)
                        .await;
                match settled {
                    Ok(settled) => {
                        metrics::counter!("amqp_messages_total",
                            "queue" => label.clone(), "outcome" => settled.label())
                        .increment(1);
                    }
                    // The channel is gone: the broker has already put the message back and
                    // will redeliver it; the handler's inbox makes that harmless.
                    Err(e) => {
                        tracing::debug!(error = %e, "could not settle message; it will be redelivered");
                        metrics::counter!("amqp_settle_failures_total", "queue" => label.clone())
                            .increment(1);
                    }
                }
            }
            .instrument(span)
            .await;
            in_flight.decrement(1.0);
            drop(permit);
        }
    }
}

/// What the consumer will do with a message, once the handler has had its say.
#[derive(Debug)]
enum Decision {
    Ack,
    Retry(Cow<'static, str>),
    DeadLetter(Failure, Cow<'static, str>),
    /// Back to the queue: the consumer is stopping or lost the channel while the handler
    /// waited out an [`Outcome::Unavailable`].
    Requeue,
}

/// Calls the handler until it answers something other than [`Outcome::Unavailable`] (or the
/// subscription ends); a panic is a permanent failure.
async fn decide<H, Fut>(
    handler: &Arc<H>,
    incoming: &Incoming,
    retry_max_backoff: Duration,
    queue: &str,
) -> Decision
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let mut backoff = BackoffPolicy::new(Duration::from_millis(50), retry_max_backoff).backoff();
    loop {
        // The panic hook has logged the panic once, with its location; here it becomes the
        // message's fate, not a dead consumer task.
        // The call itself inside the guarded future: a handler that panics before it returns
        // its future (in the closure's synchronous part) is caught too.
        let call = async { handler(incoming.clone()).await };
        match AssertUnwindSafe(call).catch_unwind().await {
            Ok(Outcome::Ack) => return Decision::Ack,
            Ok(Outcome::Retry(reason)) => return Decision::Retry(reason),
            Ok(Outcome::Reject(reason)) => return Decision::DeadLetter(Failure::Rejected, reason),
            Ok(Outcome::Unavailable) => {
                metrics::counter!("amqp_handler_unavailable_total", "queue" => queue.to_owned())
                    .increment(1);
                let pause = backoff.next_delay_without_deadline();
                tokio::select! {
                    () = incoming.cancelled() => return Decision::Requeue,
                    () = tokio::time::sleep(pause) => {}
                }
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string payload>".to_owned());
                return Decision::DeadLetter(
                    Failure::Panic,
                    Cow::Owned(format!("handler panicked: {what}")),
                );
            }
        }
    }
}

/// Carries out `decision` on the delivery's channel.
async fn settle(
    link: &Link,
    queue: &QueueSpec,
    delivery: &Delivery,
    incoming: &Incoming,
    decision: Decision,
    retry_max_backoff: Duration,
) -> Result<Settled, AmqpError> {
    let attempts = incoming.attempts.saturating_add(1);
    let (exchange, routing_key, failure, reason) = match decision {
        Decision::Ack => {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            return Ok(Settled::Acked);
        }
        Decision::Requeue => {
            requeue(delivery).await?;
            return Ok(Settled::Requeued);
        }
        Decision::Retry(reason) => match queue.tier_after(attempts) {
            Some(delay) => (
                topology::RETRY_EXCHANGE,
                topology::retry_queue(&queue.name, delay),
                None,
                reason,
            ),
            None => (
                topology::DEAD_LETTER_EXCHANGE,
                queue.name.clone(),
                Some(Failure::RetriesExhausted),
                reason,
            ),
        },
        Decision::DeadLetter(failure, reason) => (
            topology::DEAD_LETTER_EXCHANGE,
            queue.name.clone(),
            Some(failure),
            reason,
        ),
    };
    let properties = failure_properties(delivery, &queue.name, attempts, failure, &reason);
    // Until the broker confirms the copy, the original stays unacked with us: a DLQ that is
    // full (`reject-publish`) holds the message here, retried after a backoff, instead of a
    // hot requeue loop that would burn its delivery limit. If the subscription ends first, it
    // goes back to its queue.
    let mut backoff = BackoffPolicy::new(Duration::from_millis(100), retry_max_backoff).backoff();
    let mut warned = false;
    loop {
        let copy = properties.clone();
        let forwarded = {
            let _one_at_a_time = link.forwarding.lock().await;
            publisher::publish_confirmed(
                &link.channel,
                exchange,
                &routing_key,
                &delivery.data,
                copy,
            )
            .await
        };
        match forwarded {
            Ok(()) => break,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, %reason, "could not move the message to {exchange} {routing_key}; holding it and trying again");
                    warned = true;
                }
                metrics::counter!("amqp_forward_failures_total", "queue" => queue.name.clone())
                    .increment(1);
                tokio::select! {
                    () = incoming.cancelled() => {
                        requeue(delivery).await?;
                        return Ok(Settled::Requeued);
                    }
                    () = tokio::time::sleep(backoff.next_delay_without_deadline()) => {}
                }
            }
        }
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    match failure {
        None => {
            tracing::info!(%reason, attempts, tier = %routing_key, "message sent to a retry tier");
            Ok(Settled::Retried)
        }
        Some(failure) => {
            metrics::counter!("amqp_dead_lettered_total",
                "queue" => queue.name.clone(), "reason" => failure.label())
            .increment(1);
            tracing::warn!(%reason, attempts, failure = failure.label(),
                dlq = %topology::dead_letter_queue(&queue.name), "message dead-lettered");
            Ok(Settled::DeadLettered)
        }
    }
}

async fn requeue(delivery: &Delivery) -> Result<(), AmqpError> {
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await?;
    Ok(())
}

/// The original properties with the failure headers added (the first failure's time and the
/// original route are kept from an earlier failure, if any).
fn failure_properties(
    delivery: &Delivery,
    queue: &str,
    attempts: u32,
    failure: Option<Failure>,
    reason: &str,
) -> BasicProperties {
    let original = delivery.properties.headers().clone().unwrap_or_default();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let keep_or = |name: &str, fallback: &str| {
        text_header(Some(&original), name).unwrap_or_else(|| fallback.to_owned())
    };
    let first_failure = keep_or(headers::FIRST_FAILURE, &now);
    let exchange = keep_or(headers::ORIGINAL_EXCHANGE, delivery.exchange.as_str());
    let routing_key = keep_or(headers::ORIGINAL_ROUTING_KEY, delivery.routing_key.as_str());
    let mut table = original;
    let mut text = |name: &str, value: &str| {
        table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    };
    // Bounded: a handler's error text could be anything.
    let reason: String = reason.chars().take(1024).collect();
    text(headers::ERROR, &reason);
    text(headers::FIRST_FAILURE, &first_failure);
    text(headers::LAST_FAILURE, &now);
    text(headers::ORIGINAL_EXCHANGE, &exchange);
    text(headers::ORIGINAL_ROUTING_KEY, &routing_key);
    text(headers::QUEUE, queue);
    if let Some(failure) = failure {
        text(headers::FAILURE, failure.label());
    }
    table.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    delivery.properties.clone().with_headers(table)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(name: &str, value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(name.into(), value);
        table
    }

    #[test]
    fn the_delivery_count_is_read_from_every_integer_width_and_is_zero_when_absent() {
        let count = |v| int_header(Some(&headers("x-delivery-count", v)), "x-delivery-count");
        assert_eq!(
            count(AMQPValue::LongLongInt(3)),
            3,
            "what a quorum queue sends"
        );
        assert_eq!(count(AMQPValue::LongInt(4)), 4);
        assert_eq!(count(AMQPValue::LongUInt(5)), 5);
        assert_eq!(count(AMQPValue::ShortInt(6)), 6);
        assert_eq!(
            count(AMQPValue::LongLongInt(-1)),
            0,
            "negative is not a count"
        );
        assert_eq!(count(AMQPValue::LongString("2".into())), 0, "not a number");
        assert_eq!(
            int_header(None, "x-delivery-count"),
            0,
            "first delivery: no header"
        );
    }

    #[test]
    fn the_traceparent_is_read_from_long_and_short_strings() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let read = |v| text_header(Some(&headers("traceparent", v)), "traceparent");
        assert_eq!(read(AMQPValue::LongString(tp.into())).as_deref(), Some(tp));
        assert_eq!(read(AMQPValue::ShortString(tp.into())).as_deref(), Some(tp));
        assert_eq!(read(AMQPValue::LongLongInt(1)), None);
        assert_eq!(text_header(None, "traceparent"), None);
    }

    /// The `outcome` and `reason` label values are what dashboards and alerts select on (P06):
    /// renaming one silently empties a panel.
    #[test]
    fn outcome_labels_are_the_documented_metric_values() {
        let settled: Vec<_> = [
            Settled::Acked,
            Settled::Retried,
            Settled::DeadLettered,
            Settled::Requeued,
        ]
        .map(Settled::label)
        .into();
        assert_eq!(settled, ["acked", "retried", "dead_lettered", "requeued"]);
        let reasons: Vec<_> = [Failure::Rejected, Failure::RetriesExhausted, Failure::Panic]
            .map(Failure::label)
            .into();
        assert_eq!(reasons, ["rejected", "retries_exhausted", "panic"]);
    }

    fn config(queue: &str, prefetch: u16, concurrency: u16) -> ConsumerConfig {
        ConsumerConfig {
            queue: queue.to_owned(),
            prefetch,
            concurrency,
            delivery_limit: 5,
            max_length: 1000,
            retry_tiers: vec![Duration::from_secs(1), Duration::from_secs(10)],
            dead_letter_max_length: 1000,
            retry_max_backoff: Duration::from_secs(5),
            depth_interval: Duration::from_secs(5),
        }
    }

    fn refused_key(c: &ConsumerConfig) -> String {
        match c.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_queue_name_must_be_1_to_200_bytes() {
        config(&format!("s.{}", "q".repeat(198)), 10, 4)
            .validate()
            .unwrap();
        config("s.q", 10, 4).validate().unwrap();
        assert_eq!(refused_key(&config("", 10, 4)), "consumer.queue");
        assert_eq!(
            refused_key(&config(&format!("s.{}", "q".repeat(199)), 10, 4)),
            "consumer.queue"
        );
        assert_eq!(
            refused_key(&config("q", 10, 4)),
            "consumer.queue",
            "no service prefix"
        );
        assert_eq!(
            refused_key(&config("keel.q", 10, 4)),
            "consumer.queue",
            "the platform's prefix"
        );
    }

    /// More handler slots than prefetched messages would be slots that never run.
    #[test]
    fn prefetch_and_concurrency_are_bounded_and_concurrency_may_not_exceed_prefetch() {
        config("s.q", 8, 8).validate().unwrap();
        assert_eq!(refused_key(&config("s.q", 8, 9)), "consumer.concurrency");
        assert_eq!(refused_key(&config("s.q", 0, 0)), "consumer.prefetch");
        assert_eq!(refused_key(&config("s.q", 1001, 1)), "consumer.prefetch");
        assert_eq!(refused_key(&config("s.q", 1000, 0)), "consumer.concurrency");
        config("s.q", 1000, 256).validate().unwrap();
        assert_eq!(
            refused_key(&config("s.q", 1000, 257)),
            "consumer.concurrency"
        );
    }

    #[test]
    fn delivery_limit_and_retry_backoff_are_bounded() {
        let mut c = config("s.q", 10, 4);
        c.delivery_limit = 0;
        assert_eq!(refused_key(&c), "consumer.delivery_limit");
        c.delivery_limit = 1001;
        assert_eq!(refused_key(&c), "consumer.delivery_limit");
        c.delivery_limit = 1000;
        c.retry_max_backoff = Duration::from_millis(9);
        assert_eq!(refused_key(&c), "consumer.retry_max_backoff (ms)");
        c.retry_max_backoff = Duration::from_secs(301);
        assert_eq!(refused_key(&c), "consumer.retry_max_backoff (ms)");
        c.retry_max_backoff = Duration::from_millis(10);
        c.validate().unwrap();
    }

    /// Each tier is a queue named after its delay, and a message moves through them in order.
    #[test]
    fn retry_tiers_must_increase_and_are_bounded() {
        let mut c = config("s.q", 10, 4);
        c.retry_tiers = vec![Duration::from_secs(10), Duration::from_secs(1)];
        assert_eq!(refused_key(&c), "consumer.retry_tiers");
        c.retry_tiers = vec![Duration::from_millis(99)];
        assert_eq!(refused_key(&c), "consumer.retry_tiers (ms)");
        c.retry_tiers = (1..=11).map(Duration::from_secs).collect();
        assert_eq!(refused_key(&c), "consumer.retry_tiers (count)");
        c.retry_tiers = Vec::new();
        c.validate().unwrap();
    }
}
