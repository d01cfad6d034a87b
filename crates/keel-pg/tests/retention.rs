//! Retention of the platform's tables (`keel_pg::retention`), against real Postgres through
//! pgbouncer, as the app role.
//!
//! Failure first where there is one: without retention the tables only grow, and instances
//! that each schedule "their" purge run it once per instance per slot; the slot's fixed job id
//! makes it one run per slot. Then, table by table: old rows go, recent ones stay, and what is
//! work not yet done (unsent outbox rows, parked ones, queued, running and failed jobs) stays
//! whatever its age. A purge runs in batches and stops at `max_batches`; the recurring job
//! chains itself from slot to slot; row counts are exact below their limit and estimated
//! above it.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use keel_pg::jobs::{self, JobState, NewJob};
use keel_pg::retention::{
    self, Policy, RETENTION_QUEUE, Retention, RetentionConfig, RetentionJob, TableRows,
};
use keel_testkit::{TestDb, eventually};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.app_url())
        .await
        .unwrap()
}

/// Runs a test's own statement (arranging rows, with their ages) as the app role.
async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

async fn ids(pool: &PgPool, sql: &str) -> Vec<String> {
    let mut ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(pool)
        .await
        .unwrap();
    ids.sort();
    ids
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// An outbox row named `name` (its aggregate id), created and sent (or not) `sent` ago.
fn outbox_row(name: &str, created: &str, sent: Option<&str>, parked: bool) -> String {
    let sent = sent.map_or("NULL".to_owned(), |s| format!("now() - interval '{s}'"));
    let parked = if parked { "now()" } else { "NULL" };
    format!(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                             sent_at, parked_at)
         VALUES (gen_random_uuid(), 'test', '{name}', 'test.thing.happened', '{{}}',
                 now() - interval '{created}', {sent}, {parked});"
    )
}

fn inbox_row(message: &str, age: &str) -> String {
    format!(
        "INSERT INTO inbox (consumer, message_id, received_at)
         VALUES ('test', '{message}', now() - interval '{age}');"
    )
}

/// A job in `state`, created (and, if finished, finished) `age` ago.
fn job_row(queue: &str, state: JobState, age: &str) -> String {
    let finished = match state {
        JobState::Succeeded | JobState::Failed => format!("now() - interval '{age}'"),
        JobState::Queued | JobState::Running => "NULL".to_owned(),
    };
    format!(
        "INSERT INTO jobs (id, queue, payload, state, max_attempts, run_at, created_at,
                           finished_at)
         VALUES (gen_random_uuid(), '{queue}', '{{}}', '{}', 3, now() - interval '{age}',
                 now() - interval '{age}', {finished});",
        state.as_str()
    )
}

fn retention_with(pool: &PgPool, config: RetentionConfig) -> Retention {
    Retention::new(pool.clone(), &config)
}

#[tokio::test]
async fn without_retention_the_tables_only_grow() {
    // The naive side: rows are written and nothing ever removes them. A week of "traffic"
    // (backdated), and every row is still there, however old.
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    for day in 1..=60 {
        let age = format!("{day} days");
        exec(
            &pool,
            &outbox_row(&format!("o{day}"), &age, Some(&age), false),
        )
        .await;
        exec(&pool, &inbox_row(&format!("m{day}"), &age)).await;
        exec(&pool, &job_row("work", JobState::Succeeded, &age)).await;
    }
    for table in ["outbox", "inbox", "jobs"] {
        assert_eq!(
            scalar(&pool, &format!("SELECT count(*) FROM {table}")).await,
            60
        );
    }

    // One retention run keeps what is younger than each table's age and nothing else.
    let report = retention_with(&pool, RetentionConfig::default())
        .run_once()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // Outbox and jobs keep 7 days (rows 1..=6 days old; the 7-day one is past the cutoff by
    // the time the statement runs), the inbox 30 days.
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 6);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM jobs").await, 6);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM inbox").await, 29);
    assert_eq!(report.rows("outbox"), 54);
    assert_eq!(report.rows("inbox"), 31);
}

