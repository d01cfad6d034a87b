//! Email delivery: every customer notification is emailed to the customer, over SMTP, through
//! a job on keel-pg's Postgres queue (P08). The delivery half of P33: a fire-and-forget send
//! from the consumer would lose the email whenever the mail server is down, and a send inside
//! the consumer's transaction would hold a database transaction open for a network call.
//!
//! The path of one email:
//! 1. The consumer ([`crate::journey_events`]) records the notification and, in the **same
//!    transaction**, [`enqueue`]s an `email.send` job whose payload is the notification id
//!    ([`job`]). Both exist, or neither.
//! 2. The [`Mailer`], a job worker registered with `keel_service` (stopped in the `workers`
//!    stage: no new claims, jobs in flight finish or hand their lease back), claims the job,
//!    loads the notification, renders it ([`message`]) and sends it ([`send`]).
//! 3. Once the server answered `250` to the end of DATA, it records `emailed_at` on the
//!    notification, and only then answers [`Outcome::Done`], which completes the job.
//!
//! **At-least-once email.** A crash (or a lost database) between the server's `250` and
//! `emailed_at` being committed sends the email again on the next attempt. Exactly-once is
//! not on offer over SMTP: the server's acceptance and our record of it cannot commit
//! together. The retried email carries the same Message-ID (the notification id), so the
//! receiving side can drop it. A job run again *after* `emailed_at` was recorded (its
//! completion was lost) sees the column and completes without sending.
//!
//! Failures, by kind (`email_failures_total{kind}`; logged once, here):
//! - transient (no connection, timeout, `4xx`, the database unreachable): the job is retried
//!   after the queue's backoff (`email.retry_base` doubling up to `email.retry_max`, full
//!   jitter) until `email.max_attempts`, then `failed`; a missing mail server only delays
//!   mail, it never stops the service and does not gate readiness;
//! - permanent (`5xx`, a customer id that is no safe address, a payload or notification that
//!   cannot be read): the job is `failed` at once with the reason, which `keelctl jobs` shows
//!   and `keelctl jobs retry` re-queues.
//!
//! Recipients are derived, `<customer_id>@<email.recipient_domain>` ([`address`]): Keel's
//! journey carries no email address. A real system would look the address up.
//!
//! Must not break: the job is completed only after the server accepted the email; and the
//! enqueue stays inside the consumer's transaction.

pub mod address;
pub mod job;
pub mod message;
pub mod send;

use std::sync::Arc;

use keel_pg::jobs::{self, Job, Outcome, WorkerConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::job::{AnyEmailJob, EndpointDisabledJob};
use self::send::{SendError, Smtp};
use crate::config::EmailConfig;
use crate::customer_notifications::store;

pub use self::job::{EMAIL_QUEUE, EmailJob, enqueue, enqueue_endpoint_disabled};

/// The email worker: cheap to clone, shared by the worker's tasks.
#[derive(Debug, Clone)]
pub struct Mailer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    smtp: Smtp,
    config: EmailConfig,
}

impl Mailer {
    /// A mailer sending through `config.smtp_host:config.smtp_port`. Connects to nothing yet.
    pub fn new(pool: PgPool, config: EmailConfig) -> Self {
        let smtp = Smtp::new(&config.smtp_host, config.smtp_port, config.timeout);
        Self {
            inner: Arc::new(Inner { pool, smtp, config }),
        }
    }

    /// Runs email jobs until `stop`, at most `email.concurrency` at once (P05: the bound on
    /// connections to the mail server), then lets the jobs in flight finish (the caller
    /// bounds that wait).
    pub async fn run_worker(self, worker: String, stop: CancellationToken) {
        let c = &self.inner.config;
        let config = WorkerConfig {
            queue: EMAIL_QUEUE.to_owned(),
            worker,
            concurrency: c.concurrency,
            lease: c.lease,
            poll_interval: c.poll_interval,
        };
        let pool = self.inner.pool.clone();
        jobs::run_worker(pool, config, stop, move |job| {
            let mailer = self.clone();
            async move { mailer.handle(job).await }
        })
        .await;
    }

