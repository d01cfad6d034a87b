//! `dlq replay`: send selected dead letters back to be processed again (see the module docs
//! of [`crate::dlq`] for why the copy keeps its message id).
//!
//! Per message, in queue order: browse it (unacked), decide, publish the copy with
//! [`publish_confirmed`] on a confirm-mode channel of its own, and only after the broker's
//! confirm ack the dead letter. Where the copy goes is a [`Destination`]:
//! - by default, back into the consumer queue whose DLQ holds it: `keel.retry` with routing
//!   key `<queue>` for `<queue>.dlq`, the retry exchange's binding that reaches that one queue.
//!   It is the only consumer that did not process the message (any other bound to the same key
//!   did, and its inbox would drop the copy), and the route comes from the DLQ's name, which
//!   the broker chose, not from the message;
//! - with [`Destination::Queue`] (`--to-queue`), the same into another consumer queue;
//! - with [`Destination::Original`] (`--to-original`), the exchange and routing key the
//!   message's headers record ([`Parts::origin`]), and only when that exchange is
//!   `keel.events`: every queue bound to that key gets it again.
//!
//! Must not break: the default route never comes from the message. Its `x-keel-original-*`
//! and `x-death` headers are written by whoever dead-lettered it, and a service's broker user
//! may publish to `keel.dlx` under its own queue prefix: a compromised service could plant a
//! dead letter that claims to be `billing.payment.captured`, and the operator, who may write
//! any key of `keel.events`, would publish it to every billing consumer. Into the failed queue
//! the worst such a message does is reach the service that planted it. (Keel's consumer keeps
//! `x-keel-original-*` headers a message already carries when it dead-letters it, so whoever
//! published the message could have written them too.) `--to-original` trusts those headers as
//! much as the service that dead-lettered the message, and says so.
//!
//! A copy the broker did not confirm (nacked, unroutable, refused) leaves its dead letter in
//! the DLQ and counts as failed. A selected message with no allowed destination (in
//! `keel.unrouted` without `--to-queue` or `--to-original`; with `--to-original`, no recorded
//! route or one outside `keel.events`) is skipped with the reason and stays. Unselected
//! messages are never acked: closing the browse returns them. A copy that fails again while the
//! replay still runs lands at the DLQ's tail; a message id already replayed in this run is
//! skipped, so one run replays a message once.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use keel_amqp::publisher::publish_confirmed;
use keel_amqp::topology::{EXCHANGE, RETRY_EXCHANGE, headers};
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::time::{Interval, MissedTickBehavior};

use super::browse::Browser;
use super::message::{Parts, Route, int};
use super::{DeadLetterQueue, DlqError, Filter};
use crate::BrokerError;
use crate::queues::close;

/// Which dead letters to replay: a non-empty filter, or all of them, said explicitly.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Matching(Filter),
}

impl Selection {
    /// `--all`, or the filter; neither is [`DlqError::NoSelector`]: a replay of everything
    /// must be asked for, not fallen into.
    pub fn new(all: bool, filter: Filter) -> Result<Self, DlqError> {
        match (all, filter.is_empty()) {
            (true, _) => Ok(Self::All),
            (false, false) => Ok(Self::Matching(filter)),
            (false, true) => Err(DlqError::NoSelector),
        }
    }

    fn matches(&self, message: &super::DeadLetter, now: chrono::DateTime<Utc>) -> bool {
        match self {
            Self::All => true,
            Self::Matching(filter) => filter.matches(message, now),
        }
    }
}

/// Where a replay sends its copies (see the module docs for why the default is what it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Destination {
    /// Back into the consumer queue whose DLQ holds the message, through `keel.retry`
    /// (`<queue>.dlq`: routing key `<queue>`). The route is the DLQ's name, never the
    /// message's headers. `keel.unrouted` has no such queue: its messages are skipped.
    #[default]
    FailedQueue,
    /// Into this consumer queue, through `keel.retry` (`--to-queue`).
    Queue(String),
    /// To the exchange and routing key the message's headers record (`--to-original`), when
    /// that exchange is `keel.events`; else skipped. The headers are written by whoever
    /// dead-lettered the message: this trusts them as much as that service.
    Original,
}

