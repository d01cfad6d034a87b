//! `keel_pg::idempotency` (P13) on its own, against real Postgres through pgbouncer: the
//! decisions `begin` makes about a key that is already there, which checkout's HTTP tests
//! reach only on their happy paths.
//!
//! What is proven here:
//! - a completed key replays its answer for the same request and is a mismatch for another;
//! - a key whose first request is still running is "in progress": while its transaction
//!   holds the insert (one-transaction use), once the wait bound passes; while its committed
//!   row is locked by a caller taking it over; and while a two-phase row is fresh;
//! - an expired key, or a two-phase row abandoned past `stale_after`, starts over as new; a
//!   completed row is never "abandoned", however old;
//! - an error that is not the lock bound (a statement timeout, here) is an error, never
//!   mistaken for "in progress";
//! - `purge_expired` deletes expired keys only, and says how many.
//!
//! Each test's database holds the platform's tables only (`keel_pg::PLATFORM_MIGRATOR`).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use keel_pg::idempotency::{self, Begin, Timing};
use keel_testkit::TestDb;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};

const SCOPE: &str = "customer-1";

async fn pool() -> (TestDb, PgPool) {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.app_url())
        .await
        .unwrap();
    (db, pool)
}

/// Keys kept a day, a 2 s wait behind a concurrent holder, in-progress rows stale after a day.
fn timing() -> Timing {
    Timing {
        ttl: Duration::from_secs(86_400),
        wait: Duration::from_secs(2),
        stale_after: Duration::from_secs(86_400),
    }
}

async fn begin(tx: &mut Transaction<'_, Postgres>, key: &str, hash: &[u8], t: Timing) -> Begin {
    idempotency::begin(tx, SCOPE, key, hash, t).await.unwrap()
}

/// One-transaction use to the end: begin, complete with `status`, commit.
async fn completed(pool: &PgPool, key: &str, hash: &[u8], t: Timing, status: i32) {
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, key, hash, t).await, Begin::New);
    let answer = serde_json::json!({ "status": status });
    idempotency::complete(&mut tx, SCOPE, key, status, &answer)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Two-phase use, phase one only: the in-progress row is committed, no answer yet.
async fn left_in_progress(pool: &PgPool, key: &str, hash: &[u8], t: Timing) {
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, key, hash, t).await, Begin::New);
    tx.commit().await.unwrap();
}

/// Holds `key`'s committed row with `FOR UPDATE` in a transaction of its own, as a caller
/// taking over an expired key does between its `SELECT … FOR UPDATE` and its `UPDATE`.
async fn lock_row(pool: &PgPool, key: &str) -> Transaction<'static, Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE scope = $1 AND key = $2 FOR UPDATE")
        .bind(SCOPE)
        .bind(key)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    holder
}

/// A statement timeout (150 ms) below the lock wait `timing()` sets (2 s).
async fn short_statement_timeout(tx: &mut Transaction<'_, Postgres>) {
    sqlx::query("SET LOCAL statement_timeout = '150ms'")
        .execute(&mut **tx)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_completed_key_replays_for_the_same_request_and_is_a_mismatch_for_another() {
    let (_db, pool) = pool().await;
    completed(&pool, "k", b"order A", timing(), 202).await;

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, "k", b"order A", timing()).await,
        Begin::Replay {
            status_code: 202,
            response: serde_json::json!({ "status": 202 })
        }
    );
    assert_eq!(
        begin(&mut tx, "k", b"order B", timing()).await,
        Begin::Mismatch
    );
}

/// One-transaction use: the first request's insert is not committed, so the second's insert
/// waits on the key; past `wait` it is told "in progress" (409) while the first is still
/// open (a wait that ignored the bound would not return before the first ends).
#[tokio::test]
async fn a_key_whose_first_transaction_is_still_open_is_in_progress_once_the_wait_passes() {
    let (_db, pool) = pool().await;
    let mut first = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut first, "k", b"order A", timing()).await,
        Begin::New
    );

    let short = Timing {
        wait: Duration::from_millis(200),
        ..timing()
    };
    let mut second = pool.begin().await.unwrap();
    let started = Instant::now();
    assert_eq!(
        begin(&mut second, "k", b"order A", short).await,
        Begin::InProgress
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
    first.rollback().await.unwrap();
}

