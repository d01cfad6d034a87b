//! `[consumer]`: the consumer's bounds (P05), validated at start so a bad value exits 78
//! naming its key.

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range};
use serde::Deserialize;

use crate::broker::ms;
use crate::topology::QueueSpec;

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
    #[serde(deserialize_with = "keel_config::durations")]
    pub retry_tiers: Vec<Duration>,
    /// `x-max-length` of the DLQ (fixed at first declaration). A full DLQ refuses: the
    /// consumer then holds the message and tries again after a backoff rather than lose it.
    pub dead_letter_max_length: u32,
    /// Cap of the backoff between attempts of a handler that answered
    /// [`Outcome::Unavailable`](super::Outcome::Unavailable).
    #[serde(with = "keel_config::duration")]
    pub retry_max_backoff: Duration,
    /// How often queue and DLQ depths are read for the metrics.
    #[serde(with = "keel_config::duration")]
    pub depth_interval: Duration,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
