//! P08 proofs for the Postgres job queue, against real Postgres through pgbouncer.
//!
//! Two failures first, each next to Keel's claim under the same conditions:
//! - workers that claim with a plain `SELECT` then `UPDATE` take the same jobs and run them
//!   twice; `run_worker`'s claim never hands one job to two workers;
//! - workers that claim with `FOR UPDATE` but without `SKIP LOCKED` queue up behind another
//!   worker's open claim: while it holds the head of the queue they claim nothing, although
//!   other jobs are due; `jobs::claim` skips the held row and takes another job at once.
//!
//! Then the rest of the pattern: a dead worker's job comes back when its lease expires, and
//! every outcome is fenced so the worker that lost the lease records nothing; a job running
//! past its lease keeps it by renewing; a job that keeps failing ends `failed`, visible and
//! retryable; a stopped worker claims nothing more, and one cut off at shutdown hands its job
//! back.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`) and
//! belongs to the platform-only roles `platform_owner`/`platform_app`: no service is involved.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_pg::jobs::{self, JobState, NewJob, Outcome, WorkerConfig};
use keel_testkit::{TestDb, eventually};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(&db.app_url())
        .await
        .unwrap()
}

async fn enqueue_many(pool: &PgPool, queue: &str, n: usize, max_attempts: i32) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    let mut tx = pool.begin().await.unwrap();
    for i in 0..n {
        let job = NewJob {
            queue,
            payload: serde_json::json!({ "n": i }),
            max_attempts,
            delay: Duration::ZERO,
            id: None,
        };
        ids.push(jobs::enqueue(&mut tx, &job).await.unwrap().unwrap());
    }
    tx.commit().await.unwrap();
    ids
}