impl Destination {
    /// Where the copy of a message in `queue`, whose headers record `origin`, goes; or why it
    /// does not go anywhere.
    pub fn route(&self, queue: &DeadLetterQueue, origin: Option<&Route>) -> Result<Route, String> {
        let through_retry = |queue: &str| Route {
            exchange: RETRY_EXCHANGE.to_owned(),
            routing_key: queue.to_owned(),
        };
        match self {
            Self::FailedQueue => queue.consumer_queue().map(through_retry).ok_or_else(|| {
                format!(
                    "{queue} has no consumer queue to return it to: name one with --to-queue, \
                     or send it to its recorded route with --to-original"
                )
            }),
            Self::Queue(name) => Ok(through_retry(name)),
            Self::Original => match origin {
                Some(origin) if origin.exchange == EXCHANGE => Ok(origin.clone()),
                Some(origin) => Err(format!(
                    "its headers name exchange {}: --to-original replays to {EXCHANGE} only",
                    origin.exchange
                )),
                None => Err(
                    "nothing records where it was first published: replay it without \
                     --to-original, or with --to-queue"
                        .to_owned(),
                ),
            },
        }
    }
}

/// A replay to run.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub queues: Vec<DeadLetterQueue>,
    pub selection: Selection,
    /// Where the copies go.
    pub destination: Destination,
    /// Say what would be replayed; publish and ack nothing.
    pub dry_run: bool,
    /// Most copies published per second.
    pub rate: u32,
    /// Most messages looked at per queue.
    pub limit: u16,
    /// How long a browse waits for the next message (see [`Browser`]).
    pub idle: Duration,
}

/// What became of one selected dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Published, confirmed, acked out of the DLQ.
    Replayed,
    /// `dry_run`: would have been replayed.
    WouldReplay,
    /// Not confirmed: still in the DLQ.
    Failed { error: String },
    /// No destination it may go to ([`Destination::route`] says why): left in the DLQ.
    Skipped { reason: String },
}

/// One selected dead letter and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub queue: String,
    pub message_id: Option<String>,
    /// Where the copy went (or would go).
    pub to: Option<Route>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A replay's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    pub dry_run: bool,
    /// Copies confirmed and dead letters acked (or, in a dry run, that would be).
    pub replayed: usize,
    /// Looked at and left in place: not selected, already replayed in this run, or selected
    /// with no destination it may go to ([`Outcome::Skipped`]).
    pub skipped: usize,
    /// Selected but not confirmed: left in the DLQ.
    pub failed: usize,
    /// Queues that do not exist.
    pub missing: Vec<String>,
    /// Every selected message, in the order handled.
    pub messages: Vec<Replayed>,
}

/// Runs `request` on `conn` (see the module docs).
pub async fn replay(conn: &Connection, request: &ReplayRequest) -> Result<ReplaySummary, DlqError> {
    let mut summary = ReplaySummary {
        dry_run: request.dry_run,
        ..ReplaySummary::default()
    };
    let mut publisher = Publisher::new(conn);
    // Bounded whatever a library caller passes (the CLI refuses more than 1000/s itself).
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / request.rate.clamp(1, 1000));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seen = HashSet::new();
    for queue in &request.queues {
        let Some(mut browser) = Browser::open(conn, queue, request.limit, request.idle).await?
        else {
            summary.missing.push(queue.to_string());
            continue;
        };
        let result = walk(
            &mut browser,
            request,
            &mut publisher,
            &mut ticker,
            &mut seen,
            &mut summary,
        )
        .await;
        browser.close().await;
        result?;
    }
    publisher.close().await;
    Ok(summary)
}

