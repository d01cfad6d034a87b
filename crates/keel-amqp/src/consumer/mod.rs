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
//! `amqp_forward_failures_total` (a copy the broker did not take: a full DLQ);
//! and, refreshed every `depth_interval`, `amqp_queue_depth{queue}` and
//! `amqp_queue_consumers{queue}` for the queue, its tiers and its DLQ.
//!
//! Parts: [`ConsumerConfig`] (`config`), the subscription loop and the handler slots (here),
//! what becomes of each message (`settle`), the depth gauges (`depths`).
//!
//! Must not break: the ack follows the handler's commit, and the ack of a message moved to a
//! tier or the DLQ follows the broker's confirm of the copy.

mod config;
mod depths;
mod settle;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_events::Envelope;
use keel_resilience::backoff::BackoffPolicy;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::config::ConsumerConfig;
use self::settle::{decide, settle};
use crate::broker::ms;
use crate::topology::{self, QueueSpec, headers};
use crate::{AmqpError, Broker};

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
pub(crate) fn int_header(headers: Option<&FieldTable>, name: &str) -> u64 {
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
pub(crate) fn text_header(headers: Option<&FieldTable>, name: &str) -> Option<String> {
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
    let depths = tokio::spawn(depths::watch_depths(
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
        // original is acked to it (see `settle`).
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

/// The subscription's channel, as its handlers settle on it.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) channel: Channel,
    /// One forward (a mandatory publish and its confirm) at a time on the channel: lapin hands
    /// a `basic.return` to the next confirm that completes, so with two forwards in flight a
    /// return could be matched to the other message, which would then be acked as stored while
    /// its copy was dropped. Forwards happen only on failures; serialising them costs nothing
    /// on the happy path.
    pub(crate) forwarding: Arc<tokio::sync::Mutex<()>>,
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
}
