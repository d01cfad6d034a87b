//! `[database.retention]`: the ages, batch sizes and intervals of [`super::Retention`], every
//! key with a default, and the bounds that keep them safe (an inbox entry outlives a day;
//! finished slot jobs outlive the slots in which their id can be enqueued).

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range};
use serde::Deserialize;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
const TEN_YEARS: Duration = Duration::from_secs(3650 * 86_400);

/// `[database.retention]`: what the platform purges, how much at once and how often. Every
/// key has a default, so a service's config file need not mention the section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Run retention in this process (the purge job and the row counts). Off, the process
    /// neither schedules nor runs purges; another instance's run still purges the database.
    pub enabled: bool,
    /// Length of a slot: one run per `interval`, on one instance.
    #[serde(with = "keel_config::duration")]
    pub interval: Duration,
    /// Rows deleted by one statement.
    pub batch: i64,
    /// Statements per table per run; what is left waits for the next run.
    pub max_batches: u32,
    /// Sent outbox rows are kept this long after `sent_at`.
    #[serde(with = "keel_config::duration")]
    pub outbox_sent_age: Duration,
    /// Inbox entries are kept this long after `received_at` (why 30 days: the docs of
    /// [`crate::retention`]).
    #[serde(with = "keel_config::duration")]
    pub inbox_age: Duration,
    /// Succeeded jobs are kept this long after `finished_at`.
    #[serde(with = "keel_config::duration")]
    pub jobs_succeeded_age: Duration,
    /// Failed jobs are kept this long after `finished_at`; unset (the default): for ever.
    #[serde(with = "keel_config::duration")]
    pub jobs_failed_age: Option<Duration>,
    /// How often this instance refreshes the `table_rows` gauges.
    #[serde(with = "keel_config::duration")]
    pub row_count_interval: Duration,
    /// Rows one count reads at most; past it the gauge shows the planner's estimate.
    pub row_count_exact_limit: i64,
    /// Pause between polls of [`super::RETENTION_QUEUE`] while no run is due.
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// Lease of a running purge (renewed while it runs, P08).
    #[serde(with = "keel_config::duration")]
    pub lease: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(3600),
            batch: 1000,
            max_batches: 100,
            outbox_sent_age: 7 * DAY,
            inbox_age: 30 * DAY,
            jobs_succeeded_age: 7 * DAY,
            jobs_failed_age: None,
            row_count_interval: Duration::from_secs(30),
            row_count_exact_limit: 10_000,
            poll_interval: Duration::from_secs(5),
            lease: Duration::from_secs(60),
        }
    }
}

fn ensure_duration(
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    ensure_range(
        &format!("database.retention.{key} (ms)"),
        keel_config::millis(value),
        keel_config::millis(min),
        keel_config::millis(max),
    )
}

impl Validate for RetentionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_duration(
            "interval",
            self.interval,
            Duration::from_millis(100),
            7 * DAY,
        )?;
        ensure_range("database.retention.batch", self.batch, 1, 100_000)?;
        ensure_range(
            "database.retention.max_batches",
            self.max_batches,
            1,
            10_000,
        )?;
        ensure_duration("outbox_sent_age", self.outbox_sent_age, MINUTE, TEN_YEARS)?;
        // Shorter than a day, a backlog or a replay could outlive the entry
        // (`crate::retention` docs).
        ensure_duration("inbox_age", self.inbox_age, DAY, TEN_YEARS)?;
        ensure_duration(
            "jobs_succeeded_age",
            self.jobs_succeeded_age,
            MINUTE,
            TEN_YEARS,
        )?;
        if self.jobs_succeeded_age <= 2 * self.interval {
            return Err(ConfigError::invalid(
                "database.retention.jobs_succeeded_age",
                "must exceed two database.retention.interval (a purged slot's job could run again)",
            ));
        }
        if let Some(age) = self.jobs_failed_age {
            ensure_duration("jobs_failed_age", age, DAY, TEN_YEARS)?;
        }
        ensure_duration(
            "row_count_interval",
            self.row_count_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        ensure_range(
            "database.retention.row_count_exact_limit",
            self.row_count_exact_limit,
            1,
            10_000_000,
        )?;
        ensure_duration(
            "poll_interval",
            self.poll_interval,
            Duration::from_millis(10),
            MINUTE,
        )?;
        ensure_duration(
            "lease",
            self.lease,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_inbox_outlives_a_day() {
        let config = RetentionConfig::default();
        config.validate().unwrap();
        let short_inbox = RetentionConfig {
            inbox_age: Duration::from_secs(3600),
            ..RetentionConfig::default()
        };
        let e = short_inbox.validate().unwrap_err().to_string();
        assert!(e.contains("database.retention.inbox_age"), "{e}");
        // Finished slot jobs must outlive the two slots in which their id can be enqueued.
        let short_jobs = RetentionConfig {
            jobs_succeeded_age: Duration::from_secs(2 * 3600),
            ..RetentionConfig::default()
        };
        let e = short_jobs.validate().unwrap_err().to_string();
        assert!(e.contains("database.retention.jobs_succeeded_age"), "{e}");
    }

    #[test]
    fn the_section_may_be_absent_or_partial() {
        let config: RetentionConfig =
            serde_json::from_value(serde_json::json!({ "inbox_age": "45d" })).unwrap();
        assert_eq!(config.inbox_age, 45 * DAY);
        assert_eq!(config.outbox_sent_age, 7 * DAY);
        assert_eq!(config.jobs_failed_age, None);
        let config: RetentionConfig =
            serde_json::from_value(serde_json::json!({ "jobs_failed_age": "90d" })).unwrap();
        assert_eq!(config.jobs_failed_age, Some(90 * DAY));
        assert!(
            serde_json::from_value::<RetentionConfig>(serde_json::json!({ "inbox": "1d" }))
                .is_err()
        );
    }
}
