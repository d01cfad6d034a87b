//! `keelctl api-keys create --customer <id>` as an operator runs it: the real binary, against
//! a real checkout database per test, connected as `keel_operator` (its one grant on
//! `api_keys` is the INSERT this command makes).
//!
//! What is proven here: the key is printed once, alone on stdout, in the `keel_<id>_<secret>`
//! format; the database keeps its id, its customer and SHA-256 of the key, and nothing from
//! which the key could be read back; every run draws a new key; an unusable customer id is a
//! usage error that writes nothing; the operator cannot read the hashes it wrote.
//!
//! That such a key then authenticates is proven where checkout runs: checkout's tests
//! (`services/checkout/tests/auth.rs`) and the end-to-end journeys issue every key they use
//! through this same `keelctl::api_keys::create`, and checkout verifies it against this row.
//! keelctl links no service; the checkout database here is built from checkout's migrations,
//! the table contract both sides share.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::process::{Command, Output};

use keel_testkit::TestDb;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

/// checkout's migrations: the `api_keys` table is the contract, not checkout's code.
static CHECKOUT_MIGRATIONS: sqlx::migrate::Migrator =
    sqlx::migrate!("../../services/checkout/migrations");

/// Runs `keelctl api-keys create ...` against `db` as the operator.
fn create(db: &TestDb, args: &[&str]) -> Output {
    let mut cmd = Command::new(KEELCTL);
    cmd.args(["api-keys", "create"]).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.env("KEEL_PROFILE", "dev")
        .env("KEEL_CHECKOUT__OPERATOR_URL", db.operator_url());
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl api-keys create {args:?} -> {:?}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn admin(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.admin_url()).await.unwrap()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn create_prints_one_key_once_and_stores_only_its_hash() {
    let db = TestDb::create("checkout", &CHECKOUT_MIGRATIONS).await;
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
    let (row_id, customer, hash, revoked): (String, String, Vec<u8>, bool) =
        sqlx::query_as("SELECT id, customer_id, key_hash, revoked_at IS NOT NULL FROM api_keys")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (row_id.as_str(), customer.as_str(), revoked),
        (id, "cus_42", false)
    );
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    let whole_row: String = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!whole_row.contains(&secret[..16]), "{whole_row}");

    // Shown once means: the next run prints another key, never this one again.
    let again = create(&db, &["--customer", "cus_42"]);
    let second = String::from_utf8(again.stdout).unwrap();
    assert_ne!(second.trim(), key);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE customer_id = 'cus_42'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn json_output_has_the_id_the_customer_and_the_key() {
    let db = TestDb::create("checkout", &CHECKOUT_MIGRATIONS).await;
    let out = create(&db, &["--customer", "cus 7", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["customer_id"], "cus 7");
    let key = v["key"].as_str().unwrap();
    assert_eq!(
        key.strip_prefix("keel_").and_then(|k| k.split('_').next()),
        v["id"].as_str()
    );
}

#[tokio::test]
async fn an_unusable_customer_id_is_a_usage_error_that_writes_nothing() {
    let db = TestDb::create("checkout", &CHECKOUT_MIGRATIONS).await;
    let long = "c".repeat(201);
    for customer in ["", "   ", "line\nbreak", long.as_str()] {
        let out = create(&db, &["--customer", customer]);
        assert_eq!(out.status.code(), Some(64), "{customer:?}");
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--customer"));
    }
    // And no customer at all is clap's own usage error.
    assert_eq!(create(&db, &[]).status.code(), Some(64));
    let mut conn = admin(&db).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn the_operator_can_issue_a_key_but_not_read_one_back() {
    let db = TestDb::create("checkout", &CHECKOUT_MIGRATIONS).await;
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    let issued = keelctl::api_keys::create(&mut operator, "cus_1")
        .await
        .unwrap();
    assert!(issued.expose().starts_with("keel_"));
    keel_testkit::privilege::assert_denied(
        "keel_operator reads key hashes",
        sqlx::query_scalar::<_, Vec<u8>>("SELECT key_hash FROM api_keys")
            .fetch_all(&mut operator)
            .await,
    );
}
