//! RabbitMQ topology as code: exchanges, queues, bindings, retry tiers and dead-letter queues
//! (P01, P02, P03, P05).
//!
//! Four exchanges, declared by every service (idempotent, on every (re)connect):
//! - [`EXCHANGE`] `keel.events` (topic): every domain event, routing key = event type
//!   (`checkout.order.confirmed`). Its `alternate-exchange` is [`UNROUTED_EXCHANGE`], so an
//!   event no queue is bound to yet is **kept** in the [`UNROUTED_QUEUE`] (the newest 10,000,
//!   for 7 days) instead of being dropped by the broker at once (replayable with `keelctl dlq
//!   replay --queue keel.unrouted`).
//! - [`RETRY_EXCHANGE`] `keel.retry` (topic): the way back into one consumer's queue. A message
//!   a handler could not process *for now* goes to the queue's next retry tier
//!   (`<queue>.retry.10s`, a queue with that message TTL and no consumer); when it expires, the
//!   broker dead-letters it to `keel.retry` with the routing key `<queue>`, which only that
//!   queue is bound to, so other consumers of the event never see the retry.
//! - [`DEAD_LETTER_EXCHANGE`] `keel.dlx` (topic): routing key `<queue>` leads to `<queue>.dlq`.
//!   The consumer publishes there (with headers saying why) when a handler rejects a message or
//!   the last tier is used up; the broker dead-letters there when `x-delivery-limit` is reached
//!   (a handler that crashes the process, a consumer that never settles).
//! - [`UNROUTED_EXCHANGE`] `keel.unrouted` (fanout) into the bounded [`UNROUTED_QUEUE`].
//!
//! Every queue is a durable **quorum** queue, bounded (`x-max-length`); every consumer queue,
//! tier and DLQ with `x-overflow: reject-publish`: a full queue refuses new messages (the publisher's confirm is
//! a nack, so the outbox relay keeps the row) rather than dropping old ones. Dead-lettering out
//! of a consumer queue or a tier uses `x-dead-letter-strategy: at-least-once` (which requires
//! reject-publish), so a message moving to its DLQ or back from a tier cannot be lost between
//! the two queues. RabbitMQ 3.10 quorum queues have no delivery limit by default; every
//! consumer queue sets `x-delivery-limit` explicitly.
//!
//! The same topology is exported as a RabbitMQ definitions file ([`crate::definitions`],
//! `infra/rabbitmq/definitions.json`) that compose and Kubernetes load at broker boot; a test
//! (`e2e/tests/rabbitmq_definitions.rs`) fails when the file and this code disagree.
//!
//! Must not break: queue arguments are fixed when a queue is first declared; declaring it
//! again with different ones fails with `PRECONDITION_FAILED` (406). Changing a bound of an
//! existing queue is an operation (a policy, or a new queue), not a config edit; the error
//! names the queue so the operator sees which.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::AmqpError;

pub use keel_events::EXCHANGE;

/// The retry exchange: routing key `<queue>` re-enters that queue, `<queue>.retry.<tier>`
/// enters one of its tiers.
pub const RETRY_EXCHANGE: &str = "keel.retry";
/// The dead-letter exchange: routing key `<queue>` leads to `<queue>.dlq`.
pub const DEAD_LETTER_EXCHANGE: &str = "keel.dlx";
/// `keel.events`' alternate exchange: what no queue is bound to goes here.
pub const UNROUTED_EXCHANGE: &str = "keel.unrouted";
/// The queue behind [`UNROUTED_EXCHANGE`].
pub const UNROUTED_QUEUE: &str = "keel.unrouted";
/// Bounds of [`UNROUTED_QUEUE`], a diagnostic buffer rather than a delivery: the newest
/// 10,000 events nobody subscribes to, each for at most 7 days. When it is full the *oldest*
/// is dropped (`drop-head`), not the new one refused: an event that legitimately has no
/// subscriber yet (`notification.notification.recorded`) must not back up its producer's
/// outbox. Its depth is a metric (`keelctl queues`).
pub const UNROUTED_MAX_LENGTH: u32 = 10_000;
/// Message TTL of [`UNROUTED_QUEUE`] (7 days, in milliseconds).
pub const UNROUTED_TTL_MS: u32 = 7 * 24 * 3600 * 1000;

/// `x-delivery-limit` of the queues nobody consumes (DLQs, `keel.unrouted`): in effect none.
/// Explicit because RabbitMQ 4.x gives quorum queues a default limit of 20 and, with no
/// dead-letter exchange, drops a message past it: there every `keelctl dlq list` (a browse
/// that returns the messages) would count towards deleting the dead letters.
pub const PARKED_DELIVERY_LIMIT: u32 = 1_000_000;

