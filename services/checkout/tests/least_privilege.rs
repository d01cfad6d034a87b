//! P14: the runtime role can read and write rows in its own tables and nothing more.
//!
//! Each test shows the capability first with the owner role (so the denial below is the
//! role's doing, not a broken statement), then its denial for `checkout_app`.
#![allow(clippy::unwrap_used)]

use keel_testkit::{Stack, TestDb};
use sqlx::{Connection, PgConnection};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

fn denied(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    let err = result.expect_err("the app role must not be allowed this");
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .unwrap_or_default()
        .to_string();
    assert_eq!(code, "42501", "insufficient_privilege expected, got {err}");
    code
}

#[tokio::test]
async fn app_role_can_use_rows_of_its_own_tables() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    sqlx::query(
        "INSERT INTO products (sku, name, price_minor, currency) VALUES ('P14-1', 'x', 1, 'EUR')",
    )
    .execute(&mut app)
    .await
    .unwrap();
    sqlx::query("UPDATE products SET price_minor = 2 WHERE sku = 'P14-1'")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("DELETE FROM products WHERE sku = 'P14-1'")
        .execute(&mut app)
        .await
        .unwrap();
}

#[tokio::test]
async fn app_role_cannot_create_tables() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut owner = connect(&db.owner_url()).await;
    sqlx::query("CREATE TABLE owner_can (id int)")
        .execute(&mut owner)
        .await
        .unwrap();

    let mut app = connect(&db.app_url()).await;
    denied(
        sqlx::query("CREATE TABLE app_cannot (id int)")
            .execute(&mut app)
            .await,
    );
}

#[tokio::test]
async fn app_role_cannot_alter_or_drop_tables() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    denied(
        sqlx::query("ALTER TABLE products ADD COLUMN evil text")
            .execute(&mut app)
            .await,
    );
    denied(sqlx::query("DROP TABLE products").execute(&mut app).await);
    denied(sqlx::query("TRUNCATE products").execute(&mut app).await);

    let mut owner = connect(&db.owner_url()).await;
    sqlx::query("ALTER TABLE products ADD COLUMN fine text")
        .execute(&mut owner)
        .await
        .unwrap();
}

#[tokio::test]
async fn app_role_cannot_read_the_migration_history() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    let r = sqlx::query("SELECT * FROM _sqlx_migrations")
        .execute(&mut app)
        .await;
    denied(r);
}

#[tokio::test]
async fn app_role_cannot_connect_to_another_services_database() {
    let stack = Stack::load();
    // The real databases made by infra/postgres/init.sql (run by `make test`).
    for (port, via) in [
        (stack.pg_port, "direct"),
        (stack.pgbouncer_port, "pgbouncer"),
    ] {
        for other in ["keel_billing", "keel_notification"] {
            let url = format!("postgres://checkout_app:checkout_app_dev@127.0.0.1:{port}/{other}");
            let err = PgConnection::connect(&url)
                .await
                .expect_err("must be refused");
            let msg = err.to_string();
            assert!(
                msg.contains("permission denied") || msg.contains("42501"),
                "{via} to {other}: {msg}"
            );
        }
    }
    // Positive control: its own database accepts it, by both routes.
    for port in [stack.pg_port, stack.pgbouncer_port] {
        let url =
            format!("postgres://checkout_app:checkout_app_dev@127.0.0.1:{port}/keel_checkout");
        PgConnection::connect(&url).await.unwrap();
    }
}