async fn count_in_state(pool: &PgPool, state: JobState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn count(pool: &PgPool, queue: &str, state: JobState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND state = $2")
        .bind(queue)
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
}

type Runs = Arc<Mutex<HashMap<Uuid, u32>>>;

fn worker(name: &str, queue: &str) -> WorkerConfig {
    WorkerConfig {
        queue: queue.to_owned(),
        worker: name.to_owned(),
        concurrency: 8,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_select_then_update_claims_run_jobs_twice() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    enqueue_many(&pool, "naive", 200, 3).await;
    let runs: Runs = Arc::default();

    // Four workers, each: read ten queued ids, then mark them running. Between the read and
    // the write another worker reads the same ids: nothing stops it.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (pool, runs) = (pool.clone(), runs.clone());
        workers.spawn(async move {
            for _ in 0..100 {
                let ids: Vec<Uuid> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE state = $1 ORDER BY run_at LIMIT 10",
                )
                .bind(JobState::Queued)
                .fetch_all(&pool)
                .await
                .unwrap();
                if ids.is_empty() {
                    break;
                }
                sqlx::query("UPDATE jobs SET state = $2 WHERE id = ANY($1)")
                    .bind(&ids)
                    .bind(JobState::Succeeded)
                    .execute(&pool)
                    .await
                    .unwrap();
                let mut runs = runs.lock().unwrap();
                for id in ids {
                    *runs.entry(id).or_default() += 1;
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let twice = runs.lock().unwrap().values().filter(|n| **n > 1).count();
    assert!(
        twice > 0,
        "naive claiming ran no job twice this time; the race is real but was not hit"
    );
}

/// The same four workers' worth of claims through `run_worker`. Delivery stays at-least-once
/// (a worker that dies after the effect and before `complete` runs the job again when its
/// lease expires); no worker dies here, so a job run twice could only be a double claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_locked_workers_never_hand_one_job_to_two_workers() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let ids = enqueue_many(&pool, "hammer", 400, 3).await;
    let runs: Runs = Arc::default();
    let stop = CancellationToken::new();

    let mut workers = Vec::new();
    for w in 0..4 {
        let runs = runs.clone();
        workers.push(tokio::spawn(jobs::run_worker(
            pool.clone(),
            worker(&format!("w{w}"), "hammer"),
            stop.clone(),
            move |job| {
                let runs = runs.clone();
                async move {
                    *runs.lock().unwrap().entry(job.id).or_default() += 1;
                    tokio::task::yield_now().await;
                    Outcome::Done
                }
            },
        )));
    }
    eventually(
        Duration::from_secs(30),
        "all 400 jobs succeeded",
        || async { (count_in_state(&pool, JobState::Succeeded).await == 400).then_some(()) },
    )
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), ids.len(), "every job ran");
    assert!(runs.values().all(|n| *n == 1), "no job ran twice");
}

/// How a worker claims the next job in [`claims_while_the_head_of_the_queue_is_held`].
#[derive(Debug, Clone, Copy)]
enum Claimer {
    /// The anti-pattern, for the proof only: Keel's claim without `SKIP LOCKED`. Row locks
    /// still keep two workers off one job, but a locked row is waited for, not passed over.
    PlainForUpdate,
    /// `keel_pg::jobs::claim`.
    Keel,
}

/// Claims one job of `queue` for `worker` with `claimer`, in a transaction of its own.
///
/// `lock_timeout` bounds the wait for a row lock, as a worker's own bound would: a claimer
/// that waits on the held row ends with `55P03` instead of hanging the test.
async fn claim_one(
    pool: &PgPool,
    claimer: Claimer,
    queue: &str,
    worker: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let claimed = match claimer {
        Claimer::PlainForUpdate => {
            sqlx::query_scalar(PLAIN_FOR_UPDATE_CLAIM)
                .bind(queue)
                .bind(worker)
                .bind(JobState::Running)
                .bind(JobState::Queued)
                .fetch_optional(&mut *tx)
                .await?
        }
        Claimer::Keel => jobs::claim(&mut tx, queue, worker, Duration::from_secs(30), 1)
            .await
            .map_err(|e| match e {
                keel_pg::PgError::Sqlx(e) => e,
                other => panic!("claim failed: {other}"),
            })?
            .first()
            .map(|job| job.id),
    };
    tx.commit().await?;
    Ok(claimed)
}

/// The naive claim: the oldest due job, locked `FOR UPDATE` (no `SKIP LOCKED`), marked running.
const PLAIN_FOR_UPDATE_CLAIM: &str =
    "UPDATE jobs j SET state = $3, attempts = j.attempts + 1, locked_by = $2
   FROM (SELECT id FROM jobs
          WHERE queue = $1 AND state = $4 AND run_at <= now()
          ORDER BY run_at
          LIMIT 1
          FOR UPDATE) c
  WHERE j.id = c.id
RETURNING j.id";

/// What the claimers of one run got, and how long each took.
struct Claims {
    held: Uuid,
    results: Vec<(Result<Option<Uuid>, sqlx::Error>, Duration)>,
}

/// Four jobs are due. Another worker has claimed the oldest in a transaction it keeps open
/// while the job runs (a naive worker's claim, or any claim whose commit has not happened
/// yet): its row lock is held, deterministically, for as long as this function runs. Three
/// more workers claim at the same moment with `claimer`.
async fn claims_while_the_head_of_the_queue_is_held(claimer: Claimer) -> Claims {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    // The head of the queue first, in a transaction of its own: `run_at` is the enqueueing
    // transaction's `now()`, so the other three are strictly younger.
    let head = enqueue_many(&pool, "held", 1, 3).await[0];
    enqueue_many(&pool, "held", 3, 3).await;

    let mut holder = pool.begin().await.unwrap();
    let held: Uuid = sqlx::query_scalar(PLAIN_FOR_UPDATE_CLAIM)
        .bind("held")
        .bind("holder")
        .bind(JobState::Running)
        .bind(JobState::Queued)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert_eq!(held, head, "the holder has the oldest job");

    let mut tasks = Vec::new();
    for w in 0..3 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let claimed = claim_one(&pool, claimer, "held", &format!("w{w}")).await;
            (claimed, started.elapsed())
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // Only now does the holder's job end: every claim above ran while its lock was held.
    holder.commit().await.unwrap();
    Claims { held, results }
}

/// The failure: with plain `FOR UPDATE` every worker's claim reads the same head of the
/// queue, finds it locked and waits for it. Three jobs are due and nobody takes them; the
/// workers are serialised behind one transaction (here until their `lock_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_for_update_claimers_wait_behind_another_workers_open_claim() {
    let claims = claims_while_the_head_of_the_queue_is_held(Claimer::PlainForUpdate).await;
    for (result, waited) in &claims.results {
        eprintln!("plain FOR UPDATE claim: {result:?} after {waited:?}");
        let e = result
            .as_ref()
            .expect_err("a plain FOR UPDATE claim cannot pass the held row");
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .unwrap_or_default();
        assert_eq!(
            code, "55P03",
            "lock_timeout: it waited on the held row: {e}"
        );
        assert!(
            *waited >= Duration::from_secs(2),
            "blocked for the whole lock_timeout, not {waited:?}"
        );
    }
}

/// The pattern, same conditions: `SKIP LOCKED` passes over the held row, so each worker
/// claims another due job at once, well inside the `lock_timeout` the naive claimers spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_locked_claimers_take_other_jobs_at_once_while_one_is_held() {
    let claims = claims_while_the_head_of_the_queue_is_held(Claimer::Keel).await;
    let mut claimed = std::collections::HashSet::new();
    for (result, took) in claims.results {
        eprintln!("SKIP LOCKED claim: {result:?} after {took:?}");
        let id = result
            .expect("a SKIP LOCKED claim never waits on the held row")
            .expect("a due job was claimed");
        assert_ne!(id, claims.held, "the held job is skipped, not shared");
        assert!(claimed.insert(id), "no job claimed twice");
        assert!(
            took < Duration::from_secs(1),
            "claimed at once, not after {took:?}"
        );
    }
    assert_eq!(claimed.len(), 3, "the three other due jobs, one each");
}

