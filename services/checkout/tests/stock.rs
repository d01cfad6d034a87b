//! P11: stock reservations without oversell or deadlocks, through the real pool (pgbouncer,
//! transaction mode, the `checkout_app` role) against the real tables and constraints.
//!
//! The failure first: two transactions that lock the same stock rows in opposite orders
//! deadlock (`40P01`). Then the pattern: `checkout::stock::reserve` locks in SKU order and the
//! same load runs with none. And oversell: fifty orders race for the last ten units; exactly
//! ten get them.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use checkout::stock::{self, Line, Reserve};
use keel_testkit::TestDb;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Barrier;
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

/// The anti-pattern, for the proof only: lock (update) stock rows one at a time in the order
/// the lines were given, and wait at `after_first_lock` between the first row and the rest.
async fn reserve_in_given_order(
    conn: &mut PgConnection,
    order: Uuid,
    lines: &[Line],
    after_first_lock: &Barrier,
) -> Result<(), sqlx::Error> {
    for (i, l) in lines.iter().enumerate() {
        let updated = sqlx::query(
            "UPDATE stock SET available = available - $2, reserved = reserved + $2
              WHERE sku = $1 AND available >= $2",
        )
        .bind(&l.sku)
        .bind(l.quantity)
        .execute(&mut *conn)
        .await?;
        assert_eq!(updated.rows_affected(), 1);
        if i == 0 {
            after_first_lock.wait().await;
        }
    }
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

/// `PAIRS` pairs of concurrent orders; in each pair one orders (A, B), the other (B, A) of
/// the pair's own two SKUs (own SKUs: pairs never wait on each other).
async fn pairs(db: &Db, round: &str) -> Vec<(Uuid, Vec<Line>, usize)> {
    let mut work = Vec::new();
    for p in 0..PAIRS {
        let (a, b) = (
            format!("P11-{round}-A{p}").to_uppercase(),
            format!("P11-{round}-B{p}").to_uppercase(),
        );
        new_sku(&db.admin, &a, 100).await;
        new_sku(&db.admin, &b, 100).await;
        work.push((
            new_order(&db.admin).await,
            vec![line(&a, 1), line(&b, 1)],
            p,
        ));
        work.push((
            new_order(&db.admin).await,
            vec![line(&b, 1), line(&a, 1)],
            p,
        ));
    }
    work
}

#[tokio::test]
async fn unordered_locking_deadlocks_and_ordered_locking_does_not() {
    let db = db(20).await;

    // 1. The failure. Each pair meets at a barrier once both hold their first row, so each
    //    then asks for the row the other holds: a wait cycle, every time, no timing luck.
    let barriers: Vec<Arc<Barrier>> = (0..PAIRS).map(|_| Arc::new(Barrier::new(2))).collect();
    let mut tasks = Vec::new();
    for (order, lines, p) in pairs(&db, "unordered").await {
        let (pool, barrier) = (db.app.clone(), barriers[p].clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            reserve_in_given_order(&mut tx, order, &lines, &barrier).await?;
            tx.commit().await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let (ok, deadlocks) = tally(results);
    assert_eq!(
        (ok, deadlocks),
        (PAIRS, PAIRS),
        "one 40P01 victim per pair; its partner proceeds"
    );

    // 2. The pattern, same load: the same pairs with the same opposite line orders, started
    //    together. `stock::reserve` sorts and locks every row in one `ORDER BY sku FOR
    //    UPDATE`, so there is no point between locks where a cycle could form.
    let barriers: Vec<Arc<Barrier>> = (0..PAIRS).map(|_| Arc::new(Barrier::new(2))).collect();
    let mut tasks = Vec::new();
    for (order, lines, p) in pairs(&db, "ordered").await {
        let (pool, barrier) = (db.app.clone(), barriers[p].clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut tx = pool.begin().await?;
            let outcome = stock::reserve(&mut tx, order, &lines).await?;
            assert_eq!(outcome, Reserve::Reserved);
            tx.commit().await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        tally(results),
        (2 * PAIRS, 0),
        "no deadlock, every order reserved"
    );

    // 3. And a heavier mixed load: 16 workers, 25 orders each, three of five shared SKUs in
    //    rotating orders, all contending for the same rows. Still none.
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
