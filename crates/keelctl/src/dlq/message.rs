//! One dead letter as an operator reads it: why it failed, where it came from, how old it is.
//!
//! Two writers, two dialects. Keel's consumer writes [`headers`] (`x-keel-*`: the error, the
//! attempts, the original exchange and routing key, the failure times). The broker, when it
//! dead-letters a message itself (the delivery limit), writes `x-death`: one entry per queue
//! and reason, newest first, each with the exchange and routing keys the message had when it
//! entered that queue, and `x-first-death-*` for the first. A message can carry both (the
//! consumer's tiers are TTL queues, so a message back from a tier has an `x-death` entry
//! too); the `x-keel-*` headers then win, since they name the route the message was first
//! published on. A message in `keel.unrouted` was kept as published: its own exchange and
//! routing key, which the broker set, are its route, whatever its headers say.
//!
//! Both dialects are written by whoever dead-lettered the message, and a service may publish
//! dead letters of its own queues: [`Parts::origin`] is what the message claims, shown to the
//! operator and matched by `--routing-key`, and a replay goes there only when asked
//! (`--to-original`; see [`super::replay`]).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use keel_amqp::topology::{DEAD_LETTER_EXCHANGE, UNROUTED_QUEUE, headers};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::Value;

/// Bodies larger than this are shown truncated (`dlq show`).
pub const SHOW_BODY_LIMIT: usize = 64 * 1024;

/// An exchange and routing key: where a message was first published, or where a replay goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.exchange, self.routing_key)
    }
}

/// One entry of the broker's `x-death` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Death {
    pub queue: String,
    /// `delivery_limit`, `rejected`, `expired` or `maxlen`.
    pub reason: String,
    /// The exchange and routing keys the message had when it entered `queue`.
    pub exchange: String,
    pub routing_keys: Vec<String>,
    pub count: i64,
    pub time: Option<DateTime<Utc>>,
}

/// A dead letter's summary: a row of `dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The queue it waits in (a DLQ, or `keel.unrouted`).
    pub queue: String,
    pub message_id: Option<String>,
    /// AMQP `type`: the event type.
    pub event_type: Option<String>,
    /// Where it was first published, as its headers claim (see the module docs): where a
    /// `--to-original` replay sends it.
    pub origin: Option<Route>,
    /// The consumer queue whose handler (or delivery limit) failed it.
    pub consumer_queue: Option<String>,
    /// `rejected`, `retries_exhausted`, `panic` (the consumer's), the broker's `x-death`
    /// reason (`delivery_limit`), `unrouted`, or `unknown`.
    pub failure: String,
    /// The handler's reason, or what the broker's headers say.
    pub error: Option<String>,
    /// Failed attempts (`x-keel-attempts`), when the consumer counted them.
    pub attempts: Option<i64>,
    /// Times `keelctl dlq replay` sent it back (`x-keel-replays`).
    pub replays: i64,
    /// The first failure; else when it was sent (AMQP `timestamp`).
    pub failed_at: Option<DateTime<Utc>>,
    pub age_seconds: Option<i64>,
    /// Body size in bytes.
    pub size: usize,
}

/// The body, as `dlq show` prints it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "encoding", rename_all = "snake_case")]
pub enum Body {
    /// It parsed as JSON (and is at most [`SHOW_BODY_LIMIT`]).
    Json { value: Value },
    /// Anything else, as UTF-8 (invalid bytes replaced), cut at [`SHOW_BODY_LIMIT`].
    Text { text: String, truncated: bool },
}

/// One dead letter in full: `dlq show`.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub summary: DeadLetter,
    /// The AMQP properties that are set (`message_id`, `type`, `timestamp`, …).
    pub properties: BTreeMap<String, Value>,
    /// Every header, `x-death` included, as JSON.
    pub headers: BTreeMap<String, Value>,
    pub body: Body,
}

/// The parts of a delivery this module reads (a `lapin` delivery, or a test's).
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The queue it was read from.
    pub queue: &'a str,
    /// The delivery's exchange and routing key (for a DLQ: `keel.dlx` and the consumer queue).
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub properties: &'a BasicProperties,
    pub body: &'a [u8],
}

