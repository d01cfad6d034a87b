//! Keel's Postgres job queue (P08), written by hand because the queue *is* the lesson.
//!
//! Why not a Redis list or an in-memory channel: a job must survive a crash and be done
//! exactly once in effect, and the work it starts usually writes to this same database.
//! Here a job is a row; enqueueing it in the caller's transaction makes "order accepted" and
//! "work scheduled" one atomic fact.
//!
//! - **Claim** with `FOR UPDATE SKIP LOCKED`: many workers poll one table and never take the
//!   same row; none waits behind another's lock.
//! - **Lease**: a claimed job carries `lease_expires_at`. The worker does its work *outside*
//!   a transaction (it may call other services) and renews the lease while it runs. A worker
//!   that dies stops renewing; when the lease expires any worker may claim the job again.
//! - **Fencing**: completing or rescheduling a job checks `locked_by` and `attempts`, so a
//!   worker whose lease was taken over cannot overwrite the new holder's outcome.
//! - **Attempts with backoff**: a failed attempt reschedules the job with exponential backoff
//!   and full jitter; after `max_attempts` it is `failed`, a terminal state operators see and
//!   can retry (`keelctl jobs`).
//!
//! - **Panics**: a handler that panics has failed an attempt, like one that returns
//!   [`Outcome::RetryAfter`]: the panic is caught where the handler runs, logged once, and
//!   counted (backoff from [`PANIC_RETRY_BASE`], `failed` after `max_attempts` with the panic
//!   message as `last_error`). A bug that always panics thus ends in front of an operator
//!   instead of being re-run at full speed forever.
//! - **Stopping**: a worker told to stop claims nothing more and lets its jobs in flight
//!   finish; one cut off before finishing (its task aborted) hands its lease back
//!   ([`release`]), so another instance resumes it at once rather than after the lease
//!   expires. Only a cut-off does: it is the one way an attempt ends without an outcome.
//!
//! - **States** are [`JobState`], stored as text through its one mapping (`as_str`/`parse`):
//!   queries bind the enum, rows decode into it, and a test keeps its texts equal to the
//!   table's CHECK constraint. The claim's filter is the one place that spells the states in
//!   its SQL (rendered from the mapping): see [`claim`] for why.
//!
//! Handlers must be idempotent: a job whose worker died after the effect but before
//! [`complete`] runs again (at-least-once). The `jobs` table is a platform table
//! (`crates/keel-pg/migrations/0004_jobs.sql`): every service's database gets it from
//! [`crate::migrate`], see [`crate::schema`].

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use keel_resilience::backoff::BackoffPolicy;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::PgError;
use crate::millis;

/// Where a job is in its life: `queued` (due at `run_at`) → `running` (leased) → `succeeded`,
/// or back to `queued` for another attempt, or `failed` after its last one (an operator may
/// queue it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    /// Every state, in the order of the table's CHECK constraint.
    pub const ALL: [Self; 4] = [Self::Queued, Self::Running, Self::Succeeded, Self::Failed];

    /// The stored text (the one mapping; serde's lowercase names agree with it). Renaming one
    /// needs a migration of the rows and the CHECK constraint, never just a code change.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// The state stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// Stored as Postgres `text` through `as_str`/`parse` (crate::text).
crate::text_column!(JobState, "job state");

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub queue: &'a str,
    pub payload: serde_json::Value,
    pub max_attempts: i32,
    /// Not before this delay (zero: now).
    pub delay: Duration,
    /// A fixed id makes the enqueue idempotent (singleton jobs); `None` generates one.
    pub id: Option<Uuid>,
}

/// Enqueues `job` on `conn` (ideally in the transaction that makes the work necessary).
/// Returns the id, or `None` if a job with that fixed id already exists.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob<'_>) -> Result<Option<Uuid>, PgError> {
    let id = job.id.unwrap_or_else(Uuid::now_v7);
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, queue, payload, max_attempts, run_at, state)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8 / 1000), $6)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(job.queue)
    .bind(&job.payload)
    .bind(job.max_attempts)
    .bind(millis(job.delay))
    .bind(JobState::Queued)
    .execute(conn)
    .await?
    .rows_affected();
    Ok((inserted == 1).then_some(id))
}

