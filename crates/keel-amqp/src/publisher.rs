//! The confirmed publisher (P02, the broker half of "published").
//!
//! A message counts as published only when the broker has *confirmed* it (`basic.ack` in
//! confirm mode): for a durable quorum queue that means it is stored on a quorum of nodes.
//! [`Publisher::publish_batch`] sends a whole batch and then awaits every confirm under one
//! deadline, so a batch costs one round trip, not one per message. Per message, a `nack`, a
//! channel error or the deadline is a failure of *that* message; the caller (the relay)
//! marks only the confirmed ones as sent.
//!
//! Properties follow the conventions in `keel_events`: `message_id` = event id,
//! `type` = event type, `timestamp` (unix seconds), `content_type = application/json`,
//! `delivery_mode = 2` (persistent), header `traceparent`; routing key = event type.
//!
//! Every publish is `mandatory`: a message the broker cannot route is returned, and is an
//! error of that message ([`AmqpError::Unroutable`]), never a silent drop. On `keel.events`
//! an event nobody has subscribed to yet is not unroutable: the exchange's alternate exchange
//! keeps it in `keel.unrouted` ([`crate::topology`]). A nack (a full queue refusing with
//! `reject-publish`) is [`AmqpError::Nacked`].
//!
//! Must not break: after a deadline the channel is discarded, because a late confirm on it
//! could otherwise be mistaken for one of the next batch's.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use uuid::Uuid;

use crate::{AmqpError, Broker, topology};

/// One event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The event id: AMQP `message_id` and the consumers' dedupe key (P03).
    pub id: Uuid,
    /// `<service>.<aggregate>.<event>`: AMQP `type` and the routing key.
    pub event_type: String,
    /// The JSON body (a serialized `keel_events::Envelope`).
    pub body: Vec<u8>,
    /// W3C `traceparent`; when `None` a fresh one is generated so every message carries one.
    pub traceparent: Option<String>,
    /// When the event happened (unix seconds): AMQP `timestamp`.
    pub timestamp: u64,
}

impl Outgoing {
    /// The message as the relay sends an outbox row.
    pub fn from_outbox(row: &keel_pg::outbox::Pending) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: row.id,
            event_type: row.event_type.clone(),
            body: serde_json::to_vec(&row.payload)?,
            traceparent: row.traceparent.clone(),
            timestamp: u64::try_from(row.created_at.timestamp()).unwrap_or(0),
        })
    }

    /// The routing key and the conventional properties.
    fn routing(&self) -> Result<(ShortString, BasicProperties), AmqpError> {
        let routing_key = topology::short(&self.event_type)?;
        Ok((routing_key.clone(), self.properties(routing_key)))
    }

    fn properties(&self, event_type: ShortString) -> BasicProperties {
        let traceparent = self.traceparent.clone().unwrap_or_else(fresh_traceparent);
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(traceparent)),
        );
        BasicProperties::default()
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_type(event_type)
            .with_timestamp(self.timestamp)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers)
    }
}

/// A new, valid W3C trace context (`00-<trace id>-<span id>-01`) for an event written
/// outside any trace, so the consumer's logs and spans still share one trace id.
///
/// Sampled (`01`): a parent-based sampler downstream would otherwise drop the consumer's
/// spans for exactly the messages nobody traced upstream.
pub fn fresh_traceparent() -> String {
    // v4 UUIDs are random and never all-zero (the version bits are set), as W3C requires.
    let trace = Uuid::new_v4().simple().to_string();
    let span = Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &span[..16])
}

/// A confirm-mode channel that is (re)opened on demand. One per relay task: confirms are
/// per channel, and a channel is not shared between concurrent batches.
#[derive(Debug)]
pub struct Publisher {
    broker: Broker,
    channel: Option<Channel>,
    confirm_timeout: Duration,
}

impl Publisher {
    /// A publisher on `broker` that waits at most `confirm_timeout` for a batch's confirms.
    pub fn new(broker: Broker, confirm_timeout: Duration) -> Self {
        Self {
            broker,
            channel: None,
            confirm_timeout,
        }
    }

