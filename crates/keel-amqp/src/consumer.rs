//! The bounded consumer (P03's broker half, P05 queue discipline).
//!
//! [`run`] subscribes to one durable quorum queue and calls a handler per message:
//! - **Ack only after the handler said [`Outcome::Ack`]**, and a handler says so only after
//!   its database transaction committed. A crash anywhere before that leaves the message
//!   unacked, so the broker redelivers it; the handler's inbox (`keel_pg::inbox`) makes the
//!   redelivery harmless. That pair is at-least-once delivery with exactly-once *effects*.
//! - **Bounded**: the broker hands over at most `prefetch` unacked messages (`basic.qos`), and
//!   at most `concurrency` handlers run at once. Raising either does not make a saturated
//!   dependency faster; the bounds keep its load, and this process's memory, fixed (P05).
//! - **Transient failures wait, they do not spin.** [`Outcome::Retry`] keeps the message (and
//!   its concurrency slot) and calls the handler again after a capped, jittered backoff
//!   (`keel_resilience::backoff`, P24: every instance's consumers that a database outage
//!   stalled at once do not all retry at once). A database outage therefore slows
//!   consumption down to nothing instead of burning the queue's delivery limit in a tight
//!   redelivery loop; the limit is for poison messages.
//! - **Survives reconnects.** When the channel or connection is lost, the consumer waits for
//!   the [`Broker`] supervisor to reconnect, re-declares its queue and bindings and
//!   subscribes again. Unacked messages of the lost channel go back to the queue; handlers
//!   still retrying them are told to give up ([`Incoming::cancelled`]).
//! - **Stops cleanly** on the stop token: cancel the subscription, let in-flight handlers
//!   finish and settle their messages, close the channel (prefetched, unstarted messages
//!   return to the queue).
//!
//! Metrics (label `queue`): `amqp_messages_total{outcome}` (finished outcomes, P06),
//! `amqp_handler_retries_total`, `amqp_handler_duration_seconds`, `amqp_messages_in_flight`.
//!
//! Must not break: the ack follows the handler's commit, never precedes it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{ConfigError, Validate, ensure_range};
use keel_events::Envelope;
use keel_resilience::backoff::BackoffPolicy;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::ms;
use crate::topology::{self, QueueSpec};
use crate::{AmqpError, Broker};

/// `[consumer]` section of a consuming service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The service's own durable queue (`notification.events`).
    pub queue: String,
    /// Most unacked messages the broker hands this consumer (`basic.qos`).
    pub prefetch: u16,
    /// Most handlers running at once.
    pub concurrency: u16,
    /// `x-delivery-limit` of the queue: returns to the queue before the broker gives up on a
    /// message. Fixed when the queue is first declared (see [`crate::topology`]).
    pub delivery_limit: u32,
    /// Cap of the backoff between attempts of a handler that answered [`Outcome::Retry`].
    #[serde(with = "keel_config::duration")]
    pub retry_max_backoff: Duration,
}

