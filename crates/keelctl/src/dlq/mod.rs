//! `keelctl dlq`: the dead letters of every consumer queue and of `keel.unrouted` (P01):
//! list, show, replay, purge.
//!
//! Where dead letters are: a consumer dead-letters a message it rejected, that panicked its
//! handler or that used up its retry tiers to `<queue>.dlq`, with headers saying why
//! ([`keel_amqp::topology::headers`]); the broker dead-letters there a message nobody settled
//! within the queue's delivery limit (its `x-death` headers say why); and `keel.events` keeps
//! what no queue is bound to in `keel.unrouted`. Those are the only queues this module reads
//! ([`DeadLetterQueue`]): a consumer queue is never browsed (each browse counts as a delivery
//! towards its `x-delivery-limit`) nor purged.
//!
//! Reading without removing: AMQP 0-9-1 has no "peek". A browse ([`browse`]) consumes with
//! manual acks and a prefetch of the messages it wants, then closes the channel without acking
//! any, and the broker puts them back. They come back marked redelivered, their quorum-queue
//! delivery count one higher; DLQs have no delivery limit, so nothing else changes.
//!
//! Replay ([`replay()`]) must not be swallowed by deduplication. The copy keeps the dead
//! letter's `message_id` and every property: consumers dedupe by message id in their inbox
//! (P03), and a dead-lettered message's handler never committed, so its id is not in the inbox
//! and the copy is processed exactly once; a message that did commit somewhere (the
//! fan-out of one event to two queues, replayed with `--to-original`) is dropped there as the
//! duplicate it is. The copy's `x-keel-attempts` is 0, so the retry tiers apply again, and
//! `x-keel-replays` counts the replays. Only after the broker confirms the copy is the dead
//! letter acked: a failed publish leaves it where it was.
//!
//! Replay runs as `keel_operator`, who may publish any key of `keel.events`, so where a copy
//! goes must not be up to the message: by default it goes back into the queue whose DLQ holds
//! it, a route taken from the DLQ's name ([`DeadLetterQueue::consumer_queue`]). The original
//! route in a dead letter's headers is only as trustworthy as the service that dead-lettered
//! it, and is followed only when asked (`--to-original`, [`Destination::Original`]).
//!
//! Must not break: nothing here acks a message it has not first republished and seen
//! confirmed; everything else a browse touched goes back to its queue when the channel closes;
//! a replay's default route never comes from the message's headers.

mod browse;
mod message;
mod purge;
mod render;
mod replay;

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_amqp::topology::{UNROUTED_QUEUE, dead_letter_queue};

pub use browse::{Listing, list, show};
pub use message::{Body, DeadLetter, Death, Route, Shown};
pub use purge::{Consent, confirm, consent, depth, purge};
pub use render::{list_table, replay_table, show_text};
pub use replay::{Destination, Outcome, ReplayRequest, ReplaySummary, Replayed, Selection, replay};

use crate::BrokerError;
use crate::registry::Registry;

/// Suffix of a dead-letter queue's name ([`dead_letter_queue`]).
const DLQ_SUFFIX: &str = ".dlq";

/// A queue dead letters wait in: a consumer queue's `<queue>.dlq`, or `keel.unrouted`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadLetterQueue(String);

impl DeadLetterQueue {
    /// The DLQ of consumer queue `queue`.
    pub fn of(queue: &str) -> Self {
        Self(dead_letter_queue(queue))
    }

    /// `keel.unrouted`: what `keel.events` had no queue for.
    pub fn unrouted() -> Self {
        Self(UNROUTED_QUEUE.to_owned())
    }

    /// An operator's `--queue` for reading and replaying: a DLQ's name
    /// (`notification.events.dlq`), `keel.unrouted`, or a consumer queue, meaning its DLQ
    /// (`notification.events`). Never the consumer queue itself: see the module docs.
    pub fn from_arg(name: &str) -> Self {
        Self::exact(name).unwrap_or_else(|_| Self::of(name))
    }

