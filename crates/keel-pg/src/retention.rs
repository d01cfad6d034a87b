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
//! is bounded even when a table is far behind. Rows another transaction holds are skipped
//! (`SKIP LOCKED`) in the platform's tables, never waited for. The age columns are indexed (platform migration 0008):
//! without an index every batch would scan the whole table.
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

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_config::{ConfigError, Validate, ensure_range};
use keel_resilience::BackoffPolicy;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::jobs::{self, Job, JobState, NewJob, Outcome, WorkerConfig};
use crate::{PgError, millis};

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
    /// Inbox entries are kept this long after `received_at` (module docs: why 30 days).
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
    /// Pause between polls of [`RETENTION_QUEUE`] while no run is due.
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
        // Shorter than a day, a backlog or a replay could outlive the entry (module docs).
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
                "must exceed two database.retention.interval: a purged run's slot could be enqueued and run again",
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

/// A policy that cannot be run: its names are not plain SQL identifiers.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// Table, column and function names are put into SQL text (they cannot be parameters),
    /// so only plain lowercase identifiers are accepted: `[a-z_][a-z0-9_]*`, at most 63 bytes.
    #[error("retention policy: `{0}` is not a plain lowercase SQL identifier")]
    Identifier(String),
}

fn identifier(name: &str) -> Result<(), RetentionError> {
    let mut chars = name.chars();
    let plain = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        Ok(())
    } else {
        Err(RetentionError::Identifier(name.to_owned()))
    }
}

/// Which rows of one table a run purges, and how.
#[derive(Debug, Clone)]
pub struct Policy {
    table: &'static str,
    state: &'static str,
    age: Duration,
    how: How,
}

#[derive(Debug, Clone)]
enum How {
    /// `DELETE` the rows whose `column` is older than the age (and match `filter`, SQL the
    /// platform writes itself), oldest first.
    Delete {
        column: &'static str,
        filter: Option<String>,
        /// Skip rows another transaction holds (`FOR UPDATE SKIP LOCKED`) rather than wait for
        /// them. Locking needs UPDATE on the table, which a service's table may not grant.
        skip_locked: bool,
    },
    /// `SELECT function(older_than interval, max_rows int)`, which deletes and returns how
    /// many: for a table the runtime role may not delete from.
    Function { function: &'static str },
}

impl Policy {
    /// Rows of `table` whose timestamp `column` is older than `age`, deleted directly. The
    /// runtime role needs `SELECT` and `DELETE` on the table, nothing more; `column` should be
    /// indexed. A row another transaction holds is waited for, then checked again (the
    /// platform's own tables skip such rows instead, which needs UPDATE).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let receipts = keel_pg::retention::Policy::older_than(
    ///     "webhook_receipts", "received_at", Duration::from_secs(90 * 86_400));
    /// ```
    pub fn older_than(table: &'static str, column: &'static str, age: Duration) -> Self {
        Self {
            table,
            state: "all",
            age,
            how: How::Delete {
                column,
                filter: None,
                skip_locked: false,
            },
        }
    }

    /// Rows of `table` purged by calling `function(older_than interval, max_rows integer)
    /// RETURNS bigint` (the rows it deleted): the way to purge a table the runtime role may
    /// not `DELETE` from. The function, `SECURITY DEFINER` and owned by the table's owner,
    /// decides what may go; billing's `purge_webhook_receipts` refuses to delete any receipt
    /// younger than a day, whatever it is asked.
    pub fn function(table: &'static str, function: &'static str, age: Duration) -> Self {
        Self {
            table,
            state: "all",
            age,
            how: How::Function { function },
        }
    }

    /// The table it purges (the `table` label of its metrics).
    pub fn table(&self) -> &'static str {
        self.table
    }