impl Validate for ConsumerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.queue.is_empty() || self.queue.len() > 200 {
            return Err(ConfigError::invalid(
                "consumer.queue",
                "must be 1..=200 bytes",
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
        ensure_range(
            "consumer.retry_max_backoff (ms)",
            ms(self.retry_max_backoff),
            10,
            300_000,
        )
    }
}

impl ConsumerConfig {
    /// The queue this consumer owns, bound to `bindings` on `keel.events`.
    pub fn queue_spec(&self, bindings: &[&str]) -> QueueSpec {
        QueueSpec {
            name: self.queue.clone(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            delivery_limit: self.delivery_limit,
        }
    }
}

/// What to do with a message once its handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (the effect committed, or it was a duplicate): ack it.
    Ack,
    /// A transient failure (database unreachable, serialization conflict): keep the message
    /// and call the handler again after a backoff. If the consumer stops or loses its
    /// channel first, the message goes back to the queue.
    Retry,
    /// Give it back to the queue now (`nack` with requeue); counts towards the delivery limit.
    Requeue,
    /// Never processable (unparseable, unknown schema version): `reject` without requeue.
    /// Dropped by the broker today: there is no dead-letter exchange yet (P01 adds it).
    Reject,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Retry => "retry",
            Self::Requeue => "requeue",
            Self::Reject => "reject",
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
    pub routing_key: String,
    /// Set by the broker on every delivery after the first.
    pub redelivered: bool,
    /// Earlier failed deliveries (`x-delivery-count`, set by quorum queues; 0 at first).
    pub delivery_count: u64,
    /// W3C trace context of the producer, if the message carried one.
    pub traceparent: Option<String>,
    pub body: Arc<[u8]>,
    cancel: CancellationToken,
}

impl Incoming {
    fn from_delivery(delivery: &Delivery, cancel: CancellationToken) -> Self {
        let props = &delivery.properties;
        let headers = props.headers().as_ref();
        let delivery_count = delivery_count(headers);
        let traceparent = traceparent(headers);
        Self {
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            event_type: props.kind().as_ref().map(|s| s.to_string()),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            delivery_count,
            traceparent,
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

/// `x-delivery-count`: a quorum queue sets it on every redelivery as a signed 64-bit integer;
/// other integer widths are accepted so a header set by a shovel or a test tool is read too.
/// Absent or negative: 0.
fn delivery_count(headers: Option<&FieldTable>) -> u64 {
    match headers.and_then(|h| h.inner().get("x-delivery-count")) {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// The producer's W3C `traceparent` header: a long string as Keel's relay sends it, or a short
/// string as some clients encode short text.
fn traceparent(headers: Option<&FieldTable>) -> Option<String> {
    match headers.and_then(|h| h.inner().get("traceparent")) {
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

/// Consumes `queue` until `stop` (see the module docs). The queue and its bindings are
/// declared on every (re)subscription; prefetch, concurrency and the retry backoff come from
/// `config` (build `queue` with [`ConsumerConfig::queue_spec`]).
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
        queue: Arc::from(queue.name.as_str()),
        retry_max_backoff: config.retry_max_backoff,
    };
    let mut tasks = JoinSet::new();
    let mut reconnect =
        BackoffPolicy::new(Duration::from_millis(100), config.retry_max_backoff).backoff();
    let mut failing = false;
    while !stop.is_cancelled() {
        match subscribe(&broker, &queue, config.prefetch).await {
            Ok((channel, consumer)) => {
                if failing {
                    tracing::info!(queue = %queue.name, "consumer subscribed again");
                }
                reconnect.reset();
                // Fires when this subscription ends for any reason, so handlers still retrying
                // its messages give up (the broker redelivers them on the next subscription).
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
                tracing::warn!(queue = %queue.name, "consumer lost its channel; resubscribing");
                failing = true;
            }
            Err(e) => {
                let pause = reconnect.next_delay_without_deadline();
                if failing {
                    tracing::debug!(queue = %queue.name, error = %e, "consumer still cannot subscribe");
                } else {
                    tracing::warn!(queue = %queue.name, error = %e, backoff_ms = ms(pause),
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
    tracing::info!(queue = %queue.name, "consumer stopped");
}

async fn subscribe(
    broker: &Broker,
    queue: &QueueSpec,
    prefetch: u16,
) -> Result<(Channel, Consumer), AmqpError> {
    let channel = broker.channel().await?;
    let setup = async {
        topology::declare_queue(&channel, queue).await?;
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

#[derive(Debug, PartialEq, Eq)]
enum End {
    Stopped,
    Lost,
}

struct Worker<H> {
    handler: Arc<H>,
    slots: Arc<Semaphore>,
    queue: Arc<str>,
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
                    tasks.spawn(self.handle(delivery, permit, subscription.clone()));
                }
                Some(Err(e)) => {
                    tracing::debug!(queue = %self.queue, error = %e, "consumer stream error");
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
                queue = %queue,
                message_id = incoming.message_id.as_deref().unwrap_or_default(),
                event_type = incoming.event_type.as_deref().unwrap_or_default(),
                delivery_count = incoming.delivery_count,
            );
            if let Some(tp) = &incoming.traceparent {
                keel_telemetry::propagation::set_parent(&span, tp);
            }
            let in_flight =
                metrics::gauge!("amqp_messages_in_flight", "queue" => queue.to_string());
            in_flight.increment(1.0);
            async {
                let started = Instant::now();
                let mut backoff =
                    BackoffPolicy::new(Duration::from_millis(50), retry_max_backoff).backoff();
                let outcome = loop {
                    match handler(incoming.clone()).await {
                        Outcome::Retry => {
                            metrics::counter!("amqp_handler_retries_total", "queue" => queue.to_string())
                                .increment(1);
                            let pause = backoff.next_delay_without_deadline();
                            tokio::select! {
                                () = incoming.cancelled() => break Outcome::Requeue,
                                () = tokio::time::sleep(pause) => {}
                            }
                        }
                        other => break other,
                    }
                };
                metrics::histogram!("amqp_handler_duration_seconds", "queue" => queue.to_string())
                    .record(started.elapsed().as_secs_f64());
                let settled = match outcome {
                    Outcome::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                    Outcome::Requeue | Outcome::Retry => {
                        delivery
                            .acker
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..BasicNackOptions::default()
                            })
                            .await
                    }
                    Outcome::Reject => {
                        delivery
                            .acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await
                    }
                };
                match settled {
                    Ok(true) => {
                        metrics::counter!("amqp_messages_total",
                            "queue" => queue.to_string(), "outcome" => outcome.label())
                        .increment(1);
                    }
                    // The channel is gone: the broker has already put the message back and
                    // will redeliver it; the handler's inbox makes that harmless.
                    Ok(false) | Err(_) => {
                        tracing::debug!(outcome = outcome.label(), "could not settle message; it will be redelivered");
                        metrics::counter!("amqp_settle_failures_total", "queue" => queue.to_string())
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
        let count = |v| delivery_count(Some(&headers("x-delivery-count", v)));
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
        assert_eq!(delivery_count(None), 0, "first delivery: no header");
    }

    #[test]
    fn the_traceparent_is_read_from_long_and_short_strings() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let read = |v| traceparent(Some(&headers("traceparent", v)));
        assert_eq!(read(AMQPValue::LongString(tp.into())).as_deref(), Some(tp));
        assert_eq!(read(AMQPValue::ShortString(tp.into())).as_deref(), Some(tp));
        assert_eq!(read(AMQPValue::LongLongInt(1)), None);
        assert_eq!(traceparent(None), None);
    }

    /// The `outcome` label values of `amqp_messages_total` are what dashboards and alerts
    /// select on (P06): renaming one silently empties a panel.
    #[test]
    fn outcome_labels_are_the_documented_metric_values() {
        let labels: Vec<_> = [
            Outcome::Ack,
            Outcome::Retry,
            Outcome::Requeue,
            Outcome::Reject,
        ]
        .map(Outcome::label)
        .into();
        assert_eq!(labels, ["ack", "retry", "requeue", "reject"]);
    }

    fn config(queue: &str, prefetch: u16, concurrency: u16) -> ConsumerConfig {
        ConsumerConfig {
            queue: queue.to_owned(),
            prefetch,
            concurrency,
            delivery_limit: 5,
            retry_max_backoff: Duration::from_secs(5),
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
        config(&"q".repeat(200), 10, 4).validate().unwrap();
        config("q", 10, 4).validate().unwrap();
        assert_eq!(refused_key(&config("", 10, 4)), "consumer.queue");
        assert_eq!(
            refused_key(&config(&"q".repeat(201), 10, 4)),
            "consumer.queue"
        );
    }

    /// More handler slots than prefetched messages would be slots that never run.
    #[test]
    fn prefetch_and_concurrency_are_bounded_and_concurrency_may_not_exceed_prefetch() {
        config("q", 8, 8).validate().unwrap();
        assert_eq!(refused_key(&config("q", 8, 9)), "consumer.concurrency");
        assert_eq!(refused_key(&config("q", 0, 0)), "consumer.prefetch");
        assert_eq!(refused_key(&config("q", 1001, 1)), "consumer.prefetch");
        assert_eq!(refused_key(&config("q", 1000, 0)), "consumer.concurrency");
        config("q", 1000, 256).validate().unwrap();
        assert_eq!(refused_key(&config("q", 1000, 257)), "consumer.concurrency");
    }

    #[test]
    fn delivery_limit_and_retry_backoff_are_bounded() {
        let mut c = config("q", 10, 4);
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
}