/// A committed row locked by a caller deciding about it (taking over an expired key): the
/// `SELECT … FOR UPDATE` waits at most `wait`, then "in progress".
#[tokio::test]
async fn a_key_whose_row_is_locked_by_another_caller_is_in_progress_once_the_wait_passes() {
    let (_db, pool) = pool().await;
    completed(&pool, "k", b"order A", timing(), 202).await;
    let holder = lock_row(&pool, "k").await;

    let short = Timing {
        wait: Duration::from_millis(200),
        ..timing()
    };
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, "k", b"order A", short).await,
        Begin::InProgress
    );
    holder.rollback().await.unwrap();
}

/// The same two waits cut short by something else, a statement timeout below the lock wait:
/// that is a failure of the request (500, retried by the client), not a concurrent holder of
/// the key. Only `55P03 lock_not_available` means "in progress".
#[tokio::test]
async fn a_wait_ended_by_anything_but_the_lock_bound_is_an_error_not_in_progress() {
    let (_db, pool) = pool().await;

    // Waiting on the uncommitted insert of another transaction.
    let mut first = pool.begin().await.unwrap();
    assert_eq!(begin(&mut first, "open", b"A", timing()).await, Begin::New);
    let mut tx = pool.begin().await.unwrap();
    short_statement_timeout(&mut tx).await;
    let err = idempotency::begin(&mut tx, SCOPE, "open", b"A", timing())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
    drop(tx);
    first.rollback().await.unwrap();

    // Waiting on the lock of a committed row.
    completed(&pool, "locked", b"A", timing(), 202).await;
    let holder = lock_row(&pool, "locked").await;
    let mut tx = pool.begin().await.unwrap();
    short_statement_timeout(&mut tx).await;
    let err = idempotency::begin(&mut tx, SCOPE, "locked", b"A", timing())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
    drop(tx);
    holder.rollback().await.unwrap();
}

/// Two-phase use: a fresh in-progress row is a request still calling out.
#[tokio::test]
async fn a_fresh_two_phase_row_without_an_answer_is_in_progress() {
    let (_db, pool) = pool().await;
    left_in_progress(&pool, "k", b"A", timing()).await;
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, "k", b"A", timing()).await, Begin::InProgress);
}

/// A row left in progress past `stale_after` was abandoned by a crashed process: taken over.
/// A completed row is an answer, never abandoned, whatever its age.
#[tokio::test]
async fn only_an_unanswered_row_older_than_stale_after_is_taken_over() {
    let (_db, pool) = pool().await;
    let stale_at_once = Timing {
        stale_after: Duration::ZERO,
        ..timing()
    };
    left_in_progress(&pool, "abandoned", b"A", timing()).await;
    completed(&pool, "answered", b"A", timing(), 202).await;

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, "abandoned", b"B", stale_at_once).await,
        Begin::New
    );
    assert!(matches!(
        begin(&mut tx, "answered", b"A", stale_at_once).await,
        Begin::Replay {
            status_code: 202,
            ..
        }
    ));
}

/// Past its ttl a key is absent: a new request under it starts over, even a different one.
#[tokio::test]
async fn an_expired_key_starts_over_as_new() {
    let (_db, pool) = pool().await;
    let expires_at_once = Timing {
        ttl: Duration::ZERO,
        ..timing()
    };
    completed(&pool, "k", b"order A", expires_at_once, 202).await;

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(begin(&mut tx, "k", b"order B", timing()).await, Begin::New);
    tx.commit().await.unwrap();
    // Started over for real: the new request's fingerprint is the key's now.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        begin(&mut tx, "k", b"order A", timing()).await,
        Begin::Mismatch
    );
}

#[tokio::test]
async fn purge_expired_deletes_expired_keys_only_and_counts_them() {
    let (_db, pool) = pool().await;
    let expires_at_once = Timing {
        ttl: Duration::ZERO,
        ..timing()
    };
    for key in ["old-1", "old-2", "old-3"] {
        completed(&pool, key, b"A", expires_at_once, 202).await;
    }
    completed(&pool, "live", b"A", timing(), 202).await;

    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        idempotency::purge_expired(&mut conn, 2).await.unwrap(),
        2,
        "one batch"
    );
    assert_eq!(idempotency::purge_expired(&mut conn, 2).await.unwrap(), 1);
    assert_eq!(idempotency::purge_expired(&mut conn, 2).await.unwrap(), 0);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(left, ["live"]);
}