#[tokio::test]
async fn old_sent_outbox_rows_go_while_recent_unsent_and_parked_rows_stay() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    exec(
        &pool,
        &outbox_row("sent-8d", "8 days", Some("8 days"), false),
    )
    .await;
    // Created long ago, sent recently (a backlog the relay caught up on): its age is from
    // sending, so it stays.
    exec(
        &pool,
        &outbox_row("sent-1d", "30 days", Some("1 day"), false),
    )
    .await;
    // Never sent, however old: work the relay has not done. Never purged.
    exec(&pool, &outbox_row("unsent-90d", "90 days", None, false)).await;
    exec(&pool, &outbox_row("parked-90d", "90 days", None, true)).await;

    let report = retention_with(&pool, RetentionConfig::default())
        .run_once()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    assert_eq!(
        ids(&pool, "SELECT aggregate_id FROM outbox").await,
        ["parked-90d", "sent-1d", "unsent-90d"]
    );
    assert_eq!(report.rows("outbox"), 1);
}

#[tokio::test]
async fn inbox_entries_go_after_thirty_days_and_younger_ones_stay() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    exec(&pool, &inbox_row("m-31d", "31 days")).await;
    exec(&pool, &inbox_row("m-29d", "29 days")).await;
    exec(&pool, &inbox_row("m-now", "0 seconds")).await;

    let report = retention_with(&pool, RetentionConfig::default())
        .run_once()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        ids(&pool, "SELECT message_id FROM inbox").await,
        ["m-29d", "m-now"]
    );

    // A redelivery of a kept message is still a duplicate; one of a purged message is not.
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        !keel_pg::inbox::try_record(&mut conn, "test", "m-29d")
            .await
            .unwrap()
    );
    assert!(
        keel_pg::inbox::try_record(&mut conn, "test", "m-31d")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn succeeded_jobs_go_after_their_age_and_failed_or_unfinished_ones_stay() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    exec(&pool, &job_row("old-done", JobState::Succeeded, "8 days")).await;
    exec(&pool, &job_row("new-done", JobState::Succeeded, "1 day")).await;
    exec(&pool, &job_row("old-failed", JobState::Failed, "100 days")).await;
    exec(&pool, &job_row("old-queued", JobState::Queued, "100 days")).await;
    exec(
        &pool,
        &job_row("old-running", JobState::Running, "100 days"),
    )
    .await;

    // By default failed jobs are kept for ever: an operator must see them.
    let report = retention_with(&pool, RetentionConfig::default())
        .run_once()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        ids(&pool, "SELECT queue FROM jobs").await,
        ["new-done", "old-failed", "old-queued", "old-running"]
    );

    // With jobs_failed_age set, failed jobs past it go too; the unfinished ones still stay.
    let config = RetentionConfig {
        jobs_failed_age: Some(Duration::from_secs(90 * 86_400)),
        ..RetentionConfig::default()
    };
    exec(&pool, &job_row("new-failed", JobState::Failed, "1 day")).await;
    let report = retention_with(&pool, config).run_once().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        ids(&pool, "SELECT queue FROM jobs").await,
        ["new-done", "new-failed", "old-queued", "old-running"]
    );
}

#[tokio::test]
async fn expired_idempotency_keys_go_and_live_ones_stay() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    exec(
        &pool,
        "INSERT INTO idempotency_keys (scope, key, request_hash, expires_at) VALUES
           ('s', 'expired', '\\x00', now() - interval '1 second'),
           ('s', 'live', '\\x00', now() + interval '1 hour');",
    )
    .await;
    let report = retention_with(&pool, RetentionConfig::default())
        .run_once()
        .await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        ids(&pool, "SELECT key FROM idempotency_keys").await,
        ["live"]
    );
}

#[tokio::test]
async fn a_purge_runs_in_batches_and_one_run_stops_at_max_batches() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    for i in 0..25 {
        exec(&pool, &inbox_row(&format!("old-{i:02}"), "40 days")).await;
    }
    exec(&pool, &inbox_row("recent", "1 day")).await;
    let config = RetentionConfig {
        batch: 10,
        max_batches: 2,
        ..RetentionConfig::default()
    };
    let retention = retention_with(&pool, config);
    let inbox = retention
        .policies()
        .iter()
        .find(|p| p.table() == "inbox")
        .unwrap()
        .clone();

    // Two statements of ten, then the run stops: the rest waits for the next run.
    let first = retention.purge(&inbox).await.unwrap();
    assert_eq!((first.rows, first.batches, first.more_left), (20, 2, true));
    assert_eq!(scalar(&pool, "SELECT count(*) FROM inbox").await, 6);

    // The next run finishes: a short batch means nothing old enough is left.
    let second = retention.purge(&inbox).await.unwrap();
    assert_eq!(
        (second.rows, second.batches, second.more_left),
        (5, 1, false)
    );
    assert_eq!(ids(&pool, "SELECT message_id FROM inbox").await, ["recent"]);

    // A run with nothing to purge costs one statement.
    let third = retention.purge(&inbox).await.unwrap();
    assert_eq!((third.rows, third.batches, third.more_left), (0, 1, false));
}

