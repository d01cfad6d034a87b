//! Email delivery (P33 on P08's job queue) against the real stack: a database and a RabbitMQ
//! vhost per test, notification started in-process on port 0, and an SMTP server of its own
//! (`keel_smtp_sink`, in-process on port 0) that keeps what it accepted.
//!
//! What is proved:
//! - a final order event becomes exactly one email, to the customer's derived address, with
//!   the notification's text and its id as Message-ID;
//! - the same event delivered five times is still one email (the inbox dedupes the event, and
//!   the email job is enqueued in the notification's transaction);
//! - the failure first: with no SMTP server the email is not lost and does not crash anything,
//!   its job is retried with backoff (attempts grow, the next run is scheduled); then, with a
//!   server, it arrives, once;
//! - what retrying cannot fix fails the job at once, with the reason, and sends nothing: a
//!   customer id that is no safe address, and a `5xx` from the server;
//! - least privilege holds: the runtime role may stamp `emailed_at` and still rewrite nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use chrono::{DateTime, Utc};
use keel_smtp_sink::{RunningSink, SinkConfig, SmtpSink};
use keel_testkit::privilege::assert_denied;
use keel_testkit::{TestBroker, TestDb, TestVhost, eventually};
use sqlx::{Connection as _, PgConnection};
use support::{
    QUEUE, Running, WAIT, admin, closed_port, metric, publish_confirmed, service_config,
};
use uuid::Uuid;

/// notification on this test's database and vhost, sending mail to `127.0.0.1:smtp_port`.
async fn start(db: &TestDb, vhost: &TestVhost, smtp_port: u16) -> Running {
    Running::start_with(service_config(db, vhost, smtp_port, &[])).await
}

/// A sink on an ephemeral loopback port.
async fn sink() -> RunningSink {
    SmtpSink::start(SinkConfig::ephemeral()).await.unwrap()
}

/// The `email.send` job as `keelctl jobs` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    state: String,
    attempts: i32,
    run_at: DateTime<Utc>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
}

/// The test's email jobs (one database per test, so all of them).
async fn email_jobs(db: &TestDb) -> Vec<JobRow> {
    let mut conn = admin(db).await;
    let rows = sqlx::query_as::<_, JobRow>(
        "SELECT id, state, attempts, run_at, last_error, created_at
           FROM jobs WHERE queue = 'email.send' ORDER BY created_at",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    rows
}

/// Waits until the test's one email job is in `state`, and returns it.
async fn job_in_state(db: &TestDb, state: &str) -> JobRow {
    eventually(WAIT, &format!("the email job is {state}"), || async {
        let jobs = email_jobs(db).await;
        assert!(jobs.len() <= 1, "one email job per notification: {jobs:?}");
        jobs.into_iter().find(|j| j.state == state)
    })
    .await
}

/// (notification id, emailed_at) of the test's one notification.
async fn notification_row(db: &TestDb) -> (Uuid, Option<DateTime<Utc>>) {
    let mut conn = admin(db).await;
    let row = sqlx::query_as("SELECT id, emailed_at FROM notifications")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    row
}

/// Messages of `queue` this process acked (the consumer's P06 counter).
fn acked(queue: &str) -> f64 {
    metric(&format!(
        "amqp_messages_total{{queue=\"{queue}\",outcome=\"acked\"}} "
    ))
}

#[tokio::test]
async fn a_final_order_event_emails_the_customer_once() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let sink = sink().await;
    let app = start(&db, &vhost, sink.smtp_addr().port()).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    let order = publish_confirmed(&broker, "cust-42", 1).await;

    let job = job_in_state(&db, "succeeded").await;
    let (notification_id, emailed_at) = notification_row(&db).await;
    // Completed only after the server accepted it: the email is in the sink now.
    let mail = sink.messages();
    assert_eq!(mail.len(), 1, "exactly one email");
    let email = &mail[0];
    assert_eq!(email.to(), ["cust-42@customers.keel.test"]);
    assert_eq!(email.from(), "notifications@keel.test");
    assert_eq!(email.subject(), format!("Your order {order}: confirmed"));
    assert_eq!(
        email.text().trim_end(),
        format!("Your order {order} is confirmed.")
    );
    assert_eq!(
        email.header("Message-ID").as_deref(),
        Some(format!("<{notification_id}@keel.test>").as_str()),
        "a retried send is recognisable by its Message-ID"
    );
    assert_eq!(
        job.id, notification_id,
        "the job is found from the notification"
    );
    assert_eq!(job.attempts, 1);
    let emailed_at = emailed_at.expect("emailed_at recorded");
    assert!(emailed_at >= job.created_at);
    assert_eq!(metric("email_sent_total "), 1.0);

    app.stop().await;
    sink.shutdown().await;
}