/// Headers the consumer writes on a message it sends to a retry tier or a DLQ. `keelctl dlq`
/// reads them; they survive every hop because they are headers, not broker state.
pub mod headers {
    /// Failed attempts so far (the first failure makes it 1).
    pub const ATTEMPTS: &str = "x-keel-attempts";
    /// The last failure's reason, as the handler gave it.
    pub const ERROR: &str = "x-keel-error";
    /// `retry` (transient, tiers used up), `reject` (permanent) or `panic`.
    pub const FAILURE: &str = "x-keel-failure";
    /// Where the message was first published: exchange and routing key (a replay sends it
    /// back there).
    pub const ORIGINAL_EXCHANGE: &str = "x-keel-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-keel-original-routing-key";
    /// RFC 3339 times of the first and the last failure.
    pub const FIRST_FAILURE: &str = "x-keel-first-failure";
    pub const LAST_FAILURE: &str = "x-keel-last-failure";
    /// The consumer queue whose handler failed.
    pub const QUEUE: &str = "x-keel-queue";
    /// Set by `keelctl dlq replay`: how many times the message was replayed.
    pub const REPLAYS: &str = "x-keel-replays";
}

pub(crate) fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|_| AmqpError::InvalidName(s.chars().take(64).collect()))
}

/// The name of a retry tier's queue: `<queue>.retry.<delay>` (`notification.events.retry.10s`).
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", delay_label(delay))
}

/// The dead-letter queue of a consumer queue: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// `1s`, `10s`, `1500ms`: whole seconds when the delay is whole seconds.
fn delay_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// An exchange of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: &'static str,
    pub kind: ExchangeKind,
    /// `alternate-exchange`, if any.
    pub alternate: Option<&'static str>,
}

/// The exchange types Keel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Topic,
    Fanout,
}

impl ExchangeKind {
    /// The type's AMQP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Fanout => "fanout",
        }
    }
}

/// The platform's exchanges, in the order they must be declared (an alternate exchange first).
pub fn exchanges() -> [ExchangeSpec; 4] {
    let topic = |name| ExchangeSpec {
        name,
        kind: ExchangeKind::Topic,
        alternate: None,
    };
    [
        ExchangeSpec {
            name: UNROUTED_EXCHANGE,
            kind: ExchangeKind::Fanout,
            alternate: None,
        },
        ExchangeSpec {
            name: EXCHANGE,
            kind: ExchangeKind::Topic,
            alternate: Some(UNROUTED_EXCHANGE),
        },
        topic(RETRY_EXCHANGE),
        topic(DEAD_LETTER_EXCHANGE),
    ]
}

/// A consumer's queue and everything that hangs off it: bindings, retry tiers, DLQ.
///
/// Serialized (`<service> topology` prints a service's specs) with the tiers as humantime
/// strings (`"10s"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// `<service>.<purpose>`, e.g. `notification.events`.
    pub name: String,
    /// Routing-key patterns on [`EXCHANGE`] (`checkout.order.*`, `billing.payment.*`).
    pub bindings: Vec<String>,
    /// `x-delivery-limit`: deliveries the broker allows before it dead-letters a message the
    /// consumer never settled (a crash loop); handler failures are counted by the consumer
    /// itself ([`headers::ATTEMPTS`]).
    pub delivery_limit: u32,
    /// `x-max-length` of the queue and of each retry tier.
    pub max_length: u32,
    /// Delays of the retry tiers, in the order a failing message goes through them.
    #[serde(with = "tiers")]
    pub retry_tiers: Vec<Duration>,
    /// `x-max-length` of the DLQ.
    pub dead_letter_max_length: u32,
}