/// Enqueues every job of `batch` in one statement (one round trip however many: a fan-out,
/// such as one delivery per subscriber, costs the enqueueing transaction no more than one
/// job). Jobs whose fixed id exists already are skipped. Returns how many were enqueued.
pub async fn enqueue_many(conn: &mut PgConnection, batch: &[NewJob<'_>]) -> Result<u64, PgError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = batch
        .iter()
        .map(|j| j.id.unwrap_or_else(Uuid::now_v7))
        .collect();
    let queues: Vec<&str> = batch.iter().map(|j| j.queue).collect();
    let payloads: Vec<&serde_json::Value> = batch.iter().map(|j| &j.payload).collect();
    let max_attempts: Vec<i32> = batch.iter().map(|j| j.max_attempts).collect();
    let delays: Vec<f64> = batch.iter().map(|j| millis(j.delay) as f64).collect();
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, queue, payload, max_attempts, run_at, state)
         SELECT id, queue, payload, max_attempts,
                now() + make_interval(secs => delay_ms / 1000), $6
           FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::float8[])
                AS b (id, queue, payload, max_attempts, delay_ms)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&queues)
    .bind(&payloads)
    .bind(&max_attempts)
    .bind(&delays)
    .bind(JobState::Queued)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// Moves the queued jobs of one group ([`Skip`]'s payload field `field` equal to `group`) of
/// `queue` to no earlier than `delay` from now, without counting an attempt. For a worker that
/// knows a group cannot run for a while (a webhook endpoint whose breaker just opened): its
/// backlog then stops being due, so claims no longer walk past it. Returns how many moved.
pub async fn postpone_group(
    conn: &mut PgConnection,
    queue: &str,
    field: &str,
    group: &str,
    delay: Duration,
) -> Result<u64, PgError> {
    let queued = JobState::Queued.as_str();
    let sql = format!(
        "UPDATE jobs SET run_at = now() + make_interval(secs => $4::float8 / 1000)
          WHERE queue = $1 AND state = '{queued}' AND payload ->> $2 = $3
            AND run_at < now() + make_interval(secs => $4::float8 / 1000)"
    );
    Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .bind(field)
        .bind(group)
        .bind(millis(delay) as f64)
        .execute(conn)
        .await?
        .rows_affected())
}

/// A claimed job. `attempts` (this attempt's number) and `locked_by` fence its outcome.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub queue: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub max_attempts: i32,
    pub locked_by: String,
    pub created_at: DateTime<Utc>,
}

/// Claims up to `limit` runnable jobs of `queue` for `worker`: queued ones that are due, and
/// running ones whose lease expired (their worker died). A job whose lease expired on its
/// last attempt is failed here instead of being run again.
///
/// The filter names its states as constants, rendered from [`JobState::as_str`], not as
/// bound parameters: only then can the planner match the partial index `jobs_claimable`
/// (`WHERE state IN ('queued', 'running')`) in a generic plan, which a prepared statement
/// may switch to. With `state = $n` a generic plan cannot prove the index's predicate and
/// scans the whole table (checked with `EXPLAIN` under `plan_cache_mode =
/// force_generic_plan`): on the hottest query of the queue.
pub async fn claim(
    conn: &mut PgConnection,
    queue: &str,
    worker: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Job>, PgError> {
    claim_skipping(conn, queue, worker, lease, limit, None).await
}

/// Groups of jobs a worker leaves in the queue for now: jobs whose payload field `field` (a
/// string) is one of `groups`. They stay queued, unclaimed and uncounted, and are claimed as
/// soon as a later claim no longer skips their group.
///
/// Why: a worker shared by many independent targets (webhook endpoints, tenants) must not let
/// the jobs of a target it cannot serve now (its share of the worker is taken, its breaker is
/// open) take the claims: claimed and given back, they would come round again and again ahead
/// of everyone else's (head-of-line blocking), and each round trip is load on the database.
/// The group is a payload field rather than a column so that enqueueing stays as it is.
#[derive(Debug, Clone, Copy)]
pub struct Skip<'a> {
    pub field: &'a str,
    pub groups: &'a [String],
}