    /// Exactly the queue `name`, which must be a DLQ or `keel.unrouted`: what `purge` takes,
    /// so that a destructive command never guesses.
    pub fn exact(name: &str) -> Result<Self, DlqError> {
        if name == UNROUTED_QUEUE || (name.ends_with(DLQ_SUFFIX) && name.len() > DLQ_SUFFIX.len()) {
            Ok(Self(name.to_owned()))
        } else {
            Err(DlqError::NotADeadLetterQueue {
                queue: name.to_owned(),
                dlq: dead_letter_queue(name),
            })
        }
    }

    /// Every registered consumer queue's DLQ (the registry's `consumes`), then `keel.unrouted`.
    pub fn registered(registry: &Registry) -> Vec<Self> {
        registry
            .services
            .iter()
            .flat_map(|s| s.consumes.iter().map(|q| Self::of(q)))
            .chain(std::iter::once(Self::unrouted()))
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The consumer queue whose dead letters these are (`notification.events` for
    /// `notification.events.dlq`): where a default replay sends them back. Read from this
    /// queue's name, which the broker's dead-lettering chose (`keel.dlx`, routing key
    /// `<queue>`), never from a message. `None` for `keel.unrouted`: no consumer failed there.
    pub fn consumer_queue(&self) -> Option<&str> {
        self.0.strip_suffix(DLQ_SUFFIX).filter(|q| !q.is_empty())
    }

    /// Whether this is `keel.unrouted` (no consumer failed: nothing was bound).
    pub fn is_unrouted(&self) -> bool {
        self.0 == UNROUTED_QUEUE
    }
}

impl std::fmt::Display for DeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A routing-key pattern as topic exchanges match them: words separated by `.`, `*` one word,
/// `#` zero or more words (`checkout.order.*`, `billing.#`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Vec<String>);

impl TopicPattern {
    /// Parses `pattern`; an empty one is refused (it would match only an empty key).
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("a routing-key pattern may not be empty".to_owned());
        }
        Ok(Self(pattern.split('.').map(str::to_owned).collect()))
    }

    /// Whether `routing_key` matches, as RabbitMQ's topic exchange would route it.
    pub fn matches(&self, routing_key: &str) -> bool {
        let words: Vec<&str> = routing_key.split('.').collect();
        let pattern: Vec<&str> = self.0.iter().map(String::as_str).collect();
        topic_match(&pattern, &words)
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// Recursive on `#` only; patterns are a handful of words, so no memo is needed.
fn topic_match(pattern: &[&str], words: &[&str]) -> bool {
    match (pattern.split_first(), words.split_first()) {
        (None, None) => true,
        (Some((&"#", rest)), _) => {
            topic_match(rest, words) || (!words.is_empty() && topic_match(pattern, &words[1..]))
        }
        (Some((&"*", rest)), Some((_, more))) => topic_match(rest, more),
        (Some((p, rest)), Some((w, more))) => p == w && topic_match(rest, more),
        _ => false,
    }
}

/// Which dead letters a command is about (every condition set must hold).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Message ids (`--id`, repeatable): any of them.
    pub ids: Vec<String>,
    /// The original routing key matches this pattern.
    pub routing_key: Option<TopicPattern>,
    /// The error text contains this, ignoring case.
    pub error: Option<String>,
    /// First failed (or was sent, if it never failed) at least this long ago.
    pub older_than: Option<Duration>,
}

impl Filter {
    /// Whether no condition is set (every dead letter matches).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.routing_key.is_none()
            && self.error.is_none()
            && self.older_than.is_none()
    }