    /// The job handler (see the module docs). Public so tests and tools can run a claimed job
    /// by hand.
    pub async fn handle(&self, job: Job) -> Outcome {
        // The job id is the notification id (see `job`).
        let span = tracing::info_span!("email", job_id = %job.id, attempt = job.attempts);
        async move {
            match self.deliver(&job).await {
                Ok(Delivered::Now) => {
                    metrics::counter!("email_sent_total").increment(1);
                    tracing::info!("email accepted by the SMTP server");
                    Outcome::Done
                }
                Ok(Delivered::Before) => {
                    tracing::info!("email was sent before; not again");
                    Outcome::Done
                }
                Err(e) => self.failed(&job, &e),
            }
        }
        .instrument(span)
        .await
    }

    /// One attempt: load, render, send, record.
    async fn deliver(&self, job: &Job) -> Result<Delivered, SendError> {
        let id =
            match AnyEmailJob::from_job(job).map_err(|e| SendError::Permanent(e.to_string()))? {
                AnyEmailJob::Notification(EmailJob { notification_id }) => notification_id,
                AnyEmailJob::EndpointDisabled(EndpointDisabledJob {
                    disabled_endpoint_id,
                }) => return self.tell_owner(disabled_endpoint_id).await,
            };
        let c = &self.inner.config;
        let row = store::for_email(&self.inner.pool, id)
            .await
            .map_err(database)?
            .ok_or_else(|| SendError::Permanent(format!("notification {id} does not exist")))?;
        if row.emailed_at.is_some() {
            return Ok(Delivered::Before);
        }
        let email = message::render(&row.notification, &c.from, &c.recipient_domain)
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        self.inner.smtp.send(email).await?;
        // Accepted. From here until this commits, a crash means a second email (module docs).
        store::mark_emailed(&self.inner.pool, id)
            .await
            .map_err(database)?;
        Ok(Delivered::Now)
    }

    /// The email telling a webhook endpoint's owner that it was disabled (P33): the same
    /// at-least-once send, recorded in `webhook_endpoints.owner_told_at`.
    async fn tell_owner(&self, endpoint: uuid::Uuid) -> Result<Delivered, SendError> {
        let c = &self.inner.config;
        let row = crate::webhooks::endpoints::for_owner_email(&self.inner.pool, endpoint)
            .await
            .map_err(database)?
            .ok_or_else(|| SendError::Permanent(format!("endpoint {endpoint} does not exist")))?;
        if row.owner_told_at.is_some() {
            return Ok(Delivered::Before);
        }
        let email = message::render_endpoint_disabled(&row, &c.from, &c.recipient_domain)
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        self.inner.smtp.send(email).await?;
        crate::webhooks::endpoints::mark_owner_told(&self.inner.pool, endpoint)
            .await
            .map_err(database)?;
        Ok(Delivered::Now)
    }

    /// What a failed attempt does to its job: retry after the backoff while attempts are
    /// left, fail it otherwise.
    fn failed(&self, job: &Job, error: &SendError) -> Outcome {
        let c = &self.inner.config;
        metrics::counter!("email_failures_total", "kind" => error.kind()).increment(1);
        match error {
            SendError::Transient(reason) if job.attempts < c.max_attempts => {
                let delay = jobs::backoff(job.attempts, c.retry_base, c.retry_max);
                tracing::warn!(%reason, attempt = job.attempts, max_attempts = c.max_attempts,
                    retry_in = ?delay, "email not sent; will retry");
                Outcome::RetryAfter(delay, reason.clone())
            }
            SendError::Transient(reason) => {
                tracing::error!(%reason, attempt = job.attempts,
                    "email not sent; email.max_attempts reached, job failed");
                Outcome::Fail(format!(
                    "{reason} (gave up after {} attempts: email.max_attempts)",
                    job.attempts
                ))
            }
            SendError::Permanent(reason) => {
                tracing::error!(%reason, "email cannot be sent; job failed");
                Outcome::Fail(reason.clone())
            }
        }
    }
}

/// How an attempt ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// The server accepted it just now.
    Now,
    /// `emailed_at` was already set: an earlier attempt sent it and its completion was lost.
    Before,
}

/// A database error while delivering: transient (the job's retries cover an outage; a bug
/// that always fails ends `failed` after `email.max_attempts`).
fn database(e: sqlx::Error) -> SendError {
    SendError::Transient(format!("database: {e}"))
}

/// This process's name in the job queue's `locked_by` (host, pid, random suffix), as
/// checkout names its saga worker.
pub fn worker_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "notification".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}
