//! Retention: the platform's tables purged by age, by one recurring job per service, and their
//! row counts as metrics (P08's queue running P09's kind of singleton job).
//!
//! Without it the outbox, the inbox, the job queue and the idempotency keys only grow: every
//! event, message, job and keyed request leaves a row behind for ever, and each index, vacuum
//! and backup pays for all of them. [`Retention`] deletes what no longer serves a purpose, on
//! a schedule, in small batches, from one instance at a time.
//!
//! **What goes, and when** (`[database.retention]`, [`RetentionConfig`]):
//!
//! | table | purged | default | why that long |
//! |---|---|---|---|
//! | `outbox` | sent rows, `sent_at` older than `outbox_sent_age` | 7 days | the relay needs a row only until it is sent; a week answers "was event X published, and when" while an incident is looked into. Unsent and parked rows are never purged: they are work not yet done |
//! | `inbox` | entries, `received_at` older than `inbox_age` | 30 days | longer than a duplicate can arrive (below) |
//! | `jobs` | `succeeded`, `finished_at` older than `jobs_succeeded_age` | 7 days | a week of run history (`keelctl jobs`); and more than two `interval`s, see below |
//! | `jobs` | `failed`, only if `jobs_failed_age` is set | never | a failed job is work an operator must retry or settle (`keelctl jobs retry`, `keelctl audit`'s `no_failed_jobs`); deleting it would hide it, and there are few |
//! | `idempotency_keys` | keys past `expires_at` | at expiry | an expired key already counts as absent; its TTL is the service's |
//! | a service's own | what its [`Policy`] says | the service's | e.g. billing's webhook receipts |
//!
//! **The inbox's age.** An inbox entry is what stops a message whose effect committed from
//! applying twice (P03). It must outlive every way that message can arrive again:
//! - *a broker redelivery* after a lost ack: the message goes back to its queue and is handed
//!   out again behind at most the queue's backlog. Keel's queues have no message TTL and no
//!   length limit, so nothing but consumption ends that wait; but consumption and this purge
//!   run in the same service process (a consumer that stops stops the process: the runtime's
//!   early-end rule), so while no instance consumes, none purges either. The wait that
//!   counts is a backlog drain: minutes, hours in an incident (queue depth is a metric);
//! - *the outbox relay publishing again* a row whose `sent_at` was lost (a crash between the
//!   broker's confirm and the update): when a relay next claims the row, within the outage
//!   that lost the update;
//! - *a replay from a dead-letter queue* (P01; today a message over the queue's delivery
//!   limit is dropped, so none exists yet): a dead-lettered message usually never committed
//!   its effect, so its replay is its first effect. But one whose acks kept being lost after
//!   its effect committed is dead-lettered too, and an operator may replay a message twice.
//!   A DLQ has no TTL, so *nothing bounds this one but the operator*: a replay after
//!   `inbox_age` is not deduplicated and applies its effect again.
//!
//! So `inbox_age` defaults to 30 days: far beyond any backlog that is not a month-long outage,
//! and the window within which a dead-lettered message may be replayed safely. What bounds a
//! replay is then a rule for the DLQ: give it a message TTL below `inbox_age`, or have its
//! replay refuse messages older than that (their envelope carries their timestamp). The
//! config refuses an `inbox_age` under a day. Cost: an entry is about 150 bytes with its
//! index entry, so 10 messages a second kept 30 days is about 4 GB.
//!
//! **Finished jobs and fixed ids.** A job enqueued with a fixed id (a singleton per time slot,
//! like this module's own) is enqueued once *because its row exists*: purge the row and the
//! same id can be enqueued and run again. A slot's id is enqueued only during its slot or the
//! one before, so `jobs_succeeded_age` must exceed two `interval`s (the config checks it); a
//! service's own slot-scheduled queue needs the same of its slot.
//!
//! **One run per slot, on the job queue** (P08, P09). Time is cut into slots of `interval`; the
//! run of slot *n* is a job of queue [`RETENTION_QUEUE`] whose id is derived from *n*
//! ([`job_id`]). Every instance enqueues the current slot's job when it starts and each run
//! enqueues the next slot's, *before* purging, so a failed run never ends the chain; instances
//! racing to enqueue the same slot insert one row, so exactly one instance purges per slot,
//! and the `jobs` table keeps each run as history. A slot missed while every instance was down
//! runs late, once, when one comes back.
//!
//! **Batches.** Each statement deletes at most `batch` rows, oldest first, each in its own
//! transaction: locks and WAL bursts stay short and replicas keep up. A run deletes at most
//! `max_batches` batches per table; what is left waits for the next slot, so one run's cost
//! is bounded even when a table is far behind. In the platform's tables, rows another
//! transaction holds are skipped (`SKIP LOCKED`), never waited for. The age columns are
//! indexed (platform migration 0008): without an index every batch would scan the table.
//!
//! **Row counts** (`table_rows{table, state}`), refreshed by every instance every
//! `row_count_interval` and after each run. Counting a big table exactly reads all of it, so
//! each count reads at most `row_count_exact_limit` rows, through an index where one covers the
//! predicate; past the limit the gauge shows the planner's estimate for the same predicate
//! (`EXPLAIN`: the table's size from its current pages and the selectivity from its last
//! `ANALYZE`), which is what a trend needs. Small sets (unsent and parked outbox rows, queued,
//! running and failed jobs) are therefore exact, large ones estimated. Each instance reports
//! the same database's counts: aggregate with `max`, not `sum`.
//!
//! Other metrics: `retention_purged_rows_total{table, state}`, `retention_runs_total{outcome}`
//! and `retention_last_success_timestamp_seconds` (alert when it stops moving).
//!
//! Must not break: the purge predicates (never an unsent outbox row, never a queued or running
//! job); the next slot enqueued before the purge; service tables purged only through what their
//! [`Policy`] names, so an append-only table keeps its rule (billing purges its webhook
//! receipts through a function that refuses recent ones, not with DELETE rights).