    /// Whether `message` meets every condition, judged at `now`.
    pub fn matches(&self, message: &DeadLetter, now: DateTime<Utc>) -> bool {
        if !self.ids.is_empty()
            && !message
                .message_id
                .as_ref()
                .is_some_and(|id| self.ids.contains(id))
        {
            return false;
        }
        if let Some(pattern) = &self.routing_key
            && !message
                .origin
                .as_ref()
                .is_some_and(|r| pattern.matches(&r.routing_key))
        {
            return false;
        }
        if let Some(needle) = &self.error {
            let needle = needle.to_lowercase();
            let found = [message.error.as_deref(), Some(message.failure.as_str())]
                .into_iter()
                .flatten()
                .any(|text| text.to_lowercase().contains(&needle));
            if !found {
                return false;
            }
        }
        if let Some(min) = self.older_than {
            let old_enough = message
                .failed_at
                .and_then(|at| (now - at).to_std().ok())
                .is_some_and(|age| age >= min);
            if !old_enough {
                return false;
            }
        }
        true
    }
}

/// Why a `dlq` command could not run.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A named queue does not exist in the vhost.
    #[error("queue {0} does not exist")]
    NoSuchQueue(String),
    /// `purge` of something that is not a DLQ or `keel.unrouted`.
    #[error(
        "{queue} is not a dead-letter queue: only <queue>.dlq (here {dlq}) and keel.unrouted \
         may be purged"
    )]
    NotADeadLetterQueue { queue: String, dlq: String },
    /// `replay` with nothing to say which messages.
    #[error(
        "replay needs a selector (--id, --routing-key, --error, --older-than) or --all to \
         replay every dead letter of the selected queues"
    )]
    NoSelector,
}

/// Parses a `--older-than` duration (`30m`, `2h`, `1d`).
pub fn parse_age(s: &str) -> Result<Duration, String> {
    keel_config::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 15m, 2h, 1d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        TopicPattern::parse(pattern)
            .map(|p| p.matches(key))
            .unwrap_or(false)
    }

    #[test]
    fn routing_key_patterns_match_as_a_topic_exchange_routes() {
        assert!(matches("checkout.order.*", "checkout.order.confirmed"));
        assert!(!matches("checkout.order.*", "checkout.order"));
        assert!(!matches("checkout.order.*", "checkout.order.confirmed.v2"));
        assert!(matches("checkout.#", "checkout"));
        assert!(matches("checkout.#", "checkout.order.confirmed"));
        assert!(matches("#", "anything.at.all"));
        assert!(matches("#.confirmed", "checkout.order.confirmed"));
        assert!(matches("*.order.#", "billing.order"));
        assert!(!matches("billing.#", "checkout.order.confirmed"));
        assert!(matches(
            "checkout.order.confirmed",
            "checkout.order.confirmed"
        ));
        assert!(TopicPattern::parse("").is_err());
    }

    #[test]
    fn a_queue_argument_means_its_dlq_but_purge_takes_only_a_dlq() {
        assert_eq!(
            DeadLetterQueue::from_arg("notification.events").name(),
            "notification.events.dlq"
        );
        assert_eq!(
            DeadLetterQueue::from_arg("notification.events.dlq").name(),
            "notification.events.dlq"
        );
        assert_eq!(
            DeadLetterQueue::from_arg("keel.unrouted").name(),
            "keel.unrouted"
        );
        assert!(DeadLetterQueue::exact("notification.events.dlq").is_ok());
        assert!(DeadLetterQueue::exact("keel.unrouted").is_ok());
        let refused = DeadLetterQueue::exact("notification.events")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("notification.events.dlq"),
            "names the DLQ meant: {refused}"
        );
        assert!(DeadLetterQueue::exact(".dlq").is_err());
    }

    #[test]
    fn a_dlq_names_its_consumer_queue_and_keel_unrouted_has_none() {
        assert_eq!(
            DeadLetterQueue::from_arg("notification.events").consumer_queue(),
            Some("notification.events")
        );
        assert_eq!(
            DeadLetterQueue::from_arg("notification.events.dlq").consumer_queue(),
            Some("notification.events")
        );
        assert_eq!(DeadLetterQueue::unrouted().consumer_queue(), None);
    }
}