impl<'a> Parts<'a> {
    pub fn of(queue: &'a str, delivery: &'a lapin::message::Delivery) -> Self {
        Self {
            queue,
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            properties: &delivery.properties,
            body: &delivery.data,
        }
    }

    fn headers(&self) -> Option<&'a FieldTable> {
        self.properties.headers().as_ref()
    }

    fn text(&self, name: &str) -> Option<String> {
        text(self.headers()?.inner().get(name)?)
    }

    fn int(&self, name: &str) -> Option<i64> {
        int(self.headers()?.inner().get(name)?)
    }

    /// The broker's `x-death` entries, newest first.
    pub fn deaths(&self) -> Vec<Death> {
        let Some(AMQPValue::FieldArray(entries)) =
            self.headers().and_then(|h| h.inner().get("x-death"))
        else {
            return Vec::new();
        };
        entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(t) => Some(death(t)),
                _ => None,
            })
            .collect()
    }

    /// The first death: the entry `x-first-death-queue` and `-reason` name, else the oldest.
    fn first_death(&self) -> Option<Death> {
        let deaths = self.deaths();
        let queue = self.text("x-first-death-queue");
        let reason = self.text("x-first-death-reason");
        deaths
            .iter()
            .find(|d| Some(&d.queue) == queue.as_ref() && Some(&d.reason) == reason.as_ref())
            .or_else(|| deaths.last())
            .cloned()
    }

    /// Where the message was first published (see the module docs for the order and for how
    /// far its headers may be trusted).
    pub fn origin(&self) -> Option<Route> {
        // Kept as published (keel.unrouted): the broker's record of its route, not its headers.
        if self.queue == UNROUTED_QUEUE && !self.exchange.is_empty() {
            return Some(self.own_route());
        }
        if let (Some(exchange), Some(routing_key)) = (
            self.text(headers::ORIGINAL_EXCHANGE),
            self.text(headers::ORIGINAL_ROUTING_KEY),
        ) {
            return Some(Route {
                exchange,
                routing_key,
            });
        }
        if let Some(death) = self.first_death()
            && let Some(routing_key) = death.routing_keys.first()
        {
            return Some(Route {
                exchange: self
                    .text("x-first-death-exchange")
                    .unwrap_or(death.exchange),
                routing_key: routing_key.clone(),
            });
        }
        // A message on keel.dlx without either dialect was put there by hand; its route says
        // nothing about its origin.
        (!self.exchange.is_empty() && self.exchange != DEAD_LETTER_EXCHANGE)
            .then(|| self.own_route())
    }

    fn own_route(&self) -> Route {
        Route {
            exchange: self.exchange.to_owned(),
            routing_key: self.routing_key.to_owned(),
        }
    }

    /// The summary `dlq list` shows, with its age at `now`.
    pub fn summary(&self, now: DateTime<Utc>) -> DeadLetter {
        let first_death = self.first_death();
        let unrouted = self.queue == UNROUTED_QUEUE;
        let failure = self
            .text(headers::FAILURE)
            .or_else(|| first_death.as_ref().map(|d| d.reason.clone()))
            .unwrap_or_else(|| if unrouted { "unrouted" } else { "unknown" }.to_owned());
        let error = self.text(headers::ERROR).or_else(|| {
            first_death
                .as_ref()
                .map(|d| {
                    format!(
                        "dead-lettered by the broker ({}) from {}",
                        d.reason, d.queue
                    )
                })
                .or_else(|| unrouted.then(|| "no queue was bound to its routing key".to_owned()))
        });
        let failed_at = self
            .text(headers::FIRST_FAILURE)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| first_death.as_ref().and_then(|d| d.time))
            .or_else(|| self.properties.timestamp().and_then(timestamp));
        DeadLetter {
            queue: self.queue.to_owned(),
            message_id: self.properties.message_id().as_ref().map(|s| s.to_string()),
            event_type: self.properties.kind().as_ref().map(|s| s.to_string()),
            origin: self.origin(),
            consumer_queue: self
                .text(headers::QUEUE)
                .or_else(|| first_death.map(|d| d.queue)),
            failure,
            error,
            attempts: self.int(headers::ATTEMPTS),
            replays: self.int(headers::REPLAYS).unwrap_or(0),
            failed_at,
            age_seconds: failed_at.map(|at| (now - at).num_seconds().max(0)),
            size: self.body.len(),
        }
    }

    /// Everything `dlq show` prints.
    pub fn shown(&self, now: DateTime<Utc>) -> Shown {
        let headers = self
            .headers()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), to_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        Shown {
            summary: self.summary(now),
            properties: properties(self.properties),
            headers,
            body: body(self.body),
        }
    }
}