#[tokio::test]
async fn a_dead_workers_job_is_retried_after_its_lease_expires_and_its_late_outcome_is_fenced() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let id = enqueue_many(&pool, "lease", 1, 3).await[0];

    // A worker claims the job with a short lease and then "dies": it never reports back.
    let mut conn = pool.acquire().await.unwrap();
    let dead = jobs::claim(&mut conn, "lease", "dead", Duration::from_millis(300), 1)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    // While the lease holds, nobody else can take it.
    let none = jobs::claim(&mut conn, "lease", "other", Duration::from_secs(5), 1)
        .await
        .unwrap();
    assert!(none.is_empty(), "a leased job is not claimable");

    let stop = CancellationToken::new();
    let live = tokio::spawn(jobs::run_worker(
        pool.clone(),
        worker("live", "lease"),
        stop.clone(),
        |_| async { Outcome::Done },
    ));
    eventually(
        Duration::from_secs(10),
        "job taken over and done",
        || async { (count_in_state(&pool, JobState::Succeeded).await == 1).then_some(()) },
    )
    .await;
    stop.cancel();
    live.await.unwrap();

    let (attempts, locked_by): (i32, String) =
        sqlx::query_as("SELECT attempts, locked_by FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, locked_by.as_str()), (2, "live"));
    // The dead worker wakes up and tries to record its outcome: fenced off.
    let late = jobs::fail(&mut conn, &dead[0], "late").await.unwrap();
    assert!(
        !late,
        "a worker that lost its lease cannot overwrite the outcome"
    );
    assert_eq!(count_in_state(&pool, JobState::Succeeded).await, 1);
}

