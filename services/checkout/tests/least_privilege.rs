//! P14: the runtime role can do what checkout does and nothing more; the operator tool's roles
//! can do what keelctl does and nothing more.
//!
//! Each denial comes after the capability it removes was shown, either with the owner role (so
//! the statement is valid and the denial is the role's doing) or, for what migration 0006 took
//! back, on a database migrated only up to 0005: the naive grants, under which `checkout_app`
//! could change a price or rewrite an order's history. Denials are SQLSTATE 42501.
#![allow(clippy::unwrap_used)]

use keel_testkit::privilege::{
    self, AUDITOR_ROLE, OPERATOR_ROLE, assert_denied, assert_operator_is_narrow,
};
use keel_testkit::{Stack, TestDb};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

/// Runs one statement of this file's own text; the rows it touched.
async fn run(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

/// The migration that tightened checkout_app's grants (prices, history, API keys).
const TIGHTENING: i64 = 6;

/// Places an order for one mug as the app role does: the order, its line, its first history
/// row and its saga. Returns the order's id.
async fn place_order(app: &mut PgConnection) -> Uuid {
    let id = Uuid::new_v4();
    for sql in [
        format!(
            "INSERT INTO orders (id, customer_id, currency, total_minor, state)
             VALUES ('{id}', 'p14', 'EUR', 1200, 'PENDING')"
        ),
        format!(
            "INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price_minor)
             VALUES ('{id}', 0, 'KEEL-MUG', 1, 1200)"
        ),
        format!("INSERT INTO order_history (order_id, state) VALUES ('{id}', 'PENDING')"),
        format!(
            "INSERT INTO sagas (id, order_id, state, payment_token, deadline)
             VALUES ('{id}', '{id}', 'PENDING', 'tok_approve', now() + interval '1 minute')"
        ),
        format!("INSERT INTO saga_steps (saga_id, step, outcome) VALUES ('{id}', 'reserve', 'ok')"),
    ] {
        assert_eq!(run(app, &sql).await.unwrap(), 1, "{sql}");
    }
    id
}

/// What a compromised checkout could do with the grants 0001's default privileges gave it:
/// change prices, rewrite an order's history, mint an API key for any customer.
fn abuses(order: Uuid) -> Vec<String> {
    vec![
        "INSERT INTO api_keys (id, customer_id, key_hash)
         VALUES ('00000000beef', 'anyone', decode(repeat('00', 32), 'hex'))"
            .to_owned(),
        "UPDATE products SET price_minor = 1 WHERE sku = 'KEEL-MUG'".to_owned(),
        // A price can also be changed by replacing the product.
        "INSERT INTO products (sku, name, price_minor, currency) VALUES ('P14-FREE', 'x', 0, 'EUR')"
            .to_owned(),
        "DELETE FROM products WHERE sku = 'P14-FREE'".to_owned(),
        format!("UPDATE orders SET total_minor = 0 WHERE id = '{order}'"),
        format!("UPDATE order_lines SET unit_price_minor = 0 WHERE order_id = '{order}'"),
        format!("UPDATE order_history SET state = 'CONFIRMED' WHERE order_id = '{order}'"),
        format!("UPDATE saga_steps SET outcome = 'skipped' WHERE saga_id = '{order}'"),
        format!("DELETE FROM order_history WHERE order_id = '{order}'"),
        format!("DELETE FROM saga_steps WHERE saga_id = '{order}'"),
    ]
}

#[tokio::test]
async fn before_0006_the_app_role_could_change_prices_and_rewrite_history() {
    // The failing side: each rewrite below succeeds under the old grants.
    let db = TestDb::migrated_before("checkout", &checkout::MIGRATOR, TIGHTENING).await;
    let mut app = connect(&db.app_url()).await;
    let order = place_order(&mut app).await;
    for sql in abuses(order) {
        assert_eq!(run(&mut app, &sql).await.unwrap(), 1, "{sql}");
    }
}

#[tokio::test]
async fn app_role_cannot_change_prices_or_rewrite_history() {
    // The passing side: the same statements, on a database with every migration.
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    let order = place_order(&mut app).await;
    for sql in abuses(order) {
        assert_denied(&sql, run(&mut app, &sql).await);
    }
    for sql in [
        format!("DELETE FROM order_lines WHERE order_id = '{order}'"),
        format!("DELETE FROM orders WHERE id = '{order}'"),
    ] {
        assert_denied(&sql, run(&mut app, &sql).await);
    }
    // The keys now live in the platform's table (0007): no key minted, changed or un-revoked
    // there either.
    for sql in [
        "INSERT INTO customer_api_keys (id, customer_id, key_hash)
         VALUES ('00000000beef', 'anyone', decode(repeat('00', 32), 'hex'))",
        "UPDATE customer_api_keys SET revoked_at = NULL",
        "DELETE FROM customer_api_keys",
    ] {
        assert_denied(sql, run(&mut app, sql).await);
    }

    // What checkout does still works: read the catalogue, read a key (as
    // keel_pg::api_keys::verify does), move an order's state (the columns set_state updates,
    // with the RETURNING it reads), append history.
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(products, 7);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_api_keys")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(keys, 0);
    let moved = format!(
        "UPDATE orders SET state = 'REJECTED', reason = 'out_of_stock', updated_at = now()
          WHERE id = '{order}' RETURNING customer_id, total_minor, currency"
    );
    assert_eq!(run(&mut app, &moved).await.unwrap(), 1);
    let appended = format!(
        "INSERT INTO order_history (order_id, state, reason)
         VALUES ('{order}', 'REJECTED', 'out_of_stock')"
    );
    assert_eq!(run(&mut app, &appended).await.unwrap(), 1);

    // The catalogue is the owner's to change (a migration's).
    let mut owner = connect(&db.owner_url()).await;
    let reprice = "UPDATE products SET price_minor = 1300 WHERE sku = 'KEEL-MUG'";
    assert_eq!(run(&mut owner, reprice).await.unwrap(), 1);
}

#[tokio::test]
async fn app_role_cannot_create_temporary_tables() {
    // The failing side: a database as Postgres makes it, where PUBLIC may create temporary
    // tables (a TestDb with init.sql's revoke undone).
    let defaults = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut admin = connect(&defaults.admin_url()).await;
    run(
        &mut admin,
        &format!(
            r#"GRANT CONNECT, TEMPORARY ON DATABASE "{}" TO PUBLIC"#,
            defaults.name
        ),
    )
    .await
    .unwrap();
    let mut app = connect(&defaults.app_direct_url()).await;
    run(&mut app, "CREATE TEMP TABLE staged (id int)")
        .await
        .unwrap();

    // The passing side: Keel's databases, a test's (TestDb grants as init.sql does) and the
    // real one init.sql made, by both routes.
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let stack = Stack::load();
    for url in [
        db.app_direct_url(),
        db.app_url(),
        format!(
            "postgres://checkout_app:checkout_app_dev@127.0.0.1:{}/keel_checkout",
            stack.pg_port
        ),
        format!(
            "postgres://checkout_app:checkout_app_dev@127.0.0.1:{}/keel_checkout",
            stack.pgbouncer_port
        ),
    ] {
        let mut app = connect(&url).await;
        assert_denied(
            "CREATE TEMP TABLE",
            run(&mut app, "CREATE TEMP TABLE staged (id int)").await,
        );
    }
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
    assert_denied(
        "CREATE TABLE",
        sqlx::query("CREATE TABLE app_cannot (id int)")
            .execute(&mut app)
            .await,
    );
}

#[tokio::test]
async fn app_role_cannot_alter_or_drop_tables() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    for sql in [
        "ALTER TABLE products ADD COLUMN evil text",
        "DROP TABLE products",
        "TRUNCATE products",
    ] {
        assert_denied(sql, sqlx::query(sql).execute(&mut app).await);
    }

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
    let sql = "SELECT * FROM _sqlx_migrations";
    assert_denied(sql, sqlx::query(sql).execute(&mut app).await);
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

#[tokio::test]
async fn auditor_reads_what_keelctl_reads_and_writes_nothing() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    privilege::assert_auditor_reads_only(
        &db,
        &[
            "orders",
            "order_lines",
            "order_history",
            "stock",
            "reservations",
        ],
    )
    .await;
    // Not the customer's payment-method token, nor the API keys' hashes (in the platform's
    // table, or through the previous release's view of it, 0007).
    let mut auditor = connect(&db.auditor_url()).await;
    for sql in [
        "SELECT payment_token FROM sagas",
        "SELECT key_hash FROM customer_api_keys",
        "SELECT key_hash FROM api_keys",
    ] {
        assert_denied(
            &format!("{AUDITOR_ROLE}: {sql}"),
            run(&mut auditor, sql).await,
        );
    }
}