mod config;
mod count;
mod policy;

pub use config::RetentionConfig;
pub use count::TableRows;
pub use policy::{Policy, Purged, RetentionError, RunReport};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_resilience::BackoffPolicy;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::PgError;
use crate::jobs::{self, Job, NewJob, Outcome, WorkerConfig};
use count::Count;

/// The queue of the retention runs, in every service's `jobs` table.
pub const RETENTION_QUEUE: &str = "keel.retention";

/// Upper half of every retention job id ("keelretn" in ASCII); the lower half is the slot.
const JOB_ID_HIGH: u64 = 0x6b65_656c_7265_746e;

/// Attempts of one run. The next slot's run is already enqueued when one fails; a run that
/// fails every attempt stays `failed` for an operator (`keelctl audit` shows it).
const RUN_MAX_ATTEMPTS: i32 = 5;
/// Backoff between a run's attempts (full jitter, P24): about ten minutes over all attempts.
const RUN_RETRY_BASE: Duration = Duration::from_secs(10);
const RUN_RETRY_MAX: Duration = Duration::from_secs(300);

/// The payload of a retention job: the slot it belongs to (its id is derived from it).
/// Stored in `jobs.payload` of queued jobs: its field names must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionJob {
    pub slot: u64,
}

/// The fixed id of the run of `slot`.
pub fn job_id(slot: u64) -> Uuid {
    Uuid::from_u64_pair(JOB_ID_HIGH, slot)
}

/// The slot `now` falls in, and the time until the next one begins.
pub fn slot_at(now: SystemTime, interval: Duration) -> (u64, Duration) {
    let interval = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let slot = now / interval;
    let next = (slot + 1).saturating_mul(interval);
    (slot, Duration::from_millis(next.saturating_sub(now)))
}

/// A name for this process in `jobs.locked_by`: host, pid and a random suffix.
pub fn worker_name(app: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| app.to_owned());
    let suffix = Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}

/// A service's retention: the platform's policies, the service's own, and the job that runs
/// them. Built with the pool; nothing runs until [`Retention::run`].
#[derive(Debug, Clone)]
pub struct Retention {
    pool: PgPool,
    config: RetentionConfig,
    policies: Vec<Policy>,
    counts: Vec<Count>,
}

impl Retention {
    /// The platform's policies and row counts for `pool`'s database under `config`.
    pub fn new(pool: PgPool, config: &RetentionConfig) -> Self {
        Self {
            pool,
            config: config.clone(),
            policies: Policy::platform(config),
            counts: Count::platform(),
        }
    }