/// [`claim`], leaving the jobs of `skip`'s groups in the queue.
pub async fn claim_skipping(
    conn: &mut PgConnection,
    queue: &str,
    worker: &str,
    lease: Duration,
    limit: i64,
    skip: Option<Skip<'_>>,
) -> Result<Vec<Job>, PgError> {
    let (queued, running) = (JobState::Queued.as_str(), JobState::Running.as_str());
    let sql = format!(
        "UPDATE jobs j
            SET state = $5, attempts = j.attempts + 1, locked_by = $2,
                lease_expires_at = now() + make_interval(secs => $3::float8 / 1000)
           FROM (SELECT id FROM jobs
                  WHERE queue = $1
                    AND ((state = '{queued}' AND run_at <= now())
                      OR (state = '{running}' AND lease_expires_at < now()))
                    AND ($6::text IS NULL OR coalesce(payload ->> $6, '') <> ALL ($7::text[]))
                  ORDER BY run_at
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED) c
          WHERE j.id = c.id
      RETURNING j.id, j.queue, j.payload, j.attempts, j.max_attempts, j.locked_by, j.created_at"
    );
    let jobs: Vec<Job> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .bind(worker)
        .bind(millis(lease))
        .bind(limit)
        .bind(JobState::Running)
        .bind(skip.map(|s| s.field))
        .bind(skip.map_or(&[][..], |s| s.groups))
        .fetch_all(&mut *conn)
        .await?;
    let mut runnable = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.attempts > job.max_attempts {
            fail(conn, &job, "lease expired on the last attempt").await?;
        } else {
            runnable.push(job);
        }
    }
    Ok(runnable)
}

// Every outcome is fenced: only the holder of this attempt (`locked_by` and `attempts`) may
// record it. A worker whose lease expired and was taken over updates nothing. `$4` is always
// `JobState::Running` ([`fenced`] binds `$1`-`$4`); a statement's own parameters start at `$5`.
const FENCE: &str = "id = $1 AND locked_by = $2 AND attempts = $3 AND state = $4";

/// `sql` (whose WHERE is [`FENCE`]) with the fence's parameters bound for `job`.
fn fenced<'q>(
    sql: String,
    job: &'q Job,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job.id)
        .bind(&job.locked_by)
        .bind(job.attempts)
        .bind(JobState::Running)
}