#[tokio::test]
async fn a_job_that_keeps_failing_ends_failed_and_an_operator_retry_requeues_it() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let id = enqueue_many(&pool, "flaky", 1, 3).await[0];
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let stop = CancellationToken::new();
    let h = healthy.clone();
    let w = tokio::spawn(jobs::run_worker(
        pool.clone(),
        worker("w", "flaky"),
        stop.clone(),
        move |_| {
            let h = h.clone();
            async move {
                if h.load(std::sync::atomic::Ordering::SeqCst) {
                    Outcome::Done
                } else {
                    Outcome::RetryAfter(Duration::from_millis(10), "dependency down".into())
                }
            }
        },
    ));
    eventually(
        Duration::from_secs(10),
        "job failed after 3 attempts",
        || async { (count_in_state(&pool, JobState::Failed).await == 1).then_some(()) },
    )
    .await;
    let mut conn = pool.acquire().await.unwrap();
    let failed = jobs::list(&mut conn, Some(JobState::Failed), 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].attempts, 3);
    assert_eq!(failed[0].last_error.as_deref(), Some("dependency down"));

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(jobs::retry_failed(&mut conn, id).await.unwrap());
    eventually(Duration::from_secs(10), "retried job succeeded", || async {
        (count_in_state(&pool, JobState::Succeeded).await == 1).then_some(())
    })
    .await;
    stop.cancel();
    w.await.unwrap();
}

/// A handler that panics (a bug: an `unwrap` on a payload it did not expect) is a failed
/// attempt like any other: counted, backed off, and `failed` after `max_attempts`, where an
/// operator sees the panic's message. Treated as a cut-off instead (the lease handed back,
/// the attempt not counted, due now), it would be claimed again at once, forever: a hot loop
/// that never reaches `failed`.
#[tokio::test]
async fn a_handler_that_panics_counts_an_attempt_and_ends_failed() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let id = enqueue_many(&pool, "panics", 1, 3).await[0];
    let runs = Arc::new(AtomicU32::new(0));

    let stop = CancellationToken::new();
    let w = tokio::spawn(jobs::run_worker(
        pool.clone(),
        worker("w", "panics"),
        stop.clone(),
        {
            let runs = runs.clone();
            move |job| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move { handler_with_a_bug(&job) }
            }
        },
    ));
    eventually(
        Duration::from_secs(20),
        "the panicking job failed after 3 attempts",
        || async { (count(&pool, "panics", JobState::Failed).await == 1).then_some(()) },
    )
    .await;
    stop.cancel();
    w.await.unwrap();

    let (attempts, last_error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(
        last_error.contains("handler bug: no saga id in the payload"),
        "last_error names the panic: {last_error}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3, "three runs, not a hot loop");
}

fn handler_with_a_bug(job: &jobs::Job) -> Outcome {
    match job.payload.get("saga_id") {
        Some(_) => Outcome::Done,
        None => panic!("handler bug: no saga id in the payload"),
    }
}

#[test]
fn backoff_is_jittered_below_an_exponential_cap() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(5);
    for attempt in 1..=12 {
        let cap = (base * 2u32.pow(attempt as u32 - 1)).min(max);
        for _ in 0..50 {
            assert!(jobs::backoff(attempt, base, max) <= cap);
        }
    }
    // And it does back off: at the sixth attempt (cap 3.2 s) fifty draws all at or below the
    // base would happen with probability (1/32)^50.
    let longest = (0..50).map(|_| jobs::backoff(6, base, max)).max().unwrap();
    assert!(longest > base, "no pause grew past the base: {longest:?}");
}

/// One job claimed by `first` with a lease that expires at once, then taken over by `second`,
/// as when `first`'s worker stalls past its lease: (first's claim, second's claim).
async fn taken_over(pool: &PgPool, queue: &str) -> (jobs::Job, jobs::Job) {
    enqueue_many(pool, queue, 1, 3).await;
    let mut conn = pool.acquire().await.unwrap();
    let first = jobs::claim(&mut conn, queue, "first", Duration::from_millis(1), 1)
        .await
        .unwrap();
    let second = eventually(Duration::from_secs(5), "lease expired", || async {
        let mut conn = pool.acquire().await.unwrap();
        let c = jobs::claim(&mut conn, queue, "second", Duration::from_secs(30), 1)
            .await
            .unwrap();
        c.into_iter().next()
    })
    .await;
    (first.into_iter().next().unwrap(), second)
}