    /// Adds a service table's policy (and a `table_rows{table, state="all"}` gauge for it).
    pub fn add(&mut self, policy: Policy) -> Result<(), RetentionError> {
        policy.validate()?;
        if !self.counts.iter().any(|c| c.table == policy.table) {
            self.counts.push(Count::new(policy.table, "all", None));
        }
        self.policies.push(policy);
        Ok(())
    }

    /// The policies a run applies, platform's first.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Purges one policy's rows: batches until one comes back short, at most `max_batches`.
    pub async fn purge(&self, policy: &Policy) -> Result<Purged, PgError> {
        let batch = self.config.batch;
        let full = u64::try_from(batch).unwrap_or(u64::MAX);
        let mut purged = Purged {
            table: policy.table,
            state: policy.state,
            rows: 0,
            batches: 0,
            more_left: false,
        };
        loop {
            if purged.batches == self.config.max_batches {
                purged.more_left = true;
                break;
            }
            let rows = policy.purge_batch(&self.pool, batch).await?;
            purged.batches += 1;
            purged.rows += rows;
            metrics::counter!("retention_purged_rows_total",
                "table" => policy.table, "state" => policy.state)
            .increment(rows);
            if rows < full {
                break;
            }
        }
        Ok(purged)
    }

    /// One run over every policy. A table that fails does not stop the others.
    pub async fn run_once(&self) -> RunReport {
        let mut report = RunReport::default();
        for policy in &self.policies {
            match self.purge(policy).await {
                Ok(purged) => report.purged.push(purged),
                Err(e) => report.failed.push((policy.table, policy.state, e)),
            }
        }
        report
    }

    /// Counts every table's rows (module docs: exact or estimated) and sets the gauges.
    pub async fn refresh_row_counts(&self) -> Result<Vec<TableRows>, PgError> {
        let mut all = Vec::with_capacity(self.counts.len());
        for count in &self.counts {
            let rows = count
                .rows(&self.pool, self.config.row_count_exact_limit)
                .await?;
            // Row counts far below 2^53: exact as f64.
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("table_rows", "table" => rows.table, "state" => rows.state)
                .set(rows.rows as f64);
            all.push(rows);
        }
        Ok(all)
    }

    /// Enqueues the run of `slot`, due after `delay`. `false`: it exists already (another
    /// instance, or an earlier run, enqueued it).
    pub async fn enqueue(&self, slot: u64, delay: Duration) -> Result<bool, PgError> {
        let payload = serde_json::to_value(RetentionJob { slot })
            .map_err(|e| PgError::Encode(e.to_string()))?;
        let mut conn = self.pool.acquire().await?;
        let id = jobs::enqueue(
            &mut conn,
            &NewJob {
                queue: RETENTION_QUEUE,
                payload,
                max_attempts: RUN_MAX_ATTEMPTS,
                delay,
                id: Some(job_id(slot)),
            },
        )
        .await?;
        Ok(id.is_some())
    }

    /// Enqueues the current slot's run, due now (a no-op if any instance did already).
    pub async fn schedule(&self) -> Result<bool, PgError> {
        let (slot, _) = slot_at(SystemTime::now(), self.config.interval);
        self.enqueue(slot, Duration::ZERO).await
    }

    /// One retention job: the next slot's run enqueued first (so a failure below cannot end
    /// the chain), then every policy, then the gauges.
    async fn handle(&self, job: Job) -> Outcome {
        if let Err(e) = RetentionJob::deserialize(&job.payload) {
            // A hand-edited or foreign row: retrying cannot fix it.
            return Outcome::Fail(format!("retention job payload: {e}"));
        }
        let retry = || jobs::backoff(job.attempts, RUN_RETRY_BASE, RUN_RETRY_MAX);
        let (slot, until_next) = slot_at(SystemTime::now(), self.config.interval);
        if let Err(e) = self.enqueue(slot + 1, until_next).await {
            return Outcome::RetryAfter(retry(), format!("enqueue the next run: {e}"));
        }
        let report = self.run_once().await;
        let rows: u64 = report.purged.iter().map(|p| p.rows).sum();
        let behind: Vec<&str> = report
            .purged
            .iter()
            .filter(|p| p.more_left)
            .map(|p| p.table)
            .collect();
        if let Err(e) = self.refresh_row_counts().await {
            tracing::warn!(error = %e, "counting table rows failed");
        }
        if report.failed.is_empty() {
            metrics::counter!("retention_runs_total", "outcome" => "done").increment(1);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("retention_last_success_timestamp_seconds").set(now);
            tracing::info!(rows, ?behind, "retention run purged old rows");
            return Outcome::Done;
        }
        metrics::counter!("retention_runs_total", "outcome" => "failed").increment(1);
        let errors: Vec<String> = report
            .failed
            .iter()
            .map(|(table, state, e)| format!("{table} ({state}): {e}"))
            .collect();
        // Logged here, once; the job row keeps the message for `keelctl jobs`.
        tracing::warn!(rows, errors = ?errors, "retention run failed for some tables");
        Outcome::RetryAfter(retry(), errors.join("; "))
    }