    /// The open confirm-mode channel, opening (and declaring [`topology::EXCHANGE`]) if needed.
    /// Fails fast when the broker is not connected.
    pub async fn ready(&mut self) -> Result<&Channel, AmqpError> {
        if self
            .channel
            .as_ref()
            .is_some_and(|c| !c.status().connected())
        {
            self.channel = None;
        }
        if self.channel.is_none() {
            topology::ensure_exchanges(&self.broker).await?;
            let channel = self.broker.channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.channel = Some(channel);
        }
        self.channel.as_ref().ok_or(AmqpError::NotConnected)
    }

    /// Publishes `batch` to [`topology::EXCHANGE`] and awaits every confirm.
    ///
    /// The outer error means nothing was published (no channel). Otherwise the result has one
    /// entry per message, in order: `Ok` only for messages the broker confirmed.
    pub async fn publish_batch(
        &mut self,
        batch: &[Outgoing],
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let channel = self.ready().await?.clone();
        let exchange = ShortString::from(topology::EXCHANGE);

        // Send everything first: confirms arrive asynchronously, so one batch costs one
        // round trip.
        let mut pending = Vec::with_capacity(batch.len());
        for message in batch {
            // A type longer than AMQP allows fails this message alone, not the batch.
            let (routing_key, properties) = match message.routing() {
                Ok(r) => r,
                Err(e) => {
                    pending.push(Err(e));
                    continue;
                }
            };
            let sent = tokio::time::timeout_at(
                deadline,
                channel.basic_publish(
                    exchange.clone(),
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                ),
            )
            .await;
            pending.push(match sent {
                Err(_) => Err(AmqpError::Timeout("basic.publish")),
                Ok(Err(e)) => Err(AmqpError::from(e)),
                Ok(Ok(confirm)) => Ok(confirm),
            });
        }

        let mut results = Vec::with_capacity(batch.len());
        let mut channel_suspect = false;
        for sent in pending {
            let result = match sent {
                Err(e) => Err(e),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => Err(AmqpError::Timeout("publisher confirm")),
                    Ok(Err(e)) => Err(AmqpError::from(e)),
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(AmqpError::Unroutable {
                        exchange: topology::EXCHANGE.to_owned(),
                        routing_key: returned.delivery.routing_key.to_string(),
                    }),
                    Ok(Ok(Confirmation::Nack(_))) => Err(AmqpError::Nacked),
                    // Cannot happen on a confirm-mode channel; never count it as confirmed.
                    Ok(Ok(Confirmation::NotRequested)) => Err(AmqpError::Timeout("confirm mode")),
                },
            };
            channel_suspect |= matches!(result, Err(AmqpError::Timeout(_) | AmqpError::Lapin(_)));
            results.push(result);
        }
        if channel_suspect {
            self.abandon();
        }
        Ok(results)
    }

    /// Drops the channel at once and closes it in the background (bounded). After a missed
    /// deadline the channel is as stalled as the confirm was: waiting for its close would
    /// delay the caller's handling of the failure by the close's own bound.
    fn abandon(&mut self) {
        if let Some(channel) = self.channel.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    channel.close(200, "discarded".into()),
                )
                .await;
            });
        }
    }

    /// Drops the channel (closing it, bounded); the next publish opens a fresh one.
    pub async fn discard(&mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                channel.close(200, "discarded".into()),
            )
            .await;
        }
    }
}

/// Publishes one message with `mandatory` on a confirm-mode `channel` and waits (at most 10 s)
/// for the broker's confirm: `Ok` only when the broker stored it. Unroutable (returned) and
/// nacked are errors the caller sees. The consumer moves messages to tiers and DLQs with it;
/// `keelctl dlq replay` sends them back with it.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    let confirm = channel
        .basic_publish(
            topology::short(exchange)?,
            topology::short(routing_key)?,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?;
    match tokio::time::timeout(Duration::from_secs(10), confirm).await {
        Err(_) => Err(AmqpError::Timeout("publisher confirm")),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(AmqpError::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Ok(Ok(Confirmation::Nack(_))) => Err(AmqpError::Nacked),
        Ok(Ok(Confirmation::NotRequested)) => Err(AmqpError::Timeout("confirm mode")),
    }
}