/// What an outcome may change in a job's row.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Row {
    state: JobState,
    attempts: i32,
    locked_by: Option<String>,
    last_error: Option<String>,
    run_at: DateTime<Utc>,
    lease_expires_at: Option<DateTime<Utc>>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT state, attempts, locked_by, last_error, run_at, lease_expires_at
           FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Seconds from now to `t` (negative: past). Postgres and the test share this machine's clock.
fn seconds_until(t: DateTime<Utc>) -> f64 {
    (t - Utc::now()).as_seconds_f64()
}

/// The outcomes a worker records for an attempt.
#[derive(Debug, Clone, Copy)]
enum Record {
    Release,
    Complete,
    RetryLater,
    Fail,
    Renew,
}

impl Record {
    async fn on(self, conn: &mut sqlx::PgConnection, job: &jobs::Job) -> bool {
        let minute = Duration::from_secs(60);
        match self {
            Self::Release => jobs::release(conn, job).await,
            Self::Complete => jobs::complete(conn, job).await,
            Self::RetryLater => jobs::retry_later(conn, job, "busy", minute).await,
            Self::Fail => jobs::fail(conn, job, "broken").await,
            Self::Renew => jobs::renew(conn, job, minute).await,
        }
        .unwrap()
    }
}

/// Every outcome is fenced by the attempt (`locked_by`, `attempts`): the worker whose lease
/// was taken over records nothing, whatever it tries (`false`, row untouched), and the holder
/// records each outcome (`true`, with its effect).
#[tokio::test]
async fn only_the_holder_of_the_current_attempt_records_an_outcome() {
    use Record::*;
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let mut conn = pool.acquire().await.unwrap();

    for outcome in [Release, Complete, RetryLater, Fail, Renew] {
        let (stale, holder) = taken_over(&pool, &format!("{outcome:?}")).await;
        assert_eq!((holder.attempts, holder.locked_by.as_str()), (2, "second"));
        let before = row(&pool, holder.id).await;
        assert!(
            !outcome.on(&mut conn, &stale).await,
            "{outcome:?}: stale attempt"
        );
        assert_eq!(
            row(&pool, holder.id).await,
            before,
            "{outcome:?}: the stale attempt changed the row"
        );

        assert!(outcome.on(&mut conn, &holder).await, "{outcome:?}: holder");
        let after = row(&pool, holder.id).await;
        let run_in = seconds_until(after.run_at);
        match outcome {
            // Handed back: due now, the cut-off attempt not counted.
            Release => {
                assert_eq!(
                    (after.state, after.attempts, after.locked_by),
                    (JobState::Queued, 1, None)
                );
                assert!(run_in <= 0.0, "due now: {run_in}");
            }
            Complete => assert_eq!((after.state, after.last_error), (JobState::Succeeded, None)),
            RetryLater => {
                assert_eq!(
                    (after.state, after.last_error.as_deref()),
                    (JobState::Queued, Some("busy"))
                );
                assert!((50.0..=61.0).contains(&run_in), "due in a minute: {run_in}");
            }
            Fail => assert_eq!(
                (after.state, after.last_error.as_deref()),
                (JobState::Failed, Some("broken"))
            ),
            Renew => {
                assert_eq!(after.state, JobState::Running);
                let left = seconds_until(after.lease_expires_at.unwrap());
                assert!(
                    (50.0..=61.0).contains(&left),
                    "lease renewed to a minute: {left}"
                );
            }
        }
    }
}

