//! `keelctl api-keys create --customer <id> [--service <name>]` and `keelctl api-keys revoke
//! <id>` as an operator runs them: the real binary, against real databases per test, connected
//! as `keel_operator` (its grants on `customer_api_keys` are the INSERT and the UPDATE these
//! commands make).
//!
//! What is proven here: the key is printed once, alone on stdout, in the `keel_<id>_<secret>`
//! format; the database keeps its id, its customer and SHA-256 of the key, and nothing from
//! which the key could be read back; every run draws a new key; an unusable customer id is a
//! usage error that writes nothing; a key goes to the named service's database only (checkout's
//! by default), so no other service accepts it; a revoked key no longer verifies; the operator
//! cannot read the hashes it wrote.
//!
//! That such a key then authenticates on a service's API is proven where the service runs:
//! checkout's tests (`services/checkout/tests/auth.rs`) issue every key they use through the
//! same `keel_pg::api_keys::issue` this command runs, and the platform's extractor verifies it
//! (`crates/keel-service/tests/api_keys.rs`). The databases here have the platform's tables
//! only: `customer_api_keys` is the platform's, the same in every service's database.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::process::{Command, Output};

use keel_pg::PLATFORM_MIGRATOR;
use keel_pg::api_keys::Rejection;
use keel_testkit::TestDb;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

/// A database with the platform's tables, as every service's has.
async fn service_db() -> TestDb {
    TestDb::create("platform", &PLATFORM_MIGRATOR).await
}

/// Runs `keelctl api-keys <args>` with checkout's operator URL pointing at `checkout` and,
/// when given, notification's at `notification`.
fn keelctl(checkout: &TestDb, notification: Option<&TestDb>, args: &[&str]) -> Output {
    let mut cmd = Command::new(KEELCTL);
    cmd.arg("api-keys").args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.env("KEEL_PROFILE", "dev")
        .env("KEEL_CHECKOUT__OPERATOR_URL", checkout.operator_url());
    if let Some(db) = notification {
        cmd.env("KEEL_NOTIFICATION__OPERATOR_URL", db.operator_url());
    }
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl api-keys {args:?} -> {:?}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `keelctl api-keys create ...` against `db` as checkout's database.
fn create(db: &TestDb, args: &[&str]) -> Output {
    let args: Vec<&str> = ["create"].iter().chain(args).copied().collect();
    keelctl(db, None, &args)
}

async fn admin(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.admin_url()).await.unwrap()
}

