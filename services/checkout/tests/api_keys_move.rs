//! Migration 0007: checkout's API keys move from its own `api_keys` (0005) to the platform's
//! `customer_api_keys`, and nobody holding a key notices.
//!
//! What is proven here: every key issued before the move authenticates after it, as the same
//! customer, with its revocation and creation time kept; and during a rollout the previous
//! release still works against the new schema: its instances read keys with their old query,
//! and its keelctl issues keys with its old INSERT, through the view 0007 leaves in the old
//! table's place (which grants nothing more than 0006 did).
#![allow(clippy::unwrap_used)]

use keel_events::CustomerId;
use keel_pg::api_keys::{self, Authenticated, Rejection};
use keel_testkit::TestDb;
use sqlx::{Connection, PgConnection, PgPool};

/// The migration that moves the keys.
const MOVE: i64 = 7;

/// What the previous release's keelctl ran (`keelctl api-keys create`).
const OLD_ISSUE: &str = "INSERT INTO api_keys (id, customer_id, key_hash) VALUES ($1, $2, $3)";
/// What the previous release's checkout ran on every authenticated request.
const OLD_VERIFY: &str = "SELECT customer_id, key_hash, revoked_at IS NOT NULL AS revoked
                            FROM api_keys WHERE id = $1";

/// One key's row: id, customer, hash, created and revoked (as text, to compare exactly).
type KeyRow = (String, String, Vec<u8>, String, Option<String>);

/// A key in the `keel_<id>_<secret>` format with a fixed id.
fn key(id: &str, secret_digit: char) -> String {
    format!("keel_{id}_{}", secret_digit.to_string().repeat(64))
}

async fn old_issue(conn: &mut PgConnection, id: &str, customer: &str, key: &str) {
    sqlx::query(OLD_ISSUE)
        .bind(id)
        .bind(customer)
        .bind(&api_keys::hash(key)[..])
        .execute(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn keys_issued_before_the_move_keep_working_after_it() {
    // Checkout as the previous release left it: keys in its own api_keys, one revoked.
    let db = TestDb::migrated_before("checkout", &checkout::MIGRATOR, MOVE).await;
    let (live, revoked) = (key("0000000000a1", 'b'), key("0000000000a2", 'c'));
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    old_issue(&mut operator, "0000000000a1", "cus_old", &live).await;
    old_issue(&mut operator, "0000000000a2", "cus_old", &revoked).await;
    let mut admin = PgConnection::connect(&db.admin_url()).await.unwrap();
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now() - interval '1 day' WHERE id = '0000000000a2'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let before: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, customer_id, key_hash, created_at::text, revoked_at::text
           FROM api_keys ORDER BY id",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();

    // `checkout migrate` of this release.
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    keel_pg::schema::apply(&mut owner, &checkout::MIGRATOR)
        .await
        .unwrap();

    let after: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, customer_id, key_hash, created_at::text, revoked_at::text
           FROM customer_api_keys ORDER BY id",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(after, before, "every row moved as it was");
    let table: Option<String> =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'api_keys'")
            .fetch_optional(&mut admin)
            .await
            .unwrap();
    assert_eq!(
        table.as_deref(),
        Some("v"),
        "api_keys is a view now, not a table"
    );

    // As this release's checkout verifies: the platform's table, through pgbouncer.
    let app = PgPool::connect(&db.app_url()).await.unwrap();
    assert_eq!(
        api_keys::verify(&app, &live).await.unwrap(),
        Ok(Authenticated {
            customer: CustomerId::from("cus_old"),
            key_id: "0000000000a1".to_owned(),
        })
    );
    assert_eq!(
        api_keys::verify(&app, &revoked).await.unwrap(),
        Err(Rejection::Revoked)
    );
    app.close().await;
}

#[tokio::test]
async fn the_previous_release_reads_and_issues_keys_during_a_rollout() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    let app = PgPool::connect(&db.app_url()).await.unwrap();

    // An old instance finds a key this release's keelctl issued.
    let new = api_keys::issue(&mut operator, "cus_new").await.unwrap();
    let (customer, hash, revoked): (String, Vec<u8>, bool) = sqlx::query_as(OLD_VERIFY)
        .bind(&new.id)
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(
        (customer.as_str(), hash, revoked),
        ("cus_new", api_keys::hash(new.expose()).to_vec(), false)
    );

    // A key the old keelctl issues lands in the platform's table, and this release accepts it.
    let old = key("0000000000b1", 'd');
    old_issue(&mut operator, "0000000000b1", "cus_old", &old).await;
    assert_eq!(
        api_keys::verify(&app, &old)
            .await
            .unwrap()
            .map(|a| a.customer),
        Ok(CustomerId::from("cus_old"))
    );
    app.close().await;
}