/// How many jobs `instances` concurrent enqueuers leave for one slot, each enqueueing as
/// `enqueue` does, all released at once by a barrier.
async fn race<F, Fut>(pool: &PgPool, instances: usize, enqueue: F) -> i64
where
    F: Fn(PgPool) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(instances));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..instances {
        let (barrier, run) = (barrier.clone(), enqueue(pool.clone()));
        tasks.spawn(async move {
            barrier.wait().await;
            run.await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    scalar(
        pool,
        &format!("SELECT count(*) FROM jobs WHERE queue = '{RETENTION_QUEUE}'"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_instances_enqueue_one_run_per_slot() {
    let instances = 8;
    // Naive: each instance schedules "its" purge for the slot, with an id of its own. Every
    // instance then runs a purge per slot: eight runs where one was meant.
    let naive = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let naive_pool = pool(&naive).await;
    let runs = race(&naive_pool, instances, |pool| async move {
        let mut conn = pool.acquire().await.unwrap();
        let job = NewJob {
            queue: RETENTION_QUEUE,
            payload: serde_json::json!({ "slot": 1 }),
            max_attempts: 3,
            delay: Duration::ZERO,
            id: None,
        };
        jobs::enqueue(&mut conn, &job).await.unwrap();
    })
    .await;
    assert_eq!(
        runs, 8,
        "each naive instance enqueued its own run of the slot"
    );

    // Keel: the slot's run has the slot's id; racing instances insert one row between them.
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    let inserted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = inserted.clone();
    let runs = race(&pool, instances, move |pool| {
        let counter = counter.clone();
        async move {
            let retention = Retention::new(pool, &RetentionConfig::default());
            if retention.schedule().await.unwrap() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .await;
    assert_eq!(runs, 1);
    assert_eq!(inserted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_run_each_slot_once_and_chain_the_next() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    exec(&pool, &inbox_row("old", "40 days")).await;
    exec(&pool, &inbox_row("recent", "1 day")).await;
    let config = RetentionConfig {
        interval: Duration::from_millis(300),
        poll_interval: Duration::from_millis(20),
        ..RetentionConfig::default()
    };
    let stop = CancellationToken::new();
    let mut instances = Vec::new();
    for name in ["a", "b"] {
        let retention = Retention::new(pool.clone(), &config);
        instances.push(tokio::spawn(retention.run(name.to_owned(), stop.clone())));
    }

    // Runs happen, slot after slot, without anyone enqueueing but the runs themselves.
    eventually(Duration::from_secs(20), "four runs succeeded", || async {
        let done = scalar(
            &pool,
            &format!(
                "SELECT count(*) FROM jobs WHERE queue = '{RETENTION_QUEUE}' AND state = 'succeeded'"
            ),
        )
        .await;
        (done >= 4).then_some(())
    })
    .await;
    assert_eq!(ids(&pool, "SELECT message_id FROM inbox").await, ["recent"]);
    stop.cancel();
    for instance in instances {
        tokio::time::timeout(Duration::from_secs(10), instance)
            .await
            .expect("retention stops when told")
            .unwrap();
    }

    // Every run is its slot's one job, run once (one attempt), by one of the two instances.
    let runs: Vec<(Uuid, serde_json::Value, i32, Option<String>, String)> =
        sqlx::query_as("SELECT id, payload, attempts, locked_by, state FROM jobs WHERE queue = $1")
            .bind(RETENTION_QUEUE)
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut by = std::collections::BTreeSet::new();
    for (id, payload, attempts, locked_by, state) in runs {
        let job: RetentionJob = serde_json::from_value(payload).unwrap();
        assert_eq!(id, retention::job_id(job.slot));
        assert_ne!(state, "failed");
        if state == "succeeded" {
            assert_eq!(attempts, 1, "slot {} ran once", job.slot);
            by.insert(locked_by.unwrap());
        }
    }
    assert!(!by.is_empty());
}

#[tokio::test]
async fn row_counts_are_exact_below_the_limit_and_estimated_above_it() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = pool(&db).await;
    for i in 0..3 {
        exec(&pool, &outbox_row(&format!("u{i}"), "1 hour", None, false)).await;
    }
    exec(&pool, &outbox_row("p", "1 hour", None, true)).await;
    for i in 0..50 {
        exec(
            &pool,
            &outbox_row(&format!("s{i}"), "1 hour", Some("1 hour"), false),
        )
        .await;
    }
    exec(&pool, &inbox_row("m", "1 hour")).await;
    exec(&pool, &job_row("q", JobState::Queued, "1 minute")).await;
    exec(&pool, &job_row("f", JobState::Failed, "1 minute")).await;
    exec(&pool, &job_row("f", JobState::Failed, "1 minute")).await;

    let counted = retention_with(&pool, RetentionConfig::default())
        .refresh_row_counts()
        .await
        .unwrap();
    let row = |table: &str, state: &str| -> TableRows {
        counted
            .iter()
            .find(|r| r.table == table && r.state == state)
            .unwrap_or_else(|| panic!("no count for {table}/{state}"))
            .clone()
    };
    let exact = |rows: i64| (rows, false);
    let seen = |r: TableRows| (r.rows, r.estimated);
    assert_eq!(seen(row("outbox", "unsent")), exact(3));
    assert_eq!(seen(row("outbox", "parked")), exact(1));
    assert_eq!(seen(row("outbox", "sent")), exact(50));
    assert_eq!(seen(row("inbox", "all")), exact(1));
    assert_eq!(seen(row("jobs", "queued")), exact(1));
    assert_eq!(seen(row("jobs", "running")), exact(0));
    assert_eq!(seen(row("jobs", "succeeded")), exact(0));
    assert_eq!(seen(row("jobs", "failed")), exact(2));
    assert_eq!(seen(row("idempotency_keys", "all")), exact(0));

    // Past the limit a count stops reading and reports the planner's estimate: after an
    // ANALYZE (which samples every row of a table this small), the true number.
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::raw_sql("ANALYZE outbox")
        .execute(&mut owner)
        .await
        .unwrap();
    let config = RetentionConfig {
        row_count_exact_limit: 10,
        ..RetentionConfig::default()
    };
    let counted = retention_with(&pool, config)
        .refresh_row_counts()
        .await
        .unwrap();
    let sent = counted
        .iter()
        .find(|r| r.table == "outbox" && r.state == "sent")
        .unwrap();
    assert_eq!((sent.rows, sent.estimated), (50, true));
    let unsent = counted
        .iter()
        .find(|r| r.table == "outbox" && r.state == "unsent")
        .unwrap();
    assert_eq!((unsent.rows, unsent.estimated), (3, false));
}

#[tokio::test]
async fn a_service_table_is_added_with_one_policy_and_counted() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    // The platform owner plays a service adding a table of its own.
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE receipts (id text PRIMARY KEY, received_at timestamptz NOT NULL);
         CREATE INDEX receipts_received ON receipts (received_at);
         GRANT SELECT, INSERT, DELETE ON receipts TO platform_app;",
    )
    .execute(&mut owner)
    .await
    .unwrap();
    let pool = pool(&db).await;
    exec(
        &pool,
        "INSERT INTO receipts VALUES ('old', now() - interval '100 days'), ('new', now());",
    )
    .await;

    let mut retention = retention_with(&pool, RetentionConfig::default());
    retention
        .add(Policy::older_than(
            "receipts",
            "received_at",
            Duration::from_secs(90 * 86_400),
        ))
        .unwrap();
    let report = retention.run_once().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.rows("receipts"), 1);
    assert_eq!(ids(&pool, "SELECT id FROM receipts").await, ["new"]);
    let counted = retention.refresh_row_counts().await.unwrap();
    assert!(
        counted
            .iter()
            .any(|r| r.table == "receipts" && r.state == "all" && r.rows == 1)
    );
}