    /// Runs retention until `stop`: schedules the current slot (retrying while the database is
    /// unreachable), works [`RETENTION_QUEUE`] one job at a time, and refreshes the row
    /// counts every `row_count_interval`. Returns once a run in flight is finished or handed
    /// back.
    pub async fn run(self, worker: String, stop: CancellationToken) {
        let this = Arc::new(self);
        let jobs = {
            let (this, stop) = (Arc::clone(&this), stop.clone());
            async move {
                if !this.schedule_until_done(&stop).await {
                    return;
                }
                let config = WorkerConfig {
                    queue: RETENTION_QUEUE.to_owned(),
                    worker,
                    concurrency: 1,
                    lease: this.config.lease,
                    poll_interval: this.config.poll_interval,
                };
                let pool = this.pool.clone();
                jobs::run_worker(pool, config, stop, move |job| {
                    let this = Arc::clone(&this);
                    async move { this.handle(job).await }
                })
                .await;
            }
        };
        let counts = {
            let (this, stop) = (Arc::clone(&this), stop.clone());
            async move {
                // Not at once: a starting process is busy enough, and a run due at start
                // refreshes the counts when it ends.
                let period = this.config.row_count_interval;
                let mut every =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = every.tick() => {}
                    }
                    if let Err(e) = this.refresh_row_counts().await {
                        tracing::warn!(error = %e, "counting table rows failed");
                    }
                }
            }
        };
        tokio::join!(jobs, counts);
    }

    /// [`Retention::schedule`] until it works; `false` if `stop` came first.
    async fn schedule_until_done(&self, stop: &CancellationToken) -> bool {
        // Jittered: every instance starts this loop at once after a deploy or an outage.
        let mut backoff =
            BackoffPolicy::new(self.config.poll_interval, Duration::from_secs(30)).backoff();
        loop {
            match self.schedule().await {
                Ok(_) => return true,
                Err(e) => tracing::warn!(error = %e, "cannot schedule retention yet"),
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(backoff.next_delay_without_deadline()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_payload_is_the_slot_as_queued_rows_hold_it() {
        let stored = serde_json::json!({ "slot": 7 });
        assert_eq!(
            serde_json::to_value(RetentionJob { slot: 7 }).unwrap(),
            stored
        );
        assert_eq!(
            RetentionJob::deserialize(&stored).unwrap(),
            RetentionJob { slot: 7 }
        );
        for foreign in [
            serde_json::json!({ "slot": 7, "task": "vacuum" }),
            serde_json::json!({}),
        ] {
            assert!(RetentionJob::deserialize(&foreign).is_err(), "{foreign}");
        }
    }

    #[test]
    fn slots_are_whole_intervals_since_the_epoch() {
        let interval = Duration::from_secs(3600);
        let at = UNIX_EPOCH + Duration::from_secs(10 * 3600 + 600);
        assert_eq!(slot_at(at, interval), (10, Duration::from_secs(3000)));
        assert_ne!(job_id(10), job_id(11));
        assert_eq!(job_id(10), job_id(10));
    }

    #[tokio::test]
    async fn a_policy_with_a_name_that_is_not_plain_sql_is_refused() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://u:p@127.0.0.1:1/x")
            .unwrap();
        let mut retention = Retention::new(pool, &RetentionConfig::default());
        let bad = Policy::older_than("receipts", "received_at; --", Duration::from_secs(60));
        assert!(retention.add(bad).is_err());
    }
}
