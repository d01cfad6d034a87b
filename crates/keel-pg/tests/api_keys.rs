//! Customer API keys (`keel_pg::api_keys`) against a real database: what the operator issues,
//! a service verifies, through pgbouncer as its app role, and the operator revokes.
//!
//! What is proven here: an issued key verifies as its customer; an unknown id, a wrong secret
//! and a revoked key are each refused for their own reason (the metric's label), and a token
//! that is not a key never reaches the database; only SHA-256 of the key is stored; revoking
//! is per key, takes effect on the next verification and never moves an earlier revocation.
//! The roles' grants on the table are pinned in `schema.rs` and keel-testkit's privilege
//! checks.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_events::CustomerId;
use keel_pg::PLATFORM_MIGRATOR;
use keel_pg::api_keys::{self, ApiKeyError, Authenticated, Rejection};
use keel_testkit::TestDb;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

/// `key` with its secret's last digit changed: a real id, a wrong secret.
fn wrong_secret(key: &str) -> String {
    let mut k = key.to_owned();
    let last = if k.ends_with('0') { "1" } else { "0" };
    k.replace_range(k.len() - 1.., last);
    k
}

#[tokio::test]
async fn an_issued_key_verifies_as_its_customer_and_nothing_else_does() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut operator = connect(&db.operator_url()).await;
    let issued = api_keys::issue(&mut operator, "cus_42").await.unwrap();
    let key = issued.expose();
    assert_eq!(issued.customer_id, "cus_42");
    assert_eq!(
        key.strip_prefix("keel_").map(|k| &k[..12]),
        Some(&*issued.id)
    );
    // The key is not in its Debug form: only the id is.
    assert!(!format!("{issued:?}").contains(key), "{issued:?}");

    // As a service verifies: its app role, through pgbouncer.
    let app = PgPool::connect(&db.app_url()).await.unwrap();
    assert_eq!(
        api_keys::verify(&app, key).await.unwrap(),
        Ok(Authenticated {
            customer: CustomerId::from("cus_42"),
            key_id: issued.id.clone(),
        })
    );
    let unknown = format!("keel_0123456789ab_{}", "a".repeat(64));
    for (token, why) in [
        (unknown.as_str(), Rejection::Unknown),
        (&wrong_secret(key), Rejection::WrongSecret),
        (&key.to_uppercase(), Rejection::Malformed),
        ("sk_live_123", Rejection::Malformed),
    ] {
        assert_eq!(
            api_keys::verify(&app, token).await.unwrap(),
            Err(why),
            "{why:?}"
        );
    }

    // Stored: the id, the customer and SHA-256 of the whole key; nothing the key could be read
    // back from.
    let mut admin = connect(&db.admin_url()).await;
    let (hash, whole_row): (Vec<u8>, String) = sqlx::query_as(
        "SELECT key_hash, row_to_json(k)::text FROM customer_api_keys k WHERE id = $1",
    )
    .bind(&issued.id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    let secret = key.rsplit('_').next().unwrap();
    assert!(!whole_row.contains(&secret[..16]), "{whole_row}");
    app.close().await;
}

#[tokio::test]
async fn a_token_that_is_not_a_key_never_reaches_the_database() {
    // A pool whose every query would fail: nothing listens on port 1.
    let unreachable = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody:nothing@127.0.0.1:1/none")
        .unwrap();
    for token in ["", "sk_live_123", "keel_0123456789ab_short"] {
        assert_eq!(
            api_keys::verify(&unreachable, token).await.unwrap(),
            Err(Rejection::Malformed)
        );
    }
    // A well-formed key does query, and the failure is the database's, not a rejection.
    let key = format!("keel_0123456789ab_{}", "a".repeat(64));
    assert!(api_keys::verify(&unreachable, &key).await.is_err());
}

async fn revoked_at(admin: &mut PgConnection, id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT revoked_at FROM customer_api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_revoked_key_is_refused_from_the_next_verification_and_only_that_key() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut operator = connect(&db.operator_url()).await;
    let revoked = api_keys::issue(&mut operator, "cus_revoked").await.unwrap();
    let other = api_keys::issue(&mut operator, "cus_revoked").await.unwrap();
    let app = PgPool::connect(&db.app_url()).await.unwrap();
    assert!(
        api_keys::verify(&app, revoked.expose())
            .await
            .unwrap()
            .is_ok()
    );

    assert!(api_keys::revoke(&mut operator, &revoked.id).await.unwrap());
    assert_eq!(
        api_keys::verify(&app, revoked.expose()).await.unwrap(),
        Err(Rejection::Revoked)
    );
    // Revoking is per key: the customer's other key still verifies.
    assert!(
        api_keys::verify(&app, other.expose())
            .await
            .unwrap()
            .is_ok()
    );

    // A second revocation changes nothing (the first one's time stays), an unknown id is
    // reported as such, and what is not an id is refused before any query.
    let mut admin = connect(&db.admin_url()).await;
    let first = revoked_at(&mut admin, &revoked.id).await;
    assert!(first.is_some());
    assert!(!api_keys::revoke(&mut operator, &revoked.id).await.unwrap());
    assert_eq!(revoked_at(&mut admin, &revoked.id).await, first);
    assert!(
        !api_keys::revoke(&mut operator, "0123456789ab")
            .await
            .unwrap()
    );
    assert!(matches!(
        api_keys::revoke(&mut operator, revoked.expose()).await,
        Err(ApiKeyError::InvalidId)
    ));
    app.close().await;
}

#[tokio::test]
async fn an_unusable_customer_id_writes_nothing() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut operator = connect(&db.operator_url()).await;
    let long = "c".repeat(201);
    for customer in ["", "   ", "line\nbreak", long.as_str()] {
        assert!(
            matches!(
                api_keys::issue(&mut operator, customer).await,
                Err(ApiKeyError::InvalidCustomer(_))
            ),
            "{customer:?}"
        );
    }
    let mut admin = connect(&db.admin_url()).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_api_keys")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(count, 0);
}
