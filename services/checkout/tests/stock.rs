//! P11: stock reservations without oversell or deadlocks, through the real pool (pgbouncer,
//! transaction mode, the `checkout_app` role) against the real tables and constraints.
//!
//! The failure first: pairs of orders whose transactions lock the same stock rows in
//! opposite orders deadlock (`40P01`), whether the order comes from how the customer listed
//! the lines or from how Postgres planned one locking statement without `ORDER BY`. Then the
//! pattern: `checkout::stock::reserve` runs the same load (same pairs, same plans, the same
//! gate stopping each transaction after its first lock) with none, and a heavier mixed load
//! with none. And oversell: fifty orders race for the last ten units; exactly ten get them.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use checkout::stock::{self, Line, Reserve};
use keel_testkit::{TestDb, eventually};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Barrier, oneshot};
use uuid::Uuid;

struct Db {
    _db: TestDb,
    /// Superuser, direct: arranging and asserting.
    admin: PgPool,
    /// `checkout_app` through pgbouncer: what the service uses.
    app: PgPool,
}

async fn db(pool_size: u32) -> Db {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let admin = PgPool::connect(&db.admin_url()).await.unwrap();
    let app = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(&db.app_url())
        .await
        .unwrap();
    Db {
        _db: db,
        admin,
        app,
    }
}

/// A bare order row for reservations to belong to.
async fn new_order(admin: &PgPool) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO orders (id, customer_id, currency, total_minor, state)
         VALUES ($1, 'cus_p11', 'EUR', 0, 'PENDING')",
    )
    .bind(id)
    .execute(admin)
    .await
    .unwrap();
    id
}

/// A product with `available` units in stock.
async fn new_sku(admin: &PgPool, sku: &str, available: i32) {
    sqlx::query(
        "INSERT INTO products (sku, name, price_minor, currency) VALUES ($1, $1, 100, 'EUR')",
    )
    .bind(sku)
    .execute(admin)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO stock (sku, initial, available, reserved, sold) VALUES ($1, $2, $2, 0, 0)",
    )
    .bind(sku)
    .bind(available)
    .execute(admin)
    .await
    .unwrap();
}

fn line(sku: &str, quantity: i32) -> Line {
    Line {
        sku: sku.to_owned(),
        quantity,
    }
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn fifty_concurrent_orders_for_the_last_ten_units_reserve_exactly_ten() {
    let db = db(50).await;
    // The last ten units of the hoodie: 990 of 1000 already sold.
    sqlx::query("UPDATE stock SET available = 10, sold = 990 WHERE sku = 'KEEL-HOODIE'")
        .execute(&db.admin)
        .await
        .unwrap();
    let mut orders = Vec::new();
    for _ in 0..50 {
        orders.push(new_order(&db.admin).await);
    }
    let start = Arc::new(Barrier::new(50));
    let mut tasks = Vec::new();
    for order in orders {
        let (pool, start) = (db.app.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut tx = pool.begin().await?;
            let outcome = stock::reserve(&mut tx, order, &[line("KEEL-HOODIE", 1)]).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(outcome)
        }));
    }
    let (mut reserved, mut out_of_stock) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(Reserve::Reserved) => reserved += 1,
            Ok(Reserve::OutOfStock { .. }) => out_of_stock += 1,
            // A CHECK violation (stock below zero) would land here: none may.
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert_eq!((reserved, out_of_stock), (10, 40));
    let (available, held, sold): (i32, i32, i32) =
        sqlx::query_as("SELECT available, reserved, sold FROM stock WHERE sku = 'KEEL-HOODIE'")
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(
        (available, held, sold),
        (0, 10, 990),
        "never negative, conserved"
    );
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'reserved'")
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(rows, 10);
}

/// How a transaction takes its stock locks in [`two_orders_per_pair_meet_at_the_gate`].
#[derive(Debug, Clone, Copy)]
enum Locker {
    /// The anti-pattern, for the proof only: one `UPDATE` per line, in the order the customer
    /// listed the lines.
    LinesAsGiven,
    /// The anti-pattern, for the proof only: `stock::reserve`'s one locking `SELECT`, on the
    /// same SKU-sorted array, without its `ORDER BY`. Rows are then locked in the order the
    /// plan reads them: SKU order through the primary key, physical order through the table.
    OneStatementWithoutOrderBy,
    /// `checkout::stock::reserve`.
    Keel,
}