    /// Which of the table's rows (the `state` label): `sent`, `succeeded`, `all`, ...
    pub fn state(&self) -> &'static str {
        self.state
    }

    /// How old a row must be to go.
    pub fn age(&self) -> Duration {
        self.age
    }

    /// Checks that its names are plain SQL identifiers ([`RetentionError::Identifier`]).
    pub fn validate(&self) -> Result<(), RetentionError> {
        identifier(self.table)?;
        match &self.how {
            How::Delete { column, .. } => identifier(column),
            How::Function { function } => identifier(function),
        }
    }

    fn delete(
        table: &'static str,
        state: &'static str,
        column: &'static str,
        filter: Option<String>,
        age: Duration,
    ) -> Self {
        Self {
            table,
            state,
            age,
            how: How::Delete {
                column,
                filter,
                skip_locked: true,
            },
        }
    }

    /// The platform tables' policies under `config` (module docs' table).
    pub fn platform(config: &RetentionConfig) -> Vec<Self> {
        let mut policies = vec![
            Self::delete("outbox", "sent", "sent_at", None, config.outbox_sent_age),
            Self::delete("inbox", "all", "received_at", None, config.inbox_age),
            Self::delete(
                "jobs",
                JobState::Succeeded.as_str(),
                "finished_at",
                Some(state_is(JobState::Succeeded)),
                config.jobs_succeeded_age,
            ),
        ];
        if let Some(age) = config.jobs_failed_age {
            policies.push(Self::delete(
                "jobs",
                JobState::Failed.as_str(),
                "finished_at",
                Some(state_is(JobState::Failed)),
                age,
            ));
        }
        policies.push(Self::delete(
            "idempotency_keys",
            "expired",
            "expires_at",
            None,
            Duration::ZERO,
        ));
        policies
    }

    /// One batch: the rows it deleted.
    async fn purge_batch(&self, pool: &PgPool, batch: i64) -> Result<u64, PgError> {
        let table = self.table;
        let mut conn = pool.acquire().await?;
        match &self.how {
            How::Delete {
                column,
                filter,
                skip_locked,
            } => {
                let and = filter
                    .as_deref()
                    .map(|f| format!(" AND {f}"))
                    .unwrap_or_default();
                let lock = if *skip_locked {
                    " FOR UPDATE SKIP LOCKED"
                } else {
                    ""
                };
                // Chosen and deleted in one statement. ORDER BY the indexed age column: oldest
                // first, a range scan. A row updated between the two parts has a new ctid and
                // is left alone (the DELETE re-checks the version it waited for).
                let sql = format!(
                    "DELETE FROM {table} WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM {table}
                          WHERE {column} < now() - make_interval(secs => $1::float8 / 1000){and}
                          ORDER BY {column}
                          LIMIT $2{lock}))"
                );
                Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(millis(self.age))
                    .bind(batch)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected())
            }
            How::Function { function } => {
                let sql = format!(
                    "SELECT {function}(make_interval(secs => $1::float8 / 1000), $2::int4)"
                );
                let deleted: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(millis(self.age))
                    .bind(i32::try_from(batch).unwrap_or(i32::MAX))
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(deleted.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
            }
        }
    }
}

/// `state = '<state>'`, the state as a constant: a bound parameter would keep a generic plan
/// from matching the partial index `jobs_finished` (see [`jobs::claim`]).
fn state_is(state: JobState) -> String {
    format!("state = '{}'", state.as_str())
}

/// What one run did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    pub table: &'static str,
    pub state: &'static str,
    /// Rows deleted.
    pub rows: u64,
    /// Statements run.
    pub batches: u32,
    /// Stopped at `max_batches` with a full last batch: more rows may be old enough.
    pub more_left: bool,
}

/// One run over every policy: what went, and which tables failed (and why).
#[derive(Debug, Default)]
pub struct RunReport {
    pub purged: Vec<Purged>,
    pub failed: Vec<(&'static str, &'static str, PgError)>,
}

impl RunReport {
    /// Rows deleted from `table` (all its states).
    pub fn rows(&self, table: &str) -> u64 {
        self.purged
            .iter()
            .filter(|p| p.table == table)
            .map(|p| p.rows)
            .sum()
    }
}