/// Hands a claimed job back without an outcome: queued again, due now, its attempt not
/// counted (it was cut off, not failed), so another worker claims it at once instead of
/// waiting for the lease to expire. `false`: the lease was lost already.
pub async fn release(conn: &mut PgConnection, job: &Job) -> Result<bool, PgError> {
    let sql = format!(
        "UPDATE jobs SET state = $5, attempts = attempts - 1, locked_by = NULL,
                lease_expires_at = NULL, run_at = now()
          WHERE {FENCE}"
    );
    let done = fenced(sql, job)
        .bind(JobState::Queued)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks `job` succeeded. `false`: the lease was lost (another worker holds the job now).
pub async fn complete(conn: &mut PgConnection, job: &Job) -> Result<bool, PgError> {
    let sql = format!(
        "UPDATE jobs SET state = $5, finished_at = now(), lease_expires_at = NULL,
                         last_error = NULL
          WHERE {FENCE}"
    );
    let done = fenced(sql, job)
        .bind(JobState::Succeeded)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Reschedules `job` after `delay`, or fails it if this was its last attempt.
pub async fn retry_later(
    conn: &mut PgConnection,
    job: &Job,
    error: &str,
    delay: Duration,
) -> Result<bool, PgError> {
    if job.attempts >= job.max_attempts {
        return fail(conn, job, error).await;
    }
    let sql = format!(
        "UPDATE jobs SET state = $5, last_error = $6, lease_expires_at = NULL,
                         run_at = now() + make_interval(secs => $7::float8 / 1000)
          WHERE {FENCE}"
    );
    let done = fenced(sql, job)
        .bind(JobState::Queued)
        .bind(error)
        .bind(millis(delay))
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Fails `job` for good (an operator can retry it).
pub async fn fail(conn: &mut PgConnection, job: &Job, error: &str) -> Result<bool, PgError> {
    let sql = format!(
        "UPDATE jobs SET state = $5, last_error = $6, finished_at = now(),
                         lease_expires_at = NULL
          WHERE {FENCE}"
    );
    let done = fenced(sql, job)
        .bind(JobState::Failed)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Extends the lease of a job still being worked on.
pub async fn renew(conn: &mut PgConnection, job: &Job, lease: Duration) -> Result<bool, PgError> {
    let sql = format!(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $5::float8 / 1000)
          WHERE {FENCE}"
    );
    let done = fenced(sql, job).bind(millis(lease)).execute(conn).await?;
    Ok(done.rows_affected() == 1)
}

/// The pause before retrying a job whose attempt number `attempt` (from 1) failed: Keel's
/// one backoff (`keel_resilience::backoff`, P24), exponential from `base`, capped at `max`,
/// with full jitter, uniform in `[0, min(max, base · 2^(attempt-1))]`. A pure function of the
/// attempt number, because that is all the `jobs` row keeps: the retry of a job may be
/// computed by another worker after a crash. Jitter spreads the retries of many jobs that
/// failed together (one outage) over time.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let failures = u32::try_from(attempt).unwrap_or(1);
    BackoffPolicy::new(base, max).delay(failures)
}

/// One row of `keelctl jobs`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobSummary {
    pub id: Uuid,
    pub queue: String,
    pub state: JobState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Jobs in `state` (all states if `None`), newest first.
pub async fn list(
    conn: &mut PgConnection,
    state: Option<JobState>,
    limit: i64,
) -> Result<Vec<JobSummary>, PgError> {
    Ok(sqlx::query_as(
        "SELECT id, queue, state, attempts, max_attempts, run_at, last_error
           FROM jobs WHERE $1::text IS NULL OR state = $1
          ORDER BY created_at DESC LIMIT $2",
    )
    .bind(state)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Puts a failed job back in the queue with a fresh set of attempts. `false` if it is not
/// failed (nothing to retry).
pub async fn retry_failed(conn: &mut PgConnection, id: Uuid) -> Result<bool, PgError> {
    Ok(sqlx::query(
        "UPDATE jobs SET state = $2, attempts = 0, run_at = now(), finished_at = NULL
          WHERE id = $1 AND state = $3",
    )
    .bind(id)
    .bind(JobState::Queued)
    .bind(JobState::Failed)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Ceiling of the pause after a handler's first panic (doubling per attempt, full jitter, see
/// [`backoff`]). A panic is a bug, not an outage: retrying soon rarely helps, but a few
/// bounded retries cover a panic caused by a passing condition, and the attempts must end.
pub const PANIC_RETRY_BASE: Duration = Duration::from_secs(1);
/// Cap of the pause between the attempts of a job whose handler panics.
pub const PANIC_RETRY_MAX: Duration = Duration::from_secs(300);

/// What a handler decides about one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished: mark succeeded.
    Done,
    /// Try again after this delay (counts an attempt; fails after the last one).
    RetryAfter(Duration, String),
    /// Give up now: terminal `failed`.
    Fail(String),
}

/// Settings of [`run_worker`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub queue: String,
    /// This worker's name in `locked_by` (host, pid and a random suffix are good).
    pub worker: String,
    /// Jobs run at once by this worker (P05: the bound on load it puts downstream).
    pub concurrency: usize,
    /// Lease per claim; renewed every third of it while the handler runs.
    pub lease: Duration,
    /// Pause between polls when the queue is empty.
    pub poll_interval: Duration,
}

/// Runs `handler` on jobs of `config.queue` until `stop`, at most `config.concurrency` at a
/// time, then waits for the jobs in flight to finish. Polls: `LISTEN/NOTIFY` would need a
/// session, which pgbouncer's transaction mode does not give.
pub async fn run_worker<H, F>(
    pool: PgPool,
    config: WorkerConfig,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Job) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    run_worker_skipping(
        pool,
        config,
        stop,
        None::<(&str, fn() -> Vec<String>)>,
        handler,
    )
    .await;
}

/// [`run_worker`], asking `skip` before every claim which groups to leave in the queue for
/// now ([`Skip`]): `(field, groups)`, `groups` called once per claim.
pub async fn run_worker_skipping<H, F, G>(
    pool: PgPool,
    config: WorkerConfig,
    stop: CancellationToken,
    skip: Option<(&str, G)>,
    handler: H,
) where
    H: Fn(Job) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
    G: Fn() -> Vec<String>,
{
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let queue = config.queue.as_str();
    loop {
        while let Some(ended) = tasks.try_join_next() {
            log_if_panicked(ended, queue);
        }
        let free = slots.available_permits();
        let claimed = if free == 0 || stop.is_cancelled() {
            Ok(Vec::new())
        } else {
            match pool.acquire().await {
                Ok(mut conn) => {
                    let groups = skip.as_ref().map(|(field, groups)| (*field, groups()));
                    let skip = groups
                        .as_ref()
                        .map(|(field, groups)| Skip { field, groups });
                    claim_skipping(
                        &mut conn,
                        queue,
                        &config.worker,
                        config.lease,
                        free as i64,
                        skip,
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            }
        };
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(queue, error = %e, "claiming jobs failed");
                Vec::new()
            }
        };
        let idle = jobs.is_empty();
        for job in jobs {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break; // cannot happen: we claimed at most `free`
            };
            metrics::counter!("jobs_claimed_total", "queue" => queue.to_owned()).increment(1);
            let (pool, handler, lease) = (pool.clone(), handler.clone(), config.lease);
            tasks.spawn(async move {
                run_one(pool, job, lease, handler).await;
                drop(permit);
            });
        }
        if !idle {
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(config.poll_interval) => {}
        }
    }
    // Graceful stop: no new claims; let in-flight jobs finish. The caller bounds this wait
    // (keel_service's `workers` stage); a job still running when it cuts this future off is
    // dropped with the JoinSet, and hands its lease back (`LeaseGuard`).
    while let Some(ended) = tasks.join_next().await {
        log_if_panicked(ended, queue);
    }
}

/// A job's task ended: say so if it panicked. Handlers' panics are caught in [`run_one`], so
/// this one is a bug of the worker itself; it is logged rather than dropped with the result.
fn log_if_panicked(ended: Result<(), tokio::task::JoinError>, queue: &str) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!(queue, error = %e, "job task panicked outside its handler");
    }
}

