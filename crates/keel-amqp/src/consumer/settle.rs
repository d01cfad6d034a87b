//! What becomes of a message once its handler answered (P01): acked, sent to a retry tier,
//! dead-lettered with headers saying why, or returned to the queue. The copy is confirmed
//! before the original is acked.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use keel_resilience::backoff::BackoffPolicy;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, LongString};

use super::{Incoming, Link, Outcome, text_header};
use crate::AmqpError;
use crate::publisher;
use crate::topology::{self, QueueSpec, headers};

/// What the consumer did with a message: the `outcome` label of `amqp_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    Acked,
    Retried,
    DeadLettered,
    Requeued,
}

impl Settled {
    pub(super) fn label(self) -> &'static str {
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
pub(super) enum Failure {
    Rejected,
    RetriesExhausted,
    Panic,
}

impl Failure {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Panic => "panic",
        }
    }
}

/// What the consumer will do with a message, once the handler has had its say.
#[derive(Debug)]
pub(super) enum Decision {
    Ack,
    Retry(Cow<'static, str>),
    DeadLetter(Failure, Cow<'static, str>),
    /// Back to the queue: the consumer is stopping or lost the channel while the handler
    /// waited out an [`Outcome::Unavailable`].
    Requeue,
}

/// Calls the handler until it answers something other than [`Outcome::Unavailable`] (or the
/// subscription ends); a panic is a permanent failure.
pub(super) async fn decide<H, Fut>(
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
pub(super) async fn settle(
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
    use super::*;

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
}