/// Shutdown (P20 for workers): a job still running when its worker is cut off at the end of
/// the `workers` stage. A naive worker leaves it `running` until its lease expires (here 30 s;
/// in checkout a saga would stall that long on every deploy); Keel's hands it back at once.
#[tokio::test]
async fn a_job_cut_off_at_shutdown_hands_its_lease_back_at_once() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    enqueue_many(&pool, "naive-stop", 1, 3).await;
    enqueue_many(&pool, "keel-stop", 1, 3).await;
    let lease = Duration::from_secs(30);

    // The naive worker: claim, run a handler that never ends, and get cut off.
    let naive = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let jobs = jobs::claim(&mut conn, "naive-stop", "naive", lease, 1)
                .await
                .unwrap();
            assert_eq!(jobs.len(), 1);
            drop(conn);
            std::future::pending::<()>().await;
        }
    });
    // Keel's worker, same handler.
    let mut config = worker("keel", "keel-stop");
    config.lease = lease;
    let started = Arc::new(tokio::sync::Notify::new());
    let keel = tokio::spawn({
        let (pool, started) = (pool.clone(), started.clone());
        jobs::run_worker(pool, config, CancellationToken::new(), move |_job| {
            let started = started.clone();
            async move {
                started.notify_one();
                std::future::pending::<Outcome>().await
            }
        })
    });
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("keel's worker started the job");
    eventually(
        Duration::from_secs(10),
        "the naive worker claimed its job",
        || {
            let pool = pool.clone();
            async move { (count(&pool, "naive-stop", JobState::Running).await == 1).then_some(()) }
        },
    )
    .await;

    // The end of the shutdown stage: both are cut off, as keel_service aborts them.
    naive.abort();
    keel.abort();
    let _ = naive.await;
    let _ = keel.await;

    eventually(Duration::from_secs(5), "keel's job is queued again", || {
        let pool = pool.clone();
        async move { (count(&pool, "keel-stop", JobState::Queued).await == 1).then_some(()) }
    })
    .await;
    let (attempts, locked_by, due): (i32, Option<String>, bool) = sqlx::query_as(
        "SELECT attempts, locked_by, run_at <= now() FROM jobs WHERE queue = 'keel-stop'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (attempts, locked_by, due),
        (0, None, true),
        "not counted as an attempt, unlocked, due now"
    );
    // The failure, shown: the naive worker's job is still held by a worker that is gone,
    // and no other worker may claim it until its lease expires.
    assert_eq!(count(&pool, "naive-stop", JobState::Running).await, 1);
    let mut conn = pool.acquire().await.unwrap();
    let reclaimed = jobs::claim(&mut conn, "naive-stop", "other", lease, 1)
        .await
        .unwrap();
    assert!(reclaimed.is_empty(), "held until the lease expires");
    let resumed = jobs::claim(&mut conn, "keel-stop", "other", lease, 1)
        .await
        .unwrap();
    assert_eq!(
        resumed.len(),
        1,
        "another worker resumes keel's job at once"
    );
}

/// Once stopped, a worker claims nothing more, even with free slots and due jobs: what is
/// queued stays queued for the next process, instead of being started by one that is going
/// away (and cut off at the end of its shutdown stage).
#[tokio::test]
async fn a_stopped_worker_claims_no_new_job() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    enqueue_many(&pool, "stopping", 3, 3).await;
    let stop = CancellationToken::new();
    stop.cancel();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        jobs::run_worker(pool.clone(), worker("w", "stopping"), stop, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Outcome::Done }
        }),
    )
    .await
    .expect("a stopped worker returns");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(count(&pool, "stopping", JobState::Queued).await, 3);
}