#[tokio::test]
async fn an_event_delivered_five_times_sends_one_email() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let sink = sink().await;
    let app = start(&db, &vhost, sink.smtp_addr().port()).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    publish_confirmed(&broker, "cust-42", 5).await;

    eventually(WAIT, "all five copies acked", || async {
        (acked(QUEUE) >= 5.0).then_some(())
    })
    .await;
    job_in_state(&db, "succeeded").await;
    // Every copy has been handled and the one job has finished: nothing else can send.
    app.stop().await;
    assert_eq!(email_jobs(&db).await.len(), 1, "one job");
    assert_eq!(sink.messages().len(), 1, "one email for five deliveries");
    sink.shutdown().await;
}

#[tokio::test]
async fn with_the_smtp_server_down_the_email_is_retried_then_sent_once() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;

    // The failure: nothing listens where notification sends mail.
    let app = start(&db, &vhost, closed_port()).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;
    publish_confirmed(&broker, "cust-42", 1).await;

    let retried = eventually(WAIT, "the email job is retried", || async {
        let job = email_jobs(&db).await.into_iter().next()?;
        (job.attempts >= 3 && job.state == "queued").then_some(job)
    })
    .await;
    let reason = retried.last_error.clone().unwrap_or_default();
    assert!(reason.contains("SMTP 127.0.0.1:"), "{reason}");
    // Enqueued with run_at = created_at (one transaction's now()); each retry moved it on.
    assert!(
        retried.run_at > retried.created_at,
        "the next attempt is scheduled after a backoff"
    );
    assert_eq!(notification_row(&db).await.1, None, "not emailed");
    assert!(metric("email_failures_total{kind=\"transient\"} ") >= 3.0);
    assert_eq!(metric("email_sent_total "), 0.0);
    app.stop().await;

    // The pattern: the job waited in the queue; with a server, the email arrives, once.
    let sink = sink().await;
    let app = start(&db, &vhost, sink.smtp_addr().port()).await;
    let done = job_in_state(&db, "succeeded").await;
    assert!(done.attempts > retried.attempts, "{done:?}");
    assert!(
        notification_row(&db).await.1.is_some(),
        "emailed_at recorded"
    );
    app.stop().await;
    let mail = sink.messages();
    assert_eq!(mail.len(), 1, "one email, not one per attempt");
    assert_eq!(mail[0].to(), ["cust-42@customers.keel.test"]);
    sink.shutdown().await;
}

#[tokio::test]
async fn an_unsafe_customer_id_fails_the_job_and_sends_nothing() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let sink = sink().await;
    let app = start(&db, &vhost, sink.smtp_addr().port()).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    // An id that, used as a local part, would send the email somewhere else.
    publish_confirmed(&broker, "victim@evil.example", 1).await;

    let failed = job_in_state(&db, "failed").await;
    assert_eq!(failed.attempts, 1, "no retry for what a retry cannot fix");
    let reason = failed.last_error.unwrap_or_default();
    assert!(reason.contains("not a safe email local part"), "{reason}");
    // The outcome is recorded after the handler returned: a send would be in the sink.
    assert!(sink.messages().is_empty(), "no email");
    assert_eq!(notification_row(&db).await.1, None);
    assert_eq!(metric("email_failures_total{kind=\"permanent\"} "), 1.0);

    app.stop().await;
    sink.shutdown().await;
}

#[tokio::test]
async fn a_5xx_reply_fails_the_job_permanently() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    // A server that refuses every email for good: 552, message too large.
    let sink = SmtpSink::start(SinkConfig {
        max_message_bytes: 16,
        ..SinkConfig::ephemeral()
    })
    .await
    .unwrap();
    let app = start(&db, &vhost, sink.smtp_addr().port()).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    publish_confirmed(&broker, "cust-42", 1).await;

    let failed = job_in_state(&db, "failed").await;
    assert_eq!(failed.attempts, 1);
    let reason = failed.last_error.unwrap_or_default();
    assert!(reason.contains("permanent error (552)"), "{reason}");
    assert!(sink.messages().is_empty());
    assert_eq!(notification_row(&db).await.1, None);

    app.stop().await;
    sink.shutdown().await;
}

#[tokio::test]
async fn the_app_role_may_stamp_emailed_at_and_rewrite_nothing() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO notifications (id, order_id, customer_id, kind, message, source_message_id)
         VALUES ($1, gen_random_uuid(), 'cust-42', 'CONFIRMED', 'Your order is confirmed.', 'm1')",
    )
    .bind(id)
    .execute(&mut app)
    .await
    .unwrap();
    let stamped = sqlx::query("UPDATE notifications SET emailed_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut app)
        .await
        .unwrap();
    assert_eq!(stamped.rows_affected(), 1);
    for sql in [
        "UPDATE notifications SET message = 'Never mind.'",
        "UPDATE notifications SET emailed_at = now(), kind = 'REJECTED'",
        "DELETE FROM notifications",
    ] {
        assert_denied(sql, sqlx::query(sql).execute(&mut app).await);
    }
    let _ = app.close().await;
}