async fn count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM customer_api_keys")
        .fetch_one(&mut admin(db).await)
        .await
        .unwrap()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn create_prints_one_key_once_and_stores_only_its_hash() {
    let db = service_db().await;
    let out = create(&db, &["--customer", "cus_42"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();

    // Stdout is the key and nothing else (`KEY=$(keelctl api-keys create ...)`).
    let key = stdout.trim_end_matches('\n');
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (id, secret) = key
        .strip_prefix("keel_")
        .and_then(|k| k.split_once('_'))
        .unwrap_or_else(|| panic!("not a keel_<id>_<secret> key: {key}"));
    assert!(is_lower_hex(id, 12) && is_lower_hex(secret, 64), "{key}");
    // Stderr names the key by id and says it is shown once; it never repeats the key.
    assert!(stderr.contains(id) && stderr.contains("once"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");

    // The row: id, customer, SHA-256 of the whole key; nothing else of the key anywhere in it.
    let mut conn = admin(&db).await;
    let (row_id, customer, hash, revoked): (String, String, Vec<u8>, bool) = sqlx::query_as(
        "SELECT id, customer_id, key_hash, revoked_at IS NOT NULL FROM customer_api_keys",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (row_id.as_str(), customer.as_str(), revoked),
        (id, "cus_42", false)
    );
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    let whole_row: String =
        sqlx::query_scalar("SELECT row_to_json(k)::text FROM customer_api_keys k")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(!whole_row.contains(&secret[..16]), "{whole_row}");

    // Shown once means: the next run prints another key, never this one again.
    let again = create(&db, &["--customer", "cus_42"]);
    let second = String::from_utf8(again.stdout).unwrap();
    assert_ne!(second.trim(), key);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM customer_api_keys WHERE customer_id = 'cus_42'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn json_output_has_the_id_the_customer_the_service_and_the_key() {
    let db = service_db().await;
    let out = create(&db, &["--customer", "cus 7", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["customer_id"], "cus 7");
    assert_eq!(v["service"], "checkout");
    let key = v["key"].as_str().unwrap();
    assert_eq!(
        key.strip_prefix("keel_").and_then(|k| k.split('_').next()),
        v["id"].as_str()
    );
}

#[tokio::test]
async fn an_unusable_customer_id_is_a_usage_error_that_writes_nothing() {
    let db = service_db().await;
    let long = "c".repeat(201);
    for customer in ["", "   ", "line\nbreak", long.as_str()] {
        let out = create(&db, &["--customer", customer]);
        assert_eq!(out.status.code(), Some(64), "{customer:?}");
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--customer"));
    }
    // And no customer at all is clap's own usage error, as is a service that is not
    // registered with a database.
    assert_eq!(create(&db, &[]).status.code(), Some(64));
    for service in ["nosuch", "psp-sim"] {
        let out = create(&db, &["--customer", "cus_1", "--service", service]);
        assert_eq!(out.status.code(), Some(64), "{service}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(service));
    }
    assert_eq!(count(&db).await, 0);
}

#[tokio::test]
async fn a_key_is_issued_in_the_named_services_database_and_valid_there_only() {
    let (checkout, notification) = (service_db().await, service_db().await);
    let out = keelctl(
        &checkout,
        Some(&notification),
        &["create", "--customer", "cus_9", "--service", "notification"],
    );
    assert_eq!(out.status.code(), Some(0));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(String::from_utf8_lossy(&out.stderr).contains("notification"));
    assert_eq!((count(&notification).await, count(&checkout).await), (1, 0));

    // As each service verifies: notification accepts it, checkout has never heard of it.
    let verify = |db: &TestDb| {
        let (url, key) = (db.app_url(), key.clone());
        async move {
            let pool = PgPool::connect(&url).await.unwrap();
            let outcome = keel_pg::api_keys::verify(&pool, &key).await.unwrap();
            pool.close().await;
            outcome.map(|caller| caller.customer.to_string())
        }
    };
    assert_eq!(verify(&notification).await, Ok("cus_9".to_owned()));
    assert_eq!(verify(&checkout).await, Err(Rejection::Unknown));
}

#[tokio::test]
async fn revoke_refuses_the_key_from_then_on_and_says_when_there_was_nothing_to_revoke() {
    let db = service_db().await;
    let out = create(&db, &["--customer", "cus_r"]);
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let id = key.split('_').nth(1).unwrap().to_owned();
    let app = PgPool::connect(&db.app_url()).await.unwrap();
    assert!(keel_pg::api_keys::verify(&app, &key).await.unwrap().is_ok());

    let out = keelctl(&db, None, &["revoke", &id]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    assert_eq!(
        keel_pg::api_keys::verify(&app, &key).await.unwrap(),
        Err(Rejection::Revoked)
    );

    // Again, or an id no key has: nothing to revoke, exit 1. Not an id at all: usage, 64.
    let again = keelctl(&db, None, &["revoke", &id, "--output", "json"]);
    assert_eq!(again.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["revoked"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    assert_eq!(
        keelctl(&db, None, &["revoke", "0123456789ab"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        keelctl(&db, None, &["revoke", &key]).status.code(),
        Some(64)
    );
    app.close().await;
}

#[tokio::test]
async fn the_operator_can_issue_a_key_but_not_read_one_back() {
    let db = service_db().await;
    // keelctl's own entry point for harnesses that hold a URL (the end-to-end journeys).
    let issued = keelctl::api_keys::issue(&db.operator_url(), "cus_1")
        .await
        .unwrap();
    assert!(issued.expose().starts_with("keel_"));
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    keel_testkit::privilege::assert_denied(
        "keel_operator reads key hashes",
        sqlx::query_scalar::<_, Vec<u8>>("SELECT key_hash FROM customer_api_keys")
            .fetch_all(&mut operator)
            .await,
    );
}