fn death(t: &FieldTable) -> Death {
    let get = |k: &str| t.inner().get(k);
    Death {
        queue: get("queue").and_then(text).unwrap_or_default(),
        reason: get("reason").and_then(text).unwrap_or_default(),
        exchange: get("exchange").and_then(text).unwrap_or_default(),
        routing_keys: match get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().filter_map(text).collect(),
            _ => Vec::new(),
        },
        count: get("count").and_then(int).unwrap_or(0),
        time: match get("time") {
            Some(AMQPValue::Timestamp(t)) => timestamp(*t),
            _ => None,
        },
    }
}

/// A text value: a long string as Keel and the broker send it, or a short one.
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// An integer value of any width (Keel writes 64-bit; other tools may not).
pub(crate) fn int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn timestamp(secs: u64) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(i64::try_from(secs).ok()?, 0).single()
}

/// A header value as JSON: tables as objects, arrays as arrays, timestamps as RFC 3339.
pub(crate) fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::DecimalValue(d) => {
            let scale = 10_f64.powi(i32::from(d.scale));
            serde_json::json!(f64::from(d.value) / scale)
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Timestamp(t) => timestamp(*t)
            .map(|t| Value::String(t.to_rfc3339()))
            .unwrap_or_else(|| serde_json::json!(t)),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::Void => Value::Null,
        other => text(other)
            .map(Value::String)
            .or_else(|| int(other).map(Value::from))
            .unwrap_or(Value::Null),
    }
}

