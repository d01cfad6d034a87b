//! Retention of billing's webhook receipts (P14, P32): purged by the platform's retention run
//! through `purge_webhook_receipts` (migration 0004), while `billing_app` still cannot delete
//! or change a receipt itself, and no receipt younger than 7 days can go whatever is asked.
//!
//! The failing side is the one 0004 avoids: the only other way to purge as the runtime role
//! would be to give DELETE back, and then a recent receipt (the replay lock of a webhook that
//! may still be redelivered) could be erased too; `least_privilege.rs` shows what that allows.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_pg::retention::{Policy, Retention, RetentionConfig};
use keel_testkit::TestDb;
use keel_testkit::privilege::{OPERATOR_ROLE, assert_denied};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

const DAY: Duration = Duration::from_secs(86_400);

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}

async fn receipts(pool: &PgPool) -> Vec<String> {
    let mut ids: Vec<String> = sqlx::query_scalar("SELECT webhook_id FROM webhook_receipts")
        .fetch_all(pool)
        .await
        .unwrap();
    ids.sort();
    ids
}

/// Receipts as billing writes them, backdated: `(webhook_id, days ago)`.
async fn received(pool: &PgPool, rows: &[(&str, i32)]) {
    for (id, days) in rows {
        sqlx::query(
            "INSERT INTO webhook_receipts (webhook_id, event_type, received_at)
             VALUES ($1, 'payment.captured', now() - make_interval(days => $2))",
        )
        .bind(id)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// The policy billing registers (`lib.rs`), at `webhook.receipts_kept`'s default.
fn billing_policy() -> Policy {
    Policy::function("webhook_receipts", "purge_webhook_receipts", 90 * DAY)
}

#[tokio::test]
async fn old_receipts_are_purged_through_the_function_and_recent_ones_stay() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let app = pool(&db.app_url()).await;
    received(
        &app,
        &[
            ("msg_100d", 100),
            ("msg_91d", 91),
            ("msg_30d", 30),
            ("msg_1d", 1),
        ],
    )
    .await;

    let mut retention = Retention::new(app.clone(), &RetentionConfig::default());
    retention.add(billing_policy()).unwrap();
    let report = retention.run_once().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.rows("webhook_receipts"), 2);
    assert_eq!(receipts(&app).await, ["msg_1d", "msg_30d"]);

    // Counted like the platform's tables.
    let counted = retention.refresh_row_counts().await.unwrap();
    assert!(
        counted
            .iter()
            .any(|r| r.table == "webhook_receipts" && r.state == "all" && r.rows == 2),
        "{counted:?}"
    );
}

#[tokio::test]
async fn the_function_purges_in_batches() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let app = pool(&db.app_url()).await;
    let old: Vec<String> = (0..7).map(|i| format!("msg_old_{i}")).collect();
    let rows: Vec<(&str, i32)> = old.iter().map(|id| (id.as_str(), 100)).collect();
    received(&app, &rows).await;
    received(&app, &[("msg_new", 1)]).await;
    let config = RetentionConfig {
        batch: 3,
        max_batches: 2,
        ..RetentionConfig::default()
    };
    let mut retention = Retention::new(app.clone(), &config);
    retention.add(billing_policy()).unwrap();
    let policy = retention.policies().last().unwrap().clone();

    let first = retention.purge(&policy).await.unwrap();
    assert_eq!((first.rows, first.batches, first.more_left), (6, 2, true));
    let second = retention.purge(&policy).await.unwrap();
    assert_eq!(
        (second.rows, second.batches, second.more_left),
        (1, 1, false)
    );
    assert_eq!(receipts(&app).await, ["msg_new"]);
}

#[tokio::test]
async fn billing_app_may_purge_old_receipts_but_never_delete_or_rewrite_one_itself() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let app = pool(&db.app_url()).await;
    received(&app, &[("msg_100d", 100), ("msg_3d", 3)]).await;
    let mut conn = PgConnection::connect(&db.app_url()).await.unwrap();

    // Directly: still denied (0003), old receipt or new.
    for sql in [
        "DELETE FROM webhook_receipts WHERE webhook_id = 'msg_100d'",
        "DELETE FROM webhook_receipts WHERE webhook_id = 'msg_3d'",
        "UPDATE webhook_receipts SET received_at = now() - interval '1 year'",
        "TRUNCATE webhook_receipts",
    ] {
        assert_denied(
            sql,
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await,
        );
    }

    // Through the function, asking for more than it allows: refused, nothing deleted.
    for (older_than, max_rows) in [("1 hour", 100), ("6 days", 100), ("100 days", 0)] {
        let refused =
            sqlx::query_scalar::<_, i64>("SELECT purge_webhook_receipts($1::text::interval, $2)")
                .bind(older_than)
                .bind(max_rows)
                .fetch_one(&mut conn)
                .await
                .expect_err("the function refuses");
        let code = refused
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default()
            .to_string();
        assert_eq!(code, "22023", "{older_than}, {max_rows}: {refused}");
    }
    assert_eq!(receipts(&app).await, ["msg_100d", "msg_3d"]);

    // Nor can billing_app redefine it (it owns nothing), and roles that may connect for other
    // reasons cannot call it: EXECUTE was taken from PUBLIC.
    assert_denied(
        "replace the function",
        sqlx::raw_sql(
            "CREATE OR REPLACE FUNCTION purge_webhook_receipts(older_than interval, max_rows integer)
             RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint'",
        )
        .execute(&mut conn)
        .await,
    );
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    assert_denied(
        &format!("{OPERATOR_ROLE} calls the purge"),
        sqlx::raw_sql("SELECT purge_webhook_receipts(interval '30 days', 10)")
            .execute(&mut operator)
            .await,
    );

    // Within its bounds it deletes exactly the old receipt.
    let deleted: i64 = sqlx::query_scalar("SELECT purge_webhook_receipts(interval '30 days', 10)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(receipts(&app).await, ["msg_3d"]);
}

#[test]
fn receipts_are_kept_at_least_a_week() {
    let config: billing::Config = keel_testkit::config(billing::DEFAULT_CONFIG, &[]);
    assert_eq!(config.webhook.receipts_kept, 90 * DAY);
    let env = [
        ("KEEL_PROFILE", "dev"),
        ("KEEL_WEBHOOK__RECEIPTS_KEPT", "6d"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let e = keel_config::load_from::<billing::Config, _>(billing::DEFAULT_CONFIG, env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("webhook.receipts_kept"), "{e}");
}
