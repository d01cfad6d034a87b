//! Retention comes with `Service::postgres`: every service purges the platform's tables and
//! exports their row counts with no code of its own, and adds a table of its own with one
//! `retain` call. Against real Postgres through pgbouncer, with a real `Service` run.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_http::HttpConfig;
use keel_pg::retention::{Policy, RETENTION_QUEUE};
use keel_service::{Service, ServiceError, ShutdownConfig};
use keel_telemetry::TelemetryConfig;
use keel_testkit::{TestDb, eventually};
use sqlx::{Connection, PgConnection, PgPool};

fn service() -> Service {
    let http = HttpConfig {
        host: [127, 0, 0, 1].into(),
        port: 0,
        body_limit_bytes: 1024,
        request_timeout: Duration::from_secs(2),
        readiness_timeout: Duration::from_millis(500),
        limits: keel_http::ServerLimits::default(),
    };
    let bound = Duration::from_secs(5);
    let shutdown = ShutdownConfig {
        drain_delay: Duration::ZERO,
        grace_period: bound,
        consumers: bound,
        workers: bound,
        relays: bound,
        broker: bound,
        pools: bound,
    };
    let telemetry = TelemetryConfig {
        log_level: "info".to_owned(),
        lag_probe_interval: Duration::from_millis(50),
        max_runtime_lag: Duration::from_secs(1),
    };
    Service::new("retention-test", &http, &shutdown, &telemetry)
}

/// `[database]` for `db`, `retention` its `[database.retention]` section (absent: defaults).
fn database(db: &TestDb, retention: Option<serde_json::Value>) -> keel_pg::DatabaseConfig {
    let mut config = serde_json::json!({
        "url": db.app_url(),
        "migrate_url": db.owner_url(),
        "max_connections": 4,
        "acquire_timeout": "2s",
    });
    if let Some(retention) = retention {
        config["retention"] = retention;
    }
    serde_json::from_value(config).unwrap()
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_purges_platform_and_own_tables_and_exports_row_counts() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    // A table of the service's own, with just SELECT and DELETE for the runtime role.
    sqlx::raw_sql(
        "CREATE TABLE receipts (id text PRIMARY KEY, received_at timestamptz NOT NULL);
         GRANT SELECT, INSERT, DELETE ON receipts TO platform_app;",
    )
    .execute(&mut owner)
    .await
    .unwrap();

    let mut svc = service();
    // The defaults but a short slot, so runs come within the test.
    let config = database(
        &db,
        Some(
            serde_json::json!({ "interval": "200ms", "poll_interval": "20ms",
                                 "row_count_interval": "1s" }),
        ),
    );
    let pool = svc.postgres(&config).unwrap();
    svc.retain(Policy::older_than(
        "receipts",
        "received_at",
        Duration::from_secs(90 * 86_400),
    ))
    .unwrap();
    let addr = svc.http(axum::Router::new()).await.unwrap();

    sqlx::raw_sql(
        "INSERT INTO inbox (consumer, message_id, received_at) VALUES
           ('c', 'old', now() - interval '31 days'), ('c', 'new', now());
         INSERT INTO receipts VALUES ('old', now() - interval '91 days'), ('new', now());",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(svc.run(async move {
        let _ = stopped.await;
    }));

    eventually(
        Duration::from_secs(20),
        "old rows purged by a run",
        || async {
            let left = scalar(
                &pool,
                "SELECT (SELECT count(*) FROM inbox) + (SELECT count(*) FROM receipts)",
            )
            .await;
            (left == 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM inbox WHERE message_id = 'new'").await,
        1
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM receipts WHERE id = 'new'").await,
        1
    );
    // The rows go inside the job's handler; the job is marked succeeded only after it
    // returns, so its state is waited for (bounded), not read at the moment the rows went.
    let runs = eventually(Duration::from_secs(10), "the purge job succeeded", || async {
        let runs = scalar(
            &pool,
            &format!(
                "SELECT count(*) FROM jobs WHERE queue = '{RETENTION_QUEUE}' AND state = 'succeeded'"
            ),
        )
        .await;
        (runs >= 1).then_some(runs)
    })
    .await;
    assert!(runs >= 1, "the purge ran as a job: {runs}");

    // The row counts are on /metrics: the platform's tables and the service's own.
    let metrics = eventually(Duration::from_secs(10), "row counts exported", || async {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (text.contains(r#"table_rows{table="receipts",state="all"} 1"#)
            && text.contains(r#"table_rows{table="inbox",state="all"} 1"#))
        .then_some(text)
    })
    .await;
    for series in [
        r#"table_rows{table="outbox",state="unsent"} 0"#,
        r#"table_rows{table="outbox",state="parked"} 0"#,
        r#"table_rows{table="outbox",state="sent"} 0"#,
        r#"table_rows{table="jobs",state="failed"} 0"#,
        r#"table_rows{table="idempotency_keys",state="all"} 0"#,
        r#"retention_purged_rows_total{table="inbox",state="all"} 1"#,
        r#"retention_purged_rows_total{table="receipts",state="all"} 1"#,
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }

    stop.send(()).unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(drained, keel_service::Drained::Clean);
}

#[tokio::test]
async fn retention_is_on_by_default_and_can_be_turned_off() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let mut on = service();
    on.postgres(&database(&db, None)).unwrap();
    assert!(format!("{on:?}").contains("\"retention\""), "{on:?}");

    let mut off = service();
    off.postgres(&database(
        &db,
        Some(serde_json::json!({ "enabled": false })),
    ))
    .unwrap();
    assert!(!format!("{off:?}").contains("\"retention\""), "{off:?}");
    // Adding a table while it is off is accepted and does nothing.
    off.retain(Policy::older_than(
        "receipts",
        "received_at",
        Duration::from_secs(60),
    ))
    .unwrap();
}

#[tokio::test]
async fn a_policy_needs_the_database_and_plain_names() {
    let mut svc = service();
    let policy = Policy::older_than("receipts", "received_at", Duration::from_secs(60));
    assert!(matches!(
        svc.retain(policy),
        Err(ServiceError::NoDatabase { table: "receipts" })
    ));
    let bad = Policy::older_than("receipts; DROP TABLE jobs", "received_at", Duration::ZERO);
    assert!(matches!(svc.retain(bad), Err(ServiceError::Retention(_))));
}

#[tokio::test]
async fn a_bad_retention_key_names_itself() {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let config = database(&db, Some(serde_json::json!({ "inbox_age": "1h" })));
    let e = keel_config::Validate::validate(&config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("database.retention.inbox_age"), "{e}");
    let typo = serde_json::from_value::<keel_pg::DatabaseConfig>(serde_json::json!({
        "url": db.app_url(), "migrate_url": db.owner_url(), "max_connections": 1,
        "acquire_timeout": "1s", "retention": { "inbox_days": 30 },
    }));
    assert!(typo.is_err());
}
