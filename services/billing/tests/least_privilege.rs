//! P14 for billing: `billing_app` is confined to DML on `keel_billing`, its ledger and webhook
//! receipts are append-only, and the operator tool's roles hold exactly their grants.
//!
//! The append-only proof first shows the failure on a database migrated only up to 0002 (the
//! naive grants, where a webhook receipt could be deleted and the webhook then applied again),
//! then its denial with every migration. Denials are SQLSTATE 42501.
#![allow(clippy::unwrap_used)]

use keel_testkit::TestDb;
use keel_testkit::privilege::{
    assert_app_role_is_confined, assert_auditor_reads_only, assert_denied,
    assert_operator_is_narrow,
};
use sqlx::{Connection, PgConnection};

/// The migration that made webhook receipts append-only.
const TIGHTENING: i64 = 3;

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn run(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

/// A ledger event and a webhook receipt, inserted as billing inserts them (the receipt with
/// the same `ON CONFLICT DO NOTHING` that makes a replay a no-op).
async fn record(app: &mut PgConnection) {
    for sql in [
        "INSERT INTO payment_events (stream_id, version, event_type, data)
         VALUES ('00000000-0000-0000-0000-000000000014', 1, 'PaymentAuthorized', '{}')",
        "INSERT INTO webhook_receipts (webhook_id, event_type) VALUES ('msg_p14', 'capture')
         ON CONFLICT DO NOTHING",
    ] {
        assert_eq!(run(app, sql).await.unwrap(), 1, "{sql}");
    }
}

const ERASE_RECEIPT: [&str; 2] = [
    "UPDATE webhook_receipts SET webhook_id = 'msg_other' WHERE webhook_id = 'msg_p14'",
    "DELETE FROM webhook_receipts WHERE webhook_id = 'msg_other'",
];

#[tokio::test]
async fn billing_app_role_is_confined_to_dml_on_its_own_database() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    assert_app_role_is_confined(&db, &["keel_checkout", "keel_notification"]).await;
}

#[tokio::test]
async fn before_0003_a_webhook_receipt_could_be_erased() {
    // The failing side: with the receipt gone, a replayed webhook would find no row and
    // apply its effect a second time.
    let db = TestDb::migrated_before("billing", &billing::MIGRATOR, TIGHTENING).await;
    let mut app = connect(&db.app_url()).await;
    record(&mut app).await;
    for sql in ERASE_RECEIPT {
        assert_eq!(run(&mut app, sql).await.unwrap(), 1, "{sql}");
    }
}

#[tokio::test]
async fn ledger_events_and_webhook_receipts_are_append_only() {
    // The passing side: billing still appends both; nothing rewrites or erases either.
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    record(&mut app).await;
    for sql in ERASE_RECEIPT.into_iter().chain([
        "UPDATE payment_events SET event_type = 'PaymentVoided'",
        "DELETE FROM payment_events",
        "TRUNCATE payment_events",
        "TRUNCATE webhook_receipts",
    ]) {
        assert_denied(sql, run(&mut app, sql).await);
    }
    // The projection is billing's to rewrite (rebuild-projections deletes it and replays).
    assert_eq!(run(&mut app, "DELETE FROM payments").await.unwrap(), 0);
}

#[tokio::test]
async fn auditor_reads_the_payments_and_ledger_and_writes_nothing() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    assert_auditor_reads_only(&db, &["payments", "payment_events"]).await;
}

#[tokio::test]
async fn operator_can_retry_and_nothing_else() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    assert_operator_is_narrow(&db, &[]).await;
}