async fn walk(
    browser: &mut Browser,
    request: &ReplayRequest,
    publisher: &mut Publisher<'_>,
    ticker: &mut Interval,
    seen: &mut HashSet<String>,
    summary: &mut ReplaySummary,
) -> Result<(), BrokerError> {
    let queue = browser.queue.clone();
    while let Some(delivery) = browser.next().await? {
        let parts = Parts::of(queue.name(), &delivery);
        let now = Utc::now();
        let message = parts.summary(now);
        // A copy that failed again during this run is back at the tail: not twice.
        let key = message
            .message_id
            .clone()
            .unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(&delivery.data)));
        if !request.selection.matches(&message, now) || seen.contains(&key) {
            summary.skipped += 1;
            continue;
        }
        let origin = parts.origin();
        let route = request.destination.route(&queue, origin.as_ref());
        let outcome = match &route {
            Err(reason) => Outcome::Skipped {
                reason: reason.clone(),
            },
            Ok(_) if request.dry_run => Outcome::WouldReplay,
            Ok(to) => {
                ticker.tick().await;
                let copy = copy_properties(&delivery.properties, origin.as_ref());
                match publisher.publish(to, &delivery.data, copy).await {
                    // Confirmed: now, and only now, the dead letter may go.
                    Ok(()) => {
                        browser.ack(&delivery).await?;
                        Outcome::Replayed
                    }
                    Err(error) => Outcome::Failed { error },
                }
            }
        };
        match outcome {
            Outcome::Replayed | Outcome::WouldReplay => {
                seen.insert(key);
                summary.replayed += 1;
            }
            Outcome::Failed { .. } => summary.failed += 1,
            Outcome::Skipped { .. } => summary.skipped += 1,
        }
        summary.messages.push(Replayed {
            queue: queue.to_string(),
            message_id: message.message_id,
            to: route.ok(),
            outcome,
        });
    }
    Ok(())
}

/// Headers a replayed copy does not carry over (see [`copy_properties`]).
const STALE_ON_REPLAY: [&str; 5] = [
    "x-delivery-count",
    "x-death",
    headers::ERROR,
    headers::FAILURE,
    headers::LAST_FAILURE,
];