#[tokio::test]
async fn operator_retries_and_issues_api_keys_and_does_nothing_else() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    // The platform's grants (customer_api_keys included: issuing and revoking keys), and the
    // previous release's keelctl's INSERT through 0007's view, until that view is dropped.
    assert_operator_is_narrow(
        &db,
        &[
            "api_keys(id): INSERT",
            "api_keys(customer_id): INSERT",
            "api_keys(key_hash): INSERT",
        ],
    )
    .await;

    // `keelctl api-keys create` as the operator: one INSERT, and no way to read a key's hash
    // back, change a key's customer or delete a key, in the table or through the view.
    let mut operator = connect(&db.operator_url()).await;
    let issued = keel_pg::api_keys::issue(&mut operator, "p14-customer")
        .await
        .unwrap();
    let id = issued.id;
    for sql in [
        "SELECT key_hash FROM customer_api_keys".to_owned(),
        "SELECT * FROM customer_api_keys".to_owned(),
        format!("UPDATE customer_api_keys SET customer_id = 'someone-else' WHERE id = '{id}'"),
        format!("DELETE FROM customer_api_keys WHERE id = '{id}'"),
        "SELECT key_hash FROM api_keys".to_owned(),
        "SELECT * FROM api_keys".to_owned(),
        format!("UPDATE api_keys SET customer_id = 'someone-else' WHERE id = '{id}'"),
        format!("DELETE FROM api_keys WHERE id = '{id}'"),
        "SELECT * FROM orders".to_owned(),
        "UPDATE products SET price_minor = 0".to_owned(),
    ] {
        assert_denied(
            &format!("{OPERATOR_ROLE}: {sql}"),
            run(&mut operator, &sql).await,
        );
    }
}