/// The properties that are set, by their AMQP names.
fn properties(p: &BasicProperties) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(v) = value {
            out.insert(name.to_owned(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    put("message_id", s(p.message_id()));
    put("type", s(p.kind()));
    put("content_type", s(p.content_type()));
    put("content_encoding", s(p.content_encoding()));
    put("correlation_id", s(p.correlation_id()));
    put("reply_to", s(p.reply_to()));
    put("expiration", s(p.expiration()));
    put("user_id", s(p.user_id()));
    put("app_id", s(p.app_id()));
    put(
        "timestamp",
        p.timestamp()
            .and_then(timestamp)
            .map(|t| Value::String(t.to_rfc3339())),
    );
    put("delivery_mode", p.delivery_mode().map(Value::from));
    put("priority", p.priority().map(Value::from));
    out
}

fn body(bytes: &[u8]) -> Body {
    if bytes.len() <= SHOW_BODY_LIMIT
        && let Ok(value) = serde_json::from_slice::<Value>(bytes)
    {
        return Body::Json { value };
    }
    let truncated = bytes.len() > SHOW_BODY_LIMIT;
    let shown = &bytes[..bytes.len().min(SHOW_BODY_LIMIT)];
    Body::Text {
        text: String::from_utf8_lossy(shown).into_owned(),
        truncated,
    }
}

/// `value` flattened to `key = scalar` lines, for a table: `x-death[0].routing-keys[0]`.
pub(crate) fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use lapin::types::{FieldArray, LongString, ShortString};

    use super::*;

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(k), v);
        }
        t
    }

    fn parts<'a>(queue: &'a str, props: &'a BasicProperties, exchange: &'a str) -> Parts<'a> {
        Parts {
            queue,
            exchange,
            routing_key: "test.work",
            properties: props,
            body: b"{\"n\":1}",
        }
    }

    #[test]
    fn the_consumers_headers_name_the_route_and_the_failure() {
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(table(vec![
                (headers::ORIGINAL_EXCHANGE, long("keel.events")),
                (headers::ORIGINAL_ROUTING_KEY, long("test.work.item")),
                (headers::FAILURE, long("rejected")),
                (headers::ERROR, long("bad body")),
                (headers::ATTEMPTS, AMQPValue::LongLongInt(1)),
                (headers::FIRST_FAILURE, long("2026-01-01T00:00:00.000Z")),
            ]));
        let now = DateTime::parse_from_rfc3339("2026-01-01T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = parts("test.work.dlq", &props, "keel.dlx").summary(now);
        assert_eq!(
            m.origin,
            Some(Route {
                exchange: "keel.events".into(),
                routing_key: "test.work.item".into()
            })
        );
        assert_eq!(m.failure, "rejected");
        assert_eq!(m.error.as_deref(), Some("bad body"));
        assert_eq!(m.attempts, Some(1));
        assert_eq!(m.age_seconds, Some(3600));
        assert_eq!(m.size, 7);
    }

    #[test]
    fn the_brokers_x_death_names_the_route_when_the_consumer_wrote_nothing() {
        let death = table(vec![
            ("queue", long("test.work")),
            ("reason", long("delivery_limit")),
            ("exchange", long("keel.events")),
            (
                "routing-keys",
                AMQPValue::FieldArray(FieldArray::from(vec![long("test.work.item")])),
            ),
            ("count", AMQPValue::LongLongInt(1)),
            ("time", AMQPValue::Timestamp(1_767_225_600)),
        ]);
        let props = BasicProperties::default().with_headers(table(vec![
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            ("x-first-death-queue", long("test.work")),
            ("x-first-death-reason", long("delivery_limit")),
            ("x-first-death-exchange", long("keel.events")),
        ]));
        let p = parts("test.work.dlq", &props, "keel.dlx");
        let m = p.summary(Utc::now());
        assert_eq!(m.origin.unwrap().routing_key, "test.work.item");
        assert_eq!(m.failure, "delivery_limit");
        assert_eq!(m.consumer_queue.as_deref(), Some("test.work"));
        assert!(m.error.unwrap().contains("delivery_limit"));
        assert_eq!(m.failed_at.unwrap().timestamp(), 1_767_225_600);

        let mut lines = Vec::new();
        flatten(
            "x-death",
            &p.shown(Utc::now()).headers["x-death"],
            &mut lines,
        );
        assert!(lines.contains(&(
            "x-death[0].routing-keys[0]".to_owned(),
            "test.work.item".to_owned()
        )));
    }

    #[test]
    fn an_unrouted_message_keeps_its_own_route_and_a_hand_made_dead_letter_has_none() {
        let props = BasicProperties::default();
        let unrouted = parts("keel.unrouted", &props, "keel.events").summary(Utc::now());
        assert_eq!(unrouted.origin.unwrap().exchange, "keel.events");
        assert_eq!(unrouted.failure, "unrouted");
        let by_hand = parts("test.work.dlq", &props, "keel.dlx").summary(Utc::now());
        assert_eq!(by_hand.origin, None);
        assert_eq!(by_hand.failure, "unknown");
    }

    #[test]
    fn in_keel_unrouted_the_brokers_route_wins_over_what_the_headers_claim() {
        let claims = BasicProperties::default().with_headers(table(vec![
            (headers::ORIGINAL_EXCHANGE, long("keel.events")),
            (
                headers::ORIGINAL_ROUTING_KEY,
                long("billing.payment.captured"),
            ),
        ]));
        let unrouted = parts("keel.unrouted", &claims, "keel.events").origin();
        assert_eq!(
            unrouted,
            Some(Route {
                exchange: "keel.events".into(),
                routing_key: "test.work".into()
            }),
            "the key it was published with, as the broker delivered it"
        );
    }

    #[test]
    fn a_body_is_json_when_it_parses_and_bounded_text_otherwise() {
        assert!(matches!(body(b"{\"a\":1}"), Body::Json { .. }));
        assert!(matches!(
            body(b"\xff not json"),
            Body::Text {
                truncated: false,
                ..
            }
        ));
        let big = vec![b'x'; SHOW_BODY_LIMIT + 10];
        match body(&big) {
            Body::Text { text, truncated } => {
                assert!(truncated);
                assert_eq!(text.len(), SHOW_BODY_LIMIT);
            }
            Body::Json { .. } => panic!("not JSON"),
        }
    }
}