/// The copy's properties: all of the dead letter's (message id first of all), with
/// `x-keel-attempts` reset to 0 so the retry tiers apply again, `x-keel-replays` one higher,
/// the route it is replayed as (`origin`: see [`Parts::origin`]) recorded in
/// `x-keel-original-*` (the consumer reads the routing key from there after a replay through
/// `keel.retry`; for a message from `keel.unrouted` it is the route the broker kept, not what
/// its headers claimed), and the bookkeeping of the dead letter
/// dropped ([`STALE_ON_REPLAY`], `x-first-death-*`, `x-last-death-*`): the broker's
/// `x-delivery-count` counted deliveries of the dead letter, not of the copy.
pub(crate) fn copy_properties(
    properties: &BasicProperties,
    origin: Option<&Route>,
) -> BasicProperties {
    let original = properties.headers().clone().unwrap_or_default();
    let replays = original
        .inner()
        .get(headers::REPLAYS)
        .and_then(int)
        .unwrap_or(0);
    let mut table: FieldTable = original
        .inner()
        .iter()
        // The broker's and the last failure's bookkeeping describe the dead letter, not the
        // copy: a copy that fails again gets fresh ones, and a stale `x-death` would make a
        // later listing read the old cause first. The first failure's time stays: it has been
        // failing since then.
        .filter(|(k, _)| {
            !STALE_ON_REPLAY.contains(&k.as_str())
                && !k.as_str().starts_with("x-first-death-")
                && !k.as_str().starts_with("x-last-death-")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(0));
    table.insert(
        headers::REPLAYS.into(),
        AMQPValue::LongLongInt(replays.saturating_add(1)),
    );
    if let Some(origin) = origin {
        for (name, value) in [
            (headers::ORIGINAL_EXCHANGE, &origin.exchange),
            (headers::ORIGINAL_ROUTING_KEY, &origin.routing_key),
        ] {
            table.insert(
                name.into(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
    }
    properties.clone().with_headers(table)
}

/// A confirm-mode channel opened on first use and again after one the broker closed (a
/// refused publish closes its channel; the browse, on its own channel, is not affected).
struct Publisher<'a> {
    conn: &'a Connection,
    channel: Option<Channel>,
}

impl<'a> Publisher<'a> {
    fn new(conn: &'a Connection) -> Self {
        Self {
            conn,
            channel: None,
        }
    }

    async fn channel(&mut self) -> Result<&Channel, lapin::Error> {
        let channel = match self.channel.take() {
            Some(open) if open.status().connected() => open,
            _ => {
                let fresh = self.conn.create_channel().await?;
                fresh
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                fresh
            }
        };
        Ok(self.channel.insert(channel))
    }

    /// Publishes and waits for the confirm; the error as the summary shows it.
    async fn publish(
        &mut self,
        to: &Route,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), String> {
        let channel = self.channel().await.map_err(|e| e.to_string())?;
        let result =
            publish_confirmed(channel, &to.exchange, &to.routing_key, body, properties).await;
        if let Err(keel_amqp::AmqpError::Timeout(_)) = result {
            // A late confirm must not be taken for the next copy's: start a fresh channel.
            if let Some(channel) = self.channel.take() {
                close(channel).await;
            }
        }
        result.map_err(|e| e.to_string())
    }

    async fn close(self) {
        if let Some(channel) = self.channel {
            close(channel).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(p: &BasicProperties, name: &str) -> Option<AMQPValue> {
        p.headers().as_ref()?.inner().get(name).cloned()
    }

    #[test]
    fn a_copy_keeps_its_message_id_resets_attempts_and_counts_the_replay() {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
        h.insert(headers::REPLAYS.into(), AMQPValue::LongLongInt(1));
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
        h.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-abc-def-01".into()),
        );
        let dead = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("test.work.item".into())
            .with_headers(h);
        let origin = Route {
            exchange: "keel.events".into(),
            routing_key: "test.work.item".into(),
        };
        let copy = copy_properties(&dead, Some(&origin));
        assert_eq!(copy.message_id(), dead.message_id());
        assert_eq!(copy.kind(), dead.kind());
        assert_eq!(
            header(&copy, headers::ATTEMPTS),
            Some(AMQPValue::LongLongInt(0))
        );
        assert_eq!(
            header(&copy, headers::REPLAYS),
            Some(AMQPValue::LongLongInt(2))
        );
        assert_eq!(header(&copy, "x-delivery-count"), None);
        assert!(header(&copy, "traceparent").is_some());
        assert_eq!(
            header(&copy, headers::ORIGINAL_ROUTING_KEY),
            Some(AMQPValue::LongString("test.work.item".into()))
        );
    }

    #[test]
    fn by_default_the_route_is_the_dlqs_own_queue_whatever_the_message_claims() {
        let forged = Route {
            exchange: "keel.events".into(),
            routing_key: "billing.payment.captured".into(),
        };
        let dlq = DeadLetterQueue::of("notification.events");
        let back = Route {
            exchange: "keel.retry".into(),
            routing_key: "notification.events".into(),
        };
        assert_eq!(
            Destination::FailedQueue.route(&dlq, Some(&forged)),
            Ok(back.clone())
        );
        assert_eq!(Destination::FailedQueue.route(&dlq, None), Ok(back));
        assert_eq!(
            Destination::Queue("other.work".into()).route(&dlq, Some(&forged)),
            Ok(Route {
                exchange: "keel.retry".into(),
                routing_key: "other.work".into(),
            })
        );
        let unrouted = Destination::FailedQueue
            .route(&DeadLetterQueue::unrouted(), Some(&forged))
            .unwrap_err();
        assert!(unrouted.contains("--to-queue"), "{unrouted}");
    }

    #[test]
    fn to_original_follows_the_headers_into_keel_events_only() {
        let dlq = DeadLetterQueue::of("notification.events");
        let recorded = Route {
            exchange: "keel.events".into(),
            routing_key: "checkout.order.confirmed".into(),
        };
        assert_eq!(
            Destination::Original.route(&dlq, Some(&recorded)),
            Ok(recorded)
        );
        for exchange in ["keel.retry", "keel.dlx", "amq.topic", ""] {
            let elsewhere = Route {
                exchange: exchange.into(),
                routing_key: "notification.events".into(),
            };
            let refused = Destination::Original
                .route(&dlq, Some(&elsewhere))
                .unwrap_err();
            assert!(refused.contains("keel.events only"), "{refused}");
        }
        assert!(Destination::Original.route(&dlq, None).is_err());
    }

    #[test]
    fn a_replay_needs_a_selector_or_all() {
        assert!(matches!(
            Selection::new(false, Filter::default()),
            Err(DlqError::NoSelector)
        ));
        assert!(matches!(
            Selection::new(true, Filter::default()),
            Ok(Selection::All)
        ));
        let by_id = Filter {
            ids: vec!["m-1".into()],
            ..Filter::default()
        };
        assert!(matches!(
            Selection::new(false, by_id),
            Ok(Selection::Matching(_))
        ));
    }
}