/// Which plan a transaction's statements get. Two transactions running the same statement
/// can be planned differently (statistics that changed between them, a generic plan cached
/// on one server connection and a custom plan on another); here the two plans are set
/// explicitly so that the test does not depend on when the planner changes its mind.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Through the primary key: rows come in SKU order.
    ByIndex,
    /// A scan of the table: rows come in physical order.
    BySeqScan,
}

impl Plan {
    /// `SET LOCAL`s for the transaction. `force_custom_plan`: every statement is planned
    /// afresh under these settings, even one prepared earlier on the same server connection.
    fn settings(self) -> &'static str {
        match self {
            Self::ByIndex => {
                "SET LOCAL plan_cache_mode = force_custom_plan;
                 SET LOCAL enable_seqscan = off;
                 SET LOCAL enable_bitmapscan = off"
            }
            Self::BySeqScan => {
                "SET LOCAL plan_cache_mode = force_custom_plan;
                 SET LOCAL enable_indexscan = off;
                 SET LOCAL enable_indexonlyscan = off;
                 SET LOCAL enable_bitmapscan = off"
            }
        }
    }
}

/// Reserves `lines` for `order`, taking the stock locks the way `locker` does.
async fn lock_and_reserve(
    locker: Locker,
    conn: &mut PgConnection,
    order: Uuid,
    lines: &[Line],
) -> Result<(), sqlx::Error> {
    match locker {
        Locker::Keel => {
            assert_eq!(stock::reserve(conn, order, lines).await?, Reserve::Reserved);
        }
        Locker::LinesAsGiven => {
            for l in lines {
                take(conn, l).await?;
            }
            insert_reservations(conn, order, lines).await?;
        }
        Locker::OneStatementWithoutOrderBy => {
            // Sorting the array passed in does not sort the locks: only the statement's own
            // ORDER BY decides the order rows are locked in.
            let mut skus: Vec<&str> = lines.iter().map(|l| l.sku.as_str()).collect();
            skus.sort_unstable();
            sqlx::query("SELECT sku, available FROM stock WHERE sku = ANY($1) FOR UPDATE")
                .bind(&skus)
                .fetch_all(&mut *conn)
                .await?;
            for l in lines {
                take(conn, l).await?;
            }
            insert_reservations(conn, order, lines).await?;
        }
    }
    Ok(())
}

/// Moves `l.quantity` of its SKU from available to reserved (locking the row if not yet).
async fn take(conn: &mut PgConnection, l: &Line) -> Result<(), sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE stock SET available = available - $2, reserved = reserved + $2
          WHERE sku = $1 AND available >= $2",
    )
    .bind(&l.sku)
    .bind(l.quantity)
    .execute(&mut *conn)
    .await?;
    assert_eq!(updated.rows_affected(), 1);
    Ok(())
}

