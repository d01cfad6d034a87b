//! The retry schedule of a webhook delivery (P33, P24): the pause after each failed attempt,
//! listed in configuration (`webhooks.retry_schedule`), each pause moved by up to ±20 % at
//! random. After the last pause's attempt fails, the delivery is `failed`.
//!
//! A list rather than a formula because it is what a receiver reads in the documentation
//! ("retried after 5 s, 30 s, 2 min, … for about ten hours") and what an operator changes;
//! it grows roughly exponentially, as a formula would. The jitter (smaller than full jitter
//! on purpose: the schedule is a promise) keeps the deliveries that failed together, during
//! one receiver outage, from all retrying in the same second.

use std::time::Duration;

use keel_config::{ConfigError, ensure_range, millis as ms};
use rand::Rng;
use serde::Deserialize;

/// Most retries a schedule may list.
const MAX_RETRIES: usize = 30;

/// The pauses after attempts 1, 2, … (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RetrySchedule(#[serde(deserialize_with = "keel_config::durations")] Vec<Duration>);

impl RetrySchedule {
    pub fn new(pauses: Vec<Duration>) -> Self {
        Self(pauses)
    }

    /// Checks the list, naming `key`.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        ensure_range(&format!("{key} (count)"), self.0.len(), 0, MAX_RETRIES)?;
        for pause in &self.0 {
            ensure_range(&format!("{key} (ms)"), ms(*pause), 1, 7 * 86_400_000)?;
        }
        Ok(())
    }

    /// Attempts a delivery gets in all: the first and one per pause.
    pub fn attempts(&self) -> usize {
        self.0.len() + 1
    }

    /// The pause after failed attempt `attempt` (from 1), jittered; `None` when it was the
    /// last.
    pub fn after(&self, attempt: i32) -> Option<Duration> {
        let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
        let pause = *self.0.get(index)?;
        Some(pause.mul_f64(rand::rng().random_range(0.8..=1.2)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_pause_is_its_own_within_twenty_percent_and_the_list_ends() {
        let s = RetrySchedule::new(vec![Duration::from_secs(5), Duration::from_secs(30)]);
        assert_eq!(s.attempts(), 3);
        for _ in 0..200 {
            let first = s.after(1).unwrap_or_default();
            assert!((4_000..=6_000).contains(&first.as_millis()), "{first:?}");
            let second = s.after(2).unwrap_or_default();
            assert!(
                (24_000..=36_000).contains(&second.as_millis()),
                "{second:?}"
            );
        }
        assert_eq!(s.after(3), None);
        assert_eq!(s.after(0), None);
        assert_eq!(s.after(-1), None);
    }

    #[test]
    fn a_schedule_with_a_zero_pause_is_refused_naming_its_key() {
        let s = RetrySchedule::new(vec![Duration::ZERO]);
        let err = s.validate("webhooks.retry_schedule").unwrap_err();
        assert!(err.to_string().contains("webhooks.retry_schedule"), "{err}");
    }
}