/// The message of a caught panic (`panic!` gives a `&str` or a `String`).
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// Hands its job back ([`release`]) if it is dropped before the job's outcome was recorded:
/// the worker was cut off at the end of its shutdown stage, or its task was aborted. (A
/// handler's panic does not drop it: [`run_one`] catches the panic and records an outcome.) The
/// release runs as a task of its own because `Drop` cannot await; if it cannot run (the pool
/// is gone), the lease expires and the job is claimed again all the same, only later.
struct LeaseGuard {
    pool: PgPool,
    job: Option<Job>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.pool.clone();
        runtime.spawn(async move {
            let released = match pool.acquire().await {
                Ok(mut conn) => release(&mut conn, &job).await,
                Err(e) => Err(e.into()),
            };
            match released {
                Ok(true) => {
                    metrics::counter!("jobs_released_total", "queue" => job.queue.clone())
                        .increment(1);
                    tracing::info!(job_id = %job.id, queue = %job.queue, "job cut off; lease handed back");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(job_id = %job.id, error = %e, "handing a lease back failed; it will expire"),
            }
        });
    }
}

async fn run_one<H, F>(pool: PgPool, job: Job, lease: Duration, handler: H)
where
    H: Fn(Job) -> F,
    F: Future<Output = Outcome>,
{
    let mut guard = LeaseGuard {
        pool: pool.clone(),
        job: Some(job.clone()),
    };
    let started = std::time::Instant::now();
    let queue = job.queue.clone();
    // Caught here, so a panic is an attempt's outcome (see the module docs), not an unwinding
    // that would drop `guard` and hand the job back as if it had been cut off. Unwind safety:
    // the handler's future is dropped right after, and nothing it may have left half-done
    // in memory is read again; what it did in the database is what any failed attempt leaves.
    let work = AssertUnwindSafe(handler(job.clone())).catch_unwind();
    tokio::pin!(work);
    let mut renew_every = tokio::time::interval(lease / 3);
    renew_every.tick().await;
    let finished = loop {
        tokio::select! {
            finished = &mut work => break finished,
            _ = renew_every.tick() => {
                if let Ok(mut conn) = pool.acquire().await
                    && let Ok(false) = renew(&mut conn, &job, lease).await
                {
                    tracing::warn!(job_id = %job.id, queue = %queue, "lease lost while running");
                }
            }
        }
    };
    let (outcome, label) = match finished {
        Ok(outcome) => {
            let label = match &outcome {
                Outcome::Done => "done",
                Outcome::RetryAfter(..) => "retry",
                Outcome::Fail(_) => "failed",
            };
            (outcome, label)
        }
        Err(panic) => {
            let message = panic_message(&*panic);
            // Logged once, here, where it is handled; the job row keeps the message.
            tracing::error!(
                job_id = %job.id, queue = %queue, attempt = job.attempts,
                max_attempts = job.max_attempts, panic = message,
                "job handler panicked; counted as a failed attempt"
            );
            let delay = backoff(job.attempts, PANIC_RETRY_BASE, PANIC_RETRY_MAX);
            let error = format!("handler panicked: {message}");
            (Outcome::RetryAfter(delay, error), "panicked")
        }
    };
    metrics::counter!("jobs_finished_total", "queue" => queue.clone(), "outcome" => label)
        .increment(1);
    metrics::histogram!("job_duration_seconds", "queue" => queue.clone())
        .record(started.elapsed().as_secs_f64());
    // From here the outcome is being recorded: a drop now must not also release the job.
    guard.job = None;
    let recorded = match pool.acquire().await {
        Ok(mut conn) => match &outcome {
            Outcome::Done => complete(&mut conn, &job).await,
            Outcome::RetryAfter(delay, error) => retry_later(&mut conn, &job, error, *delay).await,
            Outcome::Fail(error) => fail(&mut conn, &job, error).await,
        },
        Err(e) => Err(e.into()),
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(job_id = %job.id, queue = %queue, "outcome not recorded: lease lost")
        }
        // The lease will expire and the job run again: handlers are idempotent.
        Err(e) => {
            tracing::warn!(job_id = %job.id, queue = %queue, error = %e, "recording job outcome failed")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The states the `jobs` table accepts, read from its CHECK constraint in the migration
    /// that created it (the applied migration is the schema's truth; it is never edited).
    fn states_in_the_check_constraint() -> Vec<String> {
        let sql = include_str!("../migrations/0004_jobs.sql");
        let from = sql.find("CHECK (state IN (").unwrap() + "CHECK (state IN (".len();
        let to = from + sql[from..].find(')').unwrap();
        sql[from..to]
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_owned())
            .collect()
    }

    #[test]
    fn job_states_are_the_texts_the_check_constraint_allows() {
        let texts: Vec<String> = JobState::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        assert_eq!(texts, states_in_the_check_constraint());
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(JobState::parse("paused"), None);
    }
}
