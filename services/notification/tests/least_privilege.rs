//! P14 for notification: `notification_app` is confined to DML on `keel_notification`, what a
//! customer was told is append-only, and the operator tool's roles hold exactly their grants.
//!
//! The append-only proof first shows the failure on a database migrated only up to 0002 (the
//! naive grants, where a notification could be rewritten or erased), then its denial with
//! every migration. Denials are SQLSTATE 42501.
#![allow(clippy::unwrap_used)]

use keel_testkit::TestDb;
use keel_testkit::privilege::{
    assert_app_role_is_confined, assert_auditor_reads_only, assert_denied,
    assert_operator_is_narrow,
};
use sqlx::{Connection, PgConnection};

/// The migration that made notifications append-only.
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

const RECORD: &str = "INSERT INTO notifications
    (id, order_id, customer_id, kind, message, source_message_id)
    VALUES (gen_random_uuid(), gen_random_uuid(), 'p14', 'CONFIRMED', 'Your order is confirmed.',
            'msg_p14')";

const REWRITE: [&str; 2] = [
    "UPDATE notifications SET kind = 'REJECTED', message = 'Never mind.'",
    "DELETE FROM notifications",
];

#[tokio::test]
async fn notification_app_role_is_confined_to_dml_on_its_own_database() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    assert_app_role_is_confined(&db, &["keel_checkout", "keel_billing"]).await;
}

#[tokio::test]
async fn before_0003_a_notification_could_be_rewritten() {
    // The failing side.
    let db = TestDb::migrated_before("notification", &notification::MIGRATOR, TIGHTENING).await;
    let mut app = connect(&db.app_url()).await;
    assert_eq!(run(&mut app, RECORD).await.unwrap(), 1);
    for sql in REWRITE {
        assert_eq!(run(&mut app, sql).await.unwrap(), 1, "{sql}");
    }
}

#[tokio::test]
async fn notifications_are_append_only() {
    // The passing side: the consumer still records; nothing rewrites or erases a record.
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    assert_eq!(run(&mut app, RECORD).await.unwrap(), 1);
    for sql in REWRITE.into_iter().chain(["TRUNCATE notifications"]) {
        assert_denied(sql, run(&mut app, sql).await);
    }
}

#[tokio::test]
async fn auditor_reads_notifications_and_writes_nothing() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    assert_auditor_reads_only(&db, &["notifications"]).await;
}

#[tokio::test]
async fn operator_can_retry_and_nothing_else() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    assert_operator_is_narrow(&db, &[]).await;
}