/// A `table_rows` gauge: which rows of which table it counts.
#[derive(Debug, Clone)]
struct Count {
    table: &'static str,
    state: &'static str,
    /// SQL the platform writes itself; `None`: every row.
    filter: Option<String>,
}

impl Count {
    fn new(table: &'static str, state: &'static str, filter: Option<&str>) -> Self {
        Self {
            table,
            state,
            filter: filter.map(str::to_owned),
        }
    }

    fn platform() -> Vec<Self> {
        let mut counts = vec![
            // The relay's working set: small, under outbox_unsent.
            Self::new(
                "outbox",
                "unsent",
                Some("sent_at IS NULL AND parked_at IS NULL"),
            ),
            Self::new(
                "outbox",
                "parked",
                Some("sent_at IS NULL AND parked_at IS NOT NULL"),
            ),
            // Bounded by outbox_sent_age, possibly large: under outbox_sent.
            Self::new("outbox", "sent", Some("sent_at IS NOT NULL")),
            Self::new("inbox", "all", None),
            Self::new("idempotency_keys", "all", None),
        ];
        // Queued and running under jobs_claimable, succeeded and failed under jobs_finished.
        for state in JobState::ALL {
            counts.push(Count {
                table: "jobs",
                state: state.as_str(),
                filter: Some(state_is(state)),
            });
        }
        counts
    }

    fn predicate(&self) -> String {
        self.filter
            .as_deref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default()
    }

    /// Exact up to `limit` rows read; past it, the planner's estimate (module docs).
    async fn rows(&self, pool: &PgPool, limit: i64) -> Result<TableRows, PgError> {
        let (table, predicate) = (self.table, self.predicate());
        let mut conn = pool.acquire().await?;
        let exact: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM (SELECT 1 FROM {table}{predicate} LIMIT $1) s"
        )))
        .bind(limit.saturating_add(1))
        .fetch_one(&mut *conn)
        .await?;
        let mut counted = TableRows {
            table: self.table,
            state: self.state,
            rows: exact,
            estimated: false,
        };
        if exact > limit {
            let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM {table}{predicate}"
            )))
            .fetch_one(&mut *conn)
            .await?;
            let estimate = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
            // Float to integer: saturating, and the estimate is whole rows anyway.
            #[allow(clippy::cast_possible_truncation)]
            let estimate = estimate as i64;
            counted.rows = estimate.max(exact);
            counted.estimated = true;
        }
        Ok(counted)
    }
}

/// One `table_rows` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRows {
    pub table: &'static str,
    pub state: &'static str,
    pub rows: i64,
    /// The planner's estimate: the exact count would have read more than the limit.
    pub estimated: bool,
}

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

    #[tokio::test]
    async fn only_plain_identifiers_reach_sql() {
        for good in ["webhook_receipts", "received_at", "_t1"] {
            identifier(good).unwrap();
        }
        for bad in ["", "Receipts", "t; DROP TABLE x", "a.b", "1t", "t\"x"] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://u:p@127.0.0.1:1/x")
            .unwrap();
        let mut retention = Retention::new(pool, &RetentionConfig::default());
        let bad = Policy::older_than("receipts", "received_at; --", DAY);
        assert!(retention.add(bad).is_err());
    }

    #[test]
    fn platform_policies_never_touch_unsent_rows_or_unfinished_jobs() {
        let policies = Policy::platform(&RetentionConfig::default());
        let described: Vec<String> = policies
            .iter()
            .map(|p| match &p.how {
                How::Delete { column, filter, .. } => {
                    format!("{}.{column} {}", p.table, filter.as_deref().unwrap_or(""))
                }
                How::Function { function } => function.to_string(),
            })
            .collect();
        assert_eq!(
            described,
            [
                "outbox.sent_at ",
                "inbox.received_at ",
                "jobs.finished_at state = 'succeeded'",
                "idempotency_keys.expires_at ",
            ]
        );
    }
}