/// `Vec<Duration>` as a list of humantime strings.
mod tiers {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tiers: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(tiers.iter().map(|d| super::delay_label(*d)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| keel_config::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// One queue's declaration: name, arguments, and the bindings that lead to it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDeclaration {
    pub name: String,
    pub arguments: Vec<(&'static str, Argument)>,
    /// (exchange, routing key or pattern).
    pub bindings: Vec<(&'static str, String)>,
}

/// A queue argument's value (the two kinds Keel uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Argument {
    Text(String),
    Int(i64),
}

impl QueueDeclaration {
    fn new(name: String) -> Self {
        Self {
            name,
            arguments: vec![("x-queue-type", Argument::Text("quorum".into()))],
            bindings: Vec::new(),
        }
    }

    fn int(mut self, key: &'static str, value: impl Into<i64>) -> Self {
        self.arguments.push((key, Argument::Int(value.into())));
        self
    }

    fn text(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.arguments.push((key, Argument::Text(value.into())));
        self
    }

    fn bind(mut self, exchange: &'static str, key: impl Into<String>) -> Self {
        self.bindings.push((exchange, key.into()));
        self
    }

    /// Bounded, refusing when full, dead-lettering at least once to `exchange` with `key`.
    fn dead_letters_to(self, exchange: &'static str, key: &str, max_length: u32) -> Self {
        self.int("x-max-length", max_length)
            .text("x-overflow", "reject-publish")
            .text("x-dead-letter-exchange", exchange)
            .text("x-dead-letter-routing-key", key)
            .text("x-dead-letter-strategy", "at-least-once")
    }

    /// The arguments as lapin sends them.
    pub fn field_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in &self.arguments {
            let value = match value {
                Argument::Text(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                Argument::Int(n) => AMQPValue::LongLongInt(*n),
            };
            table.insert((*key).into(), value);
        }
        table
    }
}

impl QueueSpec {
    /// The consumer queue, its retry tiers and its DLQ, in declaration order (the DLQ first, so
    /// nothing can be dead-lettered towards a queue that does not exist yet).
    pub fn declarations(&self) -> Vec<QueueDeclaration> {
        let q = self.name.as_str();
        let dlq = QueueDeclaration::new(dead_letter_queue(q))
            .int("x-delivery-limit", PARKED_DELIVERY_LIMIT)
            .int("x-max-length", self.dead_letter_max_length)
            .text("x-overflow", "reject-publish")
            .bind(DEAD_LETTER_EXCHANGE, q);
        let mut out = vec![dlq];
        for delay in &self.retry_tiers {
            let name = retry_queue(q, *delay);
            let tier = QueueDeclaration::new(name.clone())
                .int(
                    "x-message-ttl",
                    i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                )
                .dead_letters_to(RETRY_EXCHANGE, q, self.max_length)
                .bind(RETRY_EXCHANGE, name);
            out.push(tier);
        }
        let mut main = QueueDeclaration::new(q.to_owned())
            .int("x-delivery-limit", self.delivery_limit)
            .dead_letters_to(DEAD_LETTER_EXCHANGE, q, self.max_length);
        for pattern in &self.bindings {
            main = main.bind(EXCHANGE, pattern.clone());
        }
        out.push(main.bind(RETRY_EXCHANGE, q));
        out
    }

    /// The retry tier a message goes to after its `attempts`-th failure (1-based), or `None`
    /// when the tiers are used up.
    pub fn tier_after(&self, attempts: u32) -> Option<Duration> {
        let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
        self.retry_tiers.get(index).copied()
    }
}

/// The queue behind [`UNROUTED_EXCHANGE`].
pub fn unrouted_queue() -> QueueDeclaration {
    QueueDeclaration::new(UNROUTED_QUEUE.to_owned())
        .int("x-delivery-limit", PARKED_DELIVERY_LIMIT)
        .int("x-max-length", UNROUTED_MAX_LENGTH)
        .int("x-message-ttl", UNROUTED_TTL_MS)
        .text("x-overflow", "drop-head")
        .bind(UNROUTED_EXCHANGE, "")
}

fn exchange_arguments(spec: &ExchangeSpec) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(alternate) = spec.alternate {
        args.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(alternate)),
        );
    }
    args
}

/// Where a fresh channel comes from: the service's supervised [`Broker`](crate::Broker), or a
/// plain connection (tests, tools).
pub trait OpenChannel {
    /// A new channel.
    fn open(&self) -> impl std::future::Future<Output = Result<Channel, AmqpError>> + Send;
}

impl OpenChannel for crate::Broker {
    fn open(&self) -> impl std::future::Future<Output = Result<Channel, AmqpError>> + Send {
        self.channel()
    }
}

impl OpenChannel for lapin::Connection {
    async fn open(&self) -> Result<Channel, AmqpError> {
        self.create_channel().await.map_err(AmqpError::from)
    }
}