/// A job that runs longer than its lease keeps it: the worker renews the lease every third of
/// it while the handler runs, so a second worker polling the same queue never takes the job
/// over and it runs once. The handler holds the job until the test has seen its first lease's
/// end pass with the job still on its first attempt and the lease moved on (renewed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_running_past_its_lease_keeps_it_by_renewing() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let id = enqueue_many(&pool, "long", 1, 3).await[0];
    let runs = Arc::new(AtomicU32::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for name in ["first", "second"] {
        let config = WorkerConfig {
            lease: Duration::from_secs(3),
            ..worker(name, "long")
        };
        let (runs, release) = (runs.clone(), release.clone());
        workers.spawn(jobs::run_worker(
            pool.clone(),
            config,
            stop.clone(),
            move |_| {
                runs.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                async move {
                    release.acquire().await.unwrap().forget();
                    Outcome::Done
                }
            },
        ));
    }
    let first_lease_ends: DateTime<Utc> =
        eventually(Duration::from_secs(10), "the job claimed", || async {
            let r = row(&pool, id).await;
            (r.state == JobState::Running).then_some(r.lease_expires_at)?
        })
        .await;
    // A second past the first lease's end, the job must still be on its first attempt, with
    // its lease pushed further out: renewed, never taken over.
    eventually(
        Duration::from_secs(15),
        "past the first lease, still the first attempt, lease renewed",
        || async {
            let r = row(&pool, id).await;
            let past = seconds_until(first_lease_ends) < -1.0;
            assert_eq!(r.attempts, 1, "the job was taken over: {r:?}");
            (past && r.lease_expires_at > Some(first_lease_ends)).then_some(())
        },
    )
    .await;
    release.add_permits(2);
    eventually(
        Duration::from_secs(15),
        "the long job succeeded",
        || async { (count(&pool, "long", JobState::Succeeded).await == 1).then_some(()) },
    )
    .await;
    stop.cancel();
    while workers.join_next().await.is_some() {}
    let attempts = row(&pool, id).await.attempts;
    assert_eq!(
        (runs.load(Ordering::SeqCst), attempts),
        (1, 1),
        "ran once, one attempt"
    );
}

#[tokio::test]
async fn a_batch_is_enqueued_in_one_statement_and_a_fixed_id_only_once() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let fixed = Uuid::now_v7();
    let batch: Vec<NewJob> = (0..3)
        .map(|i| NewJob {
            queue: "batch",
            payload: serde_json::json!({ "n": i }),
            max_attempts: 5,
            delay: Duration::from_secs(if i == 2 { 3600 } else { 0 }),
            id: (i == 0).then_some(fixed),
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(jobs::enqueue_many(&mut conn, &batch).await.unwrap(), 3);
    assert_eq!(
        jobs::enqueue_many(&mut conn, &batch[..1]).await.unwrap(),
        0,
        "fixed id"
    );
    assert_eq!(jobs::enqueue_many(&mut conn, &[]).await.unwrap(), 0);
    // The delay is each job's own: two are due, one in an hour.
    let due = jobs::claim(&mut conn, "batch", "w", Duration::from_secs(30), 10)
        .await
        .unwrap();
    let mut payloads: Vec<i64> = due
        .iter()
        .map(|j| j.payload["n"].as_i64().unwrap())
        .collect();
    payloads.sort_unstable();
    assert_eq!(payloads, [0, 1]);
    assert!(due.iter().any(|j| j.id == fixed && j.max_attempts == 5));
}

#[tokio::test]
async fn a_skipped_group_stays_queued_uncounted_until_it_is_no_longer_skipped() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let mut conn = pool.acquire().await.unwrap();
    let batch: Vec<NewJob> = ["slow", "slow", "slow", "fast", ""]
        .iter()
        .map(|group| NewJob {
            queue: "grouped",
            payload: if group.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::json!({ "endpoint": group })
            },
            max_attempts: 5,
            delay: Duration::ZERO,
            id: None,
        })
        .collect();
    jobs::enqueue_many(&mut conn, &batch).await.unwrap();
    let lease = Duration::from_secs(30);
    let skipping = ["slow".to_owned()];
    let skip = jobs::Skip {
        field: "endpoint",
        groups: &skipping,
    };
    // The failing side would be a plain claim: the slow group's jobs, oldest, come first.
    let claimed = jobs::claim_skipping(&mut conn, "grouped", "w", lease, 10, Some(skip))
        .await
        .unwrap();
    let groups: Vec<&str> = claimed
        .iter()
        .map(|j| j.payload["endpoint"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert!(
        groups.contains(&"fast") && groups.contains(&""),
        "{groups:?}"
    );
    // The skipped jobs were not touched: queued, no attempt counted.
    let untouched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE payload ->> 'endpoint' = 'slow'
            AND state = 'queued' AND attempts = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(untouched, 3);
    // No longer skipped: claimed.
    let rest = jobs::claim_skipping(&mut conn, "grouped", "w", lease, 10, None)
        .await
        .unwrap();
    assert_eq!(rest.len(), 3);
}