async fn insert_reservations(
    conn: &mut PgConnection,
    order: Uuid,
    lines: &[Line],
) -> Result<(), sqlx::Error> {
    for l in lines {
        sqlx::query("INSERT INTO reservations (order_id, sku, quantity) VALUES ($1, $2, $3)")
            .bind(order)
            .bind(&l.sku)
            .bind(l.quantity)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

const PAIRS: usize = 4;

/// Outcome counts of a run: (succeeded, deadlocked).
fn tally(results: Vec<Result<(), sqlx::Error>>) -> (usize, usize) {
    let mut ok = 0;
    let mut deadlocks = 0;
    for r in results {
        match r {
            Ok(()) => ok += 1,
            Err(e) if sqlstate(&e) == "40P01" => deadlocks += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (ok, deadlocks)
}

/// The load every P11 deadlock proof runs, whatever `locker` takes the locks.
///
/// `PAIRS` pairs of concurrent orders, each pair on three SKUs of its own (pairs never wait
/// on each other): A < G < B in SKU order, inserted B, G, A so that a scan of the table meets
/// them in the reverse of SKU order. One order of a pair lists its lines (A, G, B) and is
/// planned through the index; the other lists them (B, G, A) and is planned as a table scan.
///
/// The gate makes the interleaving deterministic: a transaction of the test's own holds every
/// pair's G row, so each order stops right after taking its first lock and before taking G
/// (the naive lockers hold A or B by then). Once every order of every pair is seen waiting on
/// a lock, the gate commits; an order that took A waits for the B its partner holds and the
/// other way round (a wait cycle, one `40P01` victim per pair), unless both took their locks
/// in one order, in which case the second simply waits for the first.
async fn two_orders_per_pair_meet_at_the_gate(
    db: &Db,
    round: &str,
    locker: Locker,
) -> (usize, usize) {
    let mut work = Vec::new();
    let mut gates = Vec::new();
    for p in 0..PAIRS {
        // A < G < B in SKU order.
        let [a, g, b] = ["1", "2", "3"].map(|x| format!("P11-{round}-{p}-{x}").to_uppercase());
        for sku in [&b, &g, &a] {
            new_sku(&db.admin, sku, 100).await;
        }
        work.push((
            new_order(&db.admin).await,
            vec![line(&a, 1), line(&g, 1), line(&b, 1)],
            Plan::ByIndex,
        ));
        work.push((
            new_order(&db.admin).await,
            vec![line(&b, 1), line(&g, 1), line(&a, 1)],
            Plan::BySeqScan,
        ));
        gates.push(g);
    }

    let mut gate = db.admin.begin().await.unwrap();
    let held: Vec<String> =
        sqlx::query_scalar("SELECT sku FROM stock WHERE sku = ANY($1) FOR UPDATE")
            .bind(&gates)
            .fetch_all(&mut *gate)
            .await
            .unwrap();
    assert_eq!(held.len(), PAIRS, "the gate holds every pair's G row");

    let mut pids = Vec::new();
    let mut tasks = Vec::new();
    for (order, lines, plan) in work {
        let pool = db.app.clone();
        let (pid_tx, pid_rx) = oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(plan.settings()).execute(&mut *tx).await?;
            // Inside a transaction pgbouncer keeps one server connection: this is its backend.
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            let _ = pid_tx.send(pid);
            lock_and_reserve(locker, &mut tx, order, &lines).await?;
            tx.commit().await
        }));
        pids.push(pid_rx.await.expect("the transaction started"));
    }
    eventually(
        Duration::from_secs(20),
        "every order waits on a lock (the gate or its partner)",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM unnest($1::int[]) AS t(pid)
                  WHERE cardinality(pg_blocking_pids(pid)) > 0",
            )
            .bind(&pids)
            .fetch_one(&db.admin)
            .await
            .unwrap();
            (waiting == pids.len() as i64).then_some(())
        },
    )
    .await;
    gate.commit().await.unwrap();

    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    tally(results)
}

/// The failure, as most code writes it: each order locks its lines in the order it lists
/// them. Every pair deadlocks: one `40P01` victim, and its partner commits.
#[tokio::test]
async fn locking_lines_in_the_order_given_deadlocks_every_pair() {
    let db = db(20).await;
    let outcome = two_orders_per_pair_meet_at_the_gate(&db, "given", Locker::LinesAsGiven).await;
    assert_eq!(
        outcome,
        (PAIRS, PAIRS),
        "one 40P01 victim per pair; its partner proceeds"
    );
}

/// The failure in one statement: the rows of one locking `SELECT` without `ORDER BY` are
/// locked in the order its plan reads them, so two plans of the same statement take the
/// same rows in opposite orders. Sorting the SKUs passed in changes nothing.
#[tokio::test]
async fn one_locking_statement_without_order_by_deadlocks_when_plans_differ() {
    let db = db(20).await;
    let outcome =
        two_orders_per_pair_meet_at_the_gate(&db, "unsorted", Locker::OneStatementWithoutOrderBy)
            .await;
    assert_eq!(
        outcome,
        (PAIRS, PAIRS),
        "one 40P01 victim per pair; its partner proceeds"
    );
}