/// Makes sure the platform's exchanges and `keel.unrouted` exist, the way a service does at
/// start-up: a *passive* check first, which needs no permission, so a service's user needs no
/// `configure` on the shared exchanges (with it, it could delete them) wherever the definitions
/// file was loaded at boot; only if one is missing (a broker without the file: a test's own
/// vhost) are they declared, which then takes a user allowed to.
pub async fn ensure_exchanges(source: &impl OpenChannel) -> Result<(), AmqpError> {
    let probe = source.open().await?;
    let mut present = true;
    for spec in exchanges() {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let kind = lapin_kind(spec.kind);
        if probe
            .exchange_declare(short(spec.name)?, kind, passive, FieldTable::default())
            .await
            .is_err()
        {
            // A failed passive declare closes the channel: nothing more to ask on it.
            present = false;
            break;
        }
    }
    if present {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        present = probe
            .queue_declare(short(UNROUTED_QUEUE)?, passive, FieldTable::default())
            .await
            .is_ok();
    }
    let _ = probe.close(200, "checked".into()).await;
    if present {
        return Ok(());
    }
    let channel = source.open().await?;
    let declared = declare_exchanges(&channel).await;
    let _ = channel.close(200, "declared".into()).await;
    declared
}

fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
    }
}

/// Declares the platform's exchanges and the unrouted queue (idempotent): what the
/// definitions file holds, for a broker that was not given it. Takes `configure` on them;
/// services use [`ensure_exchanges`].
pub async fn declare_exchanges(channel: &Channel) -> Result<(), AmqpError> {
    for spec in exchanges() {
        channel
            .exchange_declare(
                short(spec.name)?,
                lapin_kind(spec.kind),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                exchange_arguments(&spec),
            )
            .await
            .inspect_err(|e| {
                tracing::error!(exchange = spec.name, error = %e,
                    "declaring the exchange failed (arguments differ from the existing one's?)");
            })?;
    }
    declare(channel, &unrouted_queue()).await
}

/// Declares the exchanges, then `spec`'s DLQ, retry tiers and queue with their bindings
/// (idempotent). For tests and tools on a broker without the definitions file; a service
/// declares with [`ensure_exchanges`] and [`declare_own`].
pub async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    declare_exchanges(channel).await?;
    declare_own(channel, spec).await
}

/// Declares `spec`'s DLQ, retry tiers and queue with their bindings (idempotent): what a
/// service's user may configure, its own `<service>.` queues.
pub async fn declare_own(channel: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    for declaration in spec.declarations() {
        declare(channel, &declaration).await?;
    }
    Ok(())
}

async fn declare(channel: &Channel, declaration: &QueueDeclaration) -> Result<(), AmqpError> {
    let queue = short(&declaration.name)?;
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            declaration.field_table(),
        )
        .await
        .inspect_err(|e| {
            tracing::error!(queue = %declaration.name, error = %e,
                "declaring the queue failed (arguments differ from the existing queue's?)");
        })?;
    for (exchange, key) in &declaration.bindings {
        channel
            .queue_bind(
                queue.clone(),
                short(exchange)?,
                short(key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> QueueSpec {
        QueueSpec {
            name: "notification.events".into(),
            bindings: vec!["checkout.order.*".into()],
            delivery_limit: 20,
            max_length: 1000,
            retry_tiers: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_millis(1500),
            ],
            dead_letter_max_length: 500,
        }
    }

    #[test]
    fn tier_and_dlq_names_follow_the_queue() {
        let names: Vec<_> = spec().declarations().into_iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            [
                "notification.events.dlq",
                "notification.events.retry.1s",
                "notification.events.retry.10s",
                "notification.events.retry.1500ms",
                "notification.events",
            ]
        );
    }

    #[test]
    fn a_failure_goes_to_the_tiers_in_order_then_nowhere() {
        let s = spec();
        assert_eq!(s.tier_after(0), None, "no failure, no tier");
        assert_eq!(s.tier_after(1), Some(Duration::from_secs(1)));
        assert_eq!(s.tier_after(3), Some(Duration::from_millis(1500)));
        assert_eq!(s.tier_after(4), None, "tiers used up: the DLQ");
    }

    /// The arguments that make dead-lettering lossless on RabbitMQ 3.10 (see the module docs).
    #[test]
    fn the_consumer_queue_dead_letters_at_least_once_to_its_dlq() {
        let main = spec()
            .declarations()
            .pop()
            .unwrap_or_else(|| unreachable!());
        let arg = |k: &str| {
            main.arguments
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(arg("x-delivery-limit"), Some(Argument::Int(20)));
        assert_eq!(
            arg("x-dead-letter-exchange"),
            Some(Argument::Text("keel.dlx".into()))
        );
        assert_eq!(
            arg("x-dead-letter-strategy"),
            Some(Argument::Text("at-least-once".into()))
        );
        assert_eq!(
            arg("x-overflow"),
            Some(Argument::Text("reject-publish".into()))
        );
        assert_eq!(
            main.bindings,
            [
                ("keel.events", "checkout.order.*".to_owned()),
                ("keel.retry", "notification.events".to_owned())
            ]
        );
    }
}