/// The pattern, same load, same plans, same gate: `stock::reserve` locks every row in one
/// `SELECT … ORDER BY sku FOR UPDATE`, so both orders of a pair take A first whatever their
/// plan; the second waits for the first instead of holding anything it wants.
#[tokio::test]
async fn reserve_runs_the_same_load_without_a_deadlock() {
    let db = db(20).await;
    let outcome = two_orders_per_pair_meet_at_the_gate(&db, "ordered", Locker::Keel).await;
    assert_eq!(outcome, (2 * PAIRS, 0), "no deadlock, every order reserved");
    let reserved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE sku LIKE 'P11-ORDERED-%' AND state = 'reserved'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(reserved, (2 * PAIRS * 3) as i64, "three lines per order");
}

/// A heavier mixed load without a gate: 16 workers, 25 orders each, three of five shared
/// SKUs in rotating ascending and descending orders, all contending for the same rows.
#[tokio::test]
async fn reserve_under_a_mixed_concurrent_load_never_deadlocks() {
    let db = db(20).await;
    let skus: Vec<String> = (0..5).map(|i| format!("P11-MIX-{i}")).collect();
    for s in &skus {
        new_sku(&db.admin, s, 100_000).await;
    }
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut orders = Vec::new();
        for _ in 0..25 {
            orders.push(new_order(&db.admin).await);
        }
        let (pool, skus) = (db.app.clone(), skus.clone());
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for (i, order) in orders.into_iter().enumerate() {
                let first = (w * 7 + i * 3) % 5;
                let step = if (w + i) % 2 == 0 { 1 } else { 4 }; // ascending or descending
                let lines: Vec<Line> = (0..3)
                    .map(|k| line(&skus[(first + k * step) % 5], 1))
                    .collect();
                let r = async {
                    let mut tx = pool.begin().await?;
                    stock::reserve(&mut tx, order, &lines).await?;
                    tx.commit().await
                }
                .await;
                results.push(r);
            }
            results
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    assert_eq!(tally(results), (16 * 25, 0));
    let reserved: i64 =
        sqlx::query_scalar("SELECT sum(reserved) FROM stock WHERE sku LIKE 'P11-MIX-%'")
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(reserved, 16 * 25 * 3);
}

#[tokio::test]
async fn release_and_commit_are_idempotent_and_conserve_stock() {
    let db = db(5).await;
    let (a, b) = (new_order(&db.admin).await, new_order(&db.admin).await);
    let lines = [line("KEEL-MUG", 2), line("KEEL-BOOK", 1)];
    let mut conn = db.app.acquire().await.unwrap();
    assert_eq!(
        stock::reserve(&mut conn, a, &lines).await.unwrap(),
        Reserve::Reserved
    );
    assert_eq!(
        stock::reserve(&mut conn, a, &lines).await.unwrap(),
        Reserve::AlreadyReserved,
        "a re-run reservation changes nothing"
    );
    stock::reserve(&mut conn, b, &lines).await.unwrap();

    assert_eq!(stock::release(&mut conn, a).await.unwrap(), 2);
    assert_eq!(
        stock::release(&mut conn, a).await.unwrap(),
        0,
        "second release: no-op"
    );
    assert_eq!(
        stock::commit(&mut conn, a).await.unwrap(),
        0,
        "released is not sold"
    );
    assert_eq!(stock::commit(&mut conn, b).await.unwrap(), 2);
    assert_eq!(
        stock::commit(&mut conn, b).await.unwrap(),
        0,
        "second commit: no-op"
    );
    assert_eq!(
        stock::release(&mut conn, b).await.unwrap(),
        0,
        "sold is not released"
    );

    let mug: (i32, i32, i32) =
        sqlx::query_as("SELECT available, reserved, sold FROM stock WHERE sku = 'KEEL-MUG'")
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(mug, (998, 0, 2));
    let book: (i32, i32, i32) =
        sqlx::query_as("SELECT available, reserved, sold FROM stock WHERE sku = 'KEEL-BOOK'")
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(book, (999, 0, 1));
}
