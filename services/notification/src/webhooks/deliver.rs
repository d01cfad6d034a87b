//! The delivery worker: runs `webhook.deliver` jobs, each one attempt of one delivery, signed
//! and sent through the SSRF-guarded [`WebhookClient`] (P33), with each endpoint isolated from
//! the others (P25 breaker, P23 bulkhead).
//!
//! **Isolation, the lesson.** All endpoints share one worker: `webhooks.concurrency` slots.
//! A naive worker takes deliveries in order and waits for each: one dead endpoint (every
//! attempt waits for its timeout) or slow one (answers after seconds) with a backlog fills
//! every slot, and a healthy endpoint's delivery waits behind them
//! (`tests/webhook_isolation.rs` shows it). Two guards per endpoint, kept in this process:
//! - a **bulkhead**, `webhooks.per_endpoint_concurrency` permits: a slow endpoint holds at
//!   most its share of the slots, however long its backlog;
//! - a **circuit breaker** (`keel_resilience::breaker`): once most recent attempts to an
//!   endpoint failed, its deliveries are not attempted at all until the breaker lets a probe
//!   through, instead of waiting for a timeout each.
//!
//! An endpoint whose permits are all taken or whose breaker refuses is *skipped at claim*:
//! its jobs stay in the queue unclaimed (`keel_pg::jobs::Skip`, the endpoint id being a field
//! of the job's payload). Guarding only after the claim is not enough: claimed and given back,
//! a slow endpoint's backlog came round every `busy_retry` ahead of everyone's new deliveries,
//! and a healthy endpoint's latency went from 23 ms to 166 ms (the proof's first version).
//! When a breaker opens, the endpoint's queued deliveries are also moved past the open period
//! (`jobs::postpone_group`), so claims do not walk past a dead endpoint's growing backlog.
//! A claim can still take more of one endpoint's deliveries than it has permits (they were
//! free when the claim began); the extra ones come back after `webhooks.busy_retry`, or when
//! the breaker is due. No attempt at the endpoint is counted while a delivery waits on a guard
//! (its job's attempts do count: `deliveries::JOB_MAX_ATTEMPTS` is their backstop).
//!
//! At scale: skipped jobs are still read by each claim (they are due, only filtered). An
//! endpoint whose backlog outgrows what it can take (slower than its deliveries arrive) makes
//! every claim walk past that backlog; past some ten thousand rows, a queue per endpoint (one
//! runnable job per endpoint, draining its deliveries) is the next design.
//!
//! **One attempt.** Load the delivery and its endpoint; skip it if it is no longer pending
//! or the endpoint was deleted or disabled; sign the stored body (`webhook-id` = the delivery
//! id, the same on every attempt, so receivers dedupe; `webhook-timestamp` = now); POST it;
//! any 2xx is success, anything else (another status, no answer within the limits) a failed
//! attempt; a destination that became forbidden fails the delivery at once. The attempt, the
//! delivery's new state and the endpoint's failing run are recorded together
//! ([`deliveries::record`]); the next attempt follows `webhooks.retry_schedule`.
//!
//! Guards are per process: with several replicas, each has its own breaker and bulkhead per
//! endpoint, so an endpoint sees up to `replicas × per_endpoint_concurrency` attempts at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use http::{HeaderMap, HeaderName, HeaderValue};
use keel_http::client::{BuildError, WebhookClient};
use keel_pg::jobs::{self, Job, Outcome, WorkerConfig};
use keel_resilience::breaker::Breaker;
use keel_webhooks::SigningKey;
use rand::Rng;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;
use uuid::Uuid;

use super::deliveries::{self, Attempt, DeliveryJob, Due, Verdict, WEBHOOK_QUEUE};
use crate::config::WebhooksConfig;

/// The payload field that names a delivery's endpoint: the group the worker skips while the
/// endpoint is busy or its breaker open.
const ENDPOINT_FIELD: &str = "endpoint_id";

/// Pause before retrying a job whose delivery could not be loaded or recorded (the database
/// is unreachable); no attempt at the endpoint is counted for it.
const DATABASE_RETRY: Duration = Duration::from_secs(2);

/// The webhook worker: cheap to clone, shared by the worker's tasks.
#[derive(Debug, Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    client: WebhookClient,
    config: WebhooksConfig,
    guards: Mutex<HashMap<Uuid, Arc<Guard>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One endpoint's guards in this process.
struct Guard {
    breaker: Breaker,
    slots: Arc<Semaphore>,
}

/// Why a job came back without an attempt.
enum Deferred {
    Busy,
    Open(Duration),
}

impl Deliverer {
    /// A worker delivering under `config` (its egress policy and limits). Connects to nothing.
    pub fn new(pool: PgPool, config: WebhooksConfig) -> Result<Self, BuildError> {
        let client = WebhookClient::new(config.egress.clone(), config.limits.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                client,
                config,
                guards: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Runs delivery jobs until `stop`, at most `webhooks.concurrency` at once, then lets the
    /// attempts in flight finish (the caller bounds that wait).
    pub async fn run_worker(self, worker: String, stop: CancellationToken) {
        let c = &self.inner.config;
        let config = WorkerConfig {
            queue: WEBHOOK_QUEUE.to_owned(),
            worker,
            concurrency: c.concurrency,
            lease: c.lease,
            poll_interval: c.poll_interval,
        };
        let pool = self.inner.pool.clone();
        let skip = self.clone();
        jobs::run_worker_skipping(
            pool,
            config,
            stop,
            Some((ENDPOINT_FIELD, move || skip.unavailable_endpoints())),
            move |job| {
                let deliverer = self.clone();
                async move { deliverer.handle(job).await }
            },
        )
        .await;
    }

    /// The endpoints whose deliveries the worker leaves in the queue for now: those with all
    /// their permits in use, or whose breaker refuses (asked before every claim). Their jobs
    /// stay queued without taking a claim, so they never come round ahead of the deliveries
    /// of other endpoints (`keel_pg::jobs::Skip`).
    fn unavailable_endpoints(&self) -> Vec<String> {
        let guards = self
            .inner
            .guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guards
            .iter()
            .filter(|(_, g)| g.slots.available_permits() == 0 || g.breaker.refusing_for().is_some())
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// The job handler (module docs).
    pub async fn handle(&self, job: Job) -> Outcome {
        let Ok(DeliveryJob { delivery_id, .. }) = DeliveryJob::deserialize(&job.payload) else {
            return Outcome::Fail("not a webhook delivery job".to_owned());
        };
        let span = tracing::info_span!("webhook", %delivery_id, job_attempt = job.attempts);
        async move {
            let due = match deliveries::load(&self.inner.pool, delivery_id).await {
                Ok(Some(due)) => due,
                Ok(None) => return Outcome::Fail(format!("delivery {delivery_id} does not exist")),
                Err(e) => return Outcome::RetryAfter(DATABASE_RETRY, format!("database: {e}")),
            };
            if due.state != "pending" {
                return Outcome::Done;
            }
            if job.attempts >= job.max_attempts {
                // The job's last run (deferrals count too): end the delivery with it rather
                // than leave it pending behind a failed job.
                let why = "job attempts exhausted";
                return match deliveries::abandon(&self.inner.pool, due.id, why).await {
                    Ok(()) => Outcome::Fail(format!("{why}; delivery failed")),
                    Err(e) => Outcome::RetryAfter(DATABASE_RETRY, format!("database: {e}")),
                };
            }
            if due.endpoint_gone {
                let why = "endpoint deleted or disabled";
                return match deliveries::abandon(&self.inner.pool, due.id, why).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::RetryAfter(DATABASE_RETRY, format!("database: {e}")),
                };
            }
            self.attempt(&due).await
        }
        .instrument(span)
        .await
    }

    /// One attempt of `due`, through its endpoint's guards.
    async fn attempt(&self, due: &Due) -> Outcome {
        let c = &self.inner.config;
        let class = if due.failing_since.is_some() {
            "failing"
        } else {
            "healthy"
        };
        let guard = self.guard(due.endpoint_id);
        let deferred = match guard.slots.clone().try_acquire_owned() {
            Err(_) => Err(Deferred::Busy),
            Ok(slot) => match guard.breaker.try_acquire() {
                Err(open) => Err(Deferred::Open(open.retry_after)),
                Ok(permit) => Ok((slot, permit)),
            },
        };
        let (slot, permit) = match deferred {
            Ok(held) => held,
            Err(Deferred::Busy) => {
                count(class, "deferred_busy");
                let wait = c.busy_retry.mul_f64(rand::rng().random_range(0.5..=1.5));
                return Outcome::RetryAfter(wait, "endpoint busy (bulkhead)".to_owned());
            }
            Err(Deferred::Open(left)) => {
                count(class, "deferred_open");
                // Spread the waiting deliveries over a short while after the breaker's time,
                // so they do not all come back in one poll.
                let wait = left + left.mul_f64(rand::rng().random_range(0.0..=0.2));
                return Outcome::RetryAfter(wait, "endpoint circuit open".to_owned());
            }
        };
        let started_at = Utc::now();
        let (attempt, verdict) = match self.send(due).await {
            Ok(status) if (200..300).contains(&status) => {
                permit.success();
                (attempt(started_at, Some(status), None), Verdict::Succeeded)
            }
            Ok(status) => {
                permit.failure();
                let error = format!("HTTP {status}");
                (
                    attempt(started_at, Some(status), Some(error)),
                    self.next(due),
                )
            }
            Err(Failure::Permanent(error)) => {
                // The destination, not the endpoint's health: says nothing to the breaker.
                drop(permit);
                (attempt(started_at, None, Some(error)), Verdict::Failed)
            }
            Err(Failure::Transient(error)) => {
                permit.failure();
                (attempt(started_at, None, Some(error)), self.next(due))
            }
        };
        drop(slot);
        if let Some(open) = guard.breaker.refusing_for() {
            // The breaker is open (this failure may have opened it): move the endpoint's
            // backlog past the open period, so claims stop walking past it meanwhile.
            self.postpone(due.endpoint_id, open).await;
        }
        metrics::histogram!("webhook_attempt_duration_seconds", "class" => class)
            .record(attempt.duration.as_secs_f64());
        count(
            class,
            if verdict == Verdict::Succeeded {
                "succeeded"
            } else {
                "failed"
            },
        );
        let recorded =
            match deliveries::record(&self.inner.pool, due, &attempt, verdict, c.disable_after)
                .await
            {
                Ok(r) => r,
                // The attempt happened but is not recorded: the job comes back and the next
                // attempt carries the same webhook-id (at-least-once; receivers dedupe).
                Err(e) => return Outcome::RetryAfter(DATABASE_RETRY, format!("database: {e}")),
            };
        if !recorded.recorded {
            // Another worker recorded this attempt number, or the delivery moved on (a lost
            // lease, a disabled endpoint): come back and read where it stands.
            return Outcome::RetryAfter(DATABASE_RETRY, "delivery changed meanwhile".to_owned());
        }
        if recorded.disabled {
            metrics::counter!("webhook_endpoints_disabled_total").increment(1);
            tracing::warn!(endpoint_id = %due.endpoint_id, "webhook endpoint disabled: failing for webhooks.disable_after; owner emailed");
        }
        match verdict {
            Verdict::Succeeded => Outcome::Done,
            Verdict::Failed => {
                tracing::warn!(error = ?attempt.error, attempts = due.attempts + 1, "webhook delivery failed for good");
                Outcome::Done
            }
            Verdict::Retry(pause) => {
                tracing::info!(error = ?attempt.error, attempt = due.attempts + 1, retry_in = ?pause, "webhook attempt failed; will retry");
                Outcome::RetryAfter(pause, attempt.error.unwrap_or_default())
            }
        }
    }

    /// Moves endpoint `endpoint`'s queued deliveries `by` from now (best effort: a failure
    /// only leaves them due, where claims skip them).
    async fn postpone(&self, endpoint: Uuid, by: Duration) {
        let group = endpoint.to_string();
        let moved = match self.inner.pool.acquire().await {
            Ok(mut conn) => {
                jobs::postpone_group(&mut conn, WEBHOOK_QUEUE, ENDPOINT_FIELD, &group, by).await
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = moved {
            tracing::warn!(endpoint_id = %endpoint, error = %e,
                "could not postpone an open endpoint's deliveries");
        }
    }

    /// After a failed attempt: another after the schedule's pause, unless the schedule is over.
    fn next(&self, due: &Due) -> Verdict {
        match self.inner.config.retry_schedule.after(due.attempts + 1) {
            Some(pause) => Verdict::Retry(pause),
            None => Verdict::Failed,
        }
    }

    /// Signs and POSTs the stored body; the answer's status.
    async fn send(&self, due: &Due) -> Result<u16, Failure> {
        let url = Url::parse(&due.url).map_err(|e| Failure::Permanent(format!("URL: {e}")))?;
        let key = SigningKey::parse(&due.secret)
            .map_err(|e| Failure::Permanent(format!("signing secret: {e}")))?;
        let msg_id = due.id.to_string();
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let signed = keel_webhooks::send::signed_headers(
            &key,
            &msg_id,
            keel_webhooks::unix_now(),
            due.body.as_bytes(),
        );
        for (name, value) in signed {
            let value = HeaderValue::try_from(value)
                .map_err(|e| Failure::Permanent(format!("header: {e}")))?;
            headers.insert(HeaderName::from_static(name), value);
        }
        match self
            .inner
            .client
            .post(&url, headers, due.body.clone())
            .await
        {
            Ok(answer) => Ok(answer.status.as_u16()),
            Err(e) if e.is_permanent() => Err(Failure::Permanent(chain(&e))),
            Err(e) => Err(Failure::Transient(chain(&e))),
        }
    }

    /// The endpoint's guards, created on first use. Past `max_tracked_endpoints`, the guards
    /// of idle endpoints with a closed breaker are forgotten (nothing is lost: a new one
    /// starts closed and empty, as they were).
    fn guard(&self, endpoint: Uuid) -> Arc<Guard> {
        let c = &self.inner.config;
        let mut guards = self
            .inner
            .guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(guard) = guards.get(&endpoint) {
            return Arc::clone(guard);
        }
        if guards.len() >= c.max_tracked_endpoints {
            // Kept: guards in use, and breakers still refusing (forgetting one would let its
            // endpoint's backlog through at once).
            guards.retain(|_, g| {
                g.breaker.refusing_for().is_some()
                    || g.slots.available_permits() < c.per_endpoint_concurrency
            });
        }
        // Validated with the configuration (config::WebhooksConfig::validate).
        let breaker = match Breaker::new(c.breaker.breaker_config()) {
            Ok(b) => b,
            Err(e) => unreachable!("webhooks.breaker was validated at start: {e}"),
        };
        breaker.on_transition(|_, to| {
            metrics::counter!("webhook_breaker_transitions_total", "to" => to.as_str())
                .increment(1);
        });
        let guard = Arc::new(Guard {
            breaker,
            slots: Arc::new(Semaphore::new(c.per_endpoint_concurrency)),
        });
        guards.insert(endpoint, Arc::clone(&guard));
        metrics::gauge!("webhook_tracked_endpoints").set(guards.len() as f64);
        guard
    }
}

/// How an attempt failed.
enum Failure {
    /// Another attempt cannot help (bad URL or secret, forbidden destination).
    Permanent(String),
    Transient(String),
}

fn attempt(
    started_at: chrono::DateTime<Utc>,
    status: Option<u16>,
    error: Option<String>,
) -> Attempt {
    Attempt {
        started_at,
        duration: (Utc::now() - started_at).to_std().unwrap_or_default(),
        status_code: status,
        error,
    }
}

/// An error and its sources, one line (`could not connect: … : Connection refused`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `webhook_deliveries_total{class, outcome}`: per endpoint class (`healthy`: its last attempt
/// succeeded; `failing`: in a failing run), attempts that `succeeded` or `failed`, and jobs
/// `deferred_busy` (bulkhead) or `deferred_open` (breaker) without an attempt.
fn count(class: &'static str, outcome: &'static str) {
    metrics::counter!("webhook_deliveries_total", "class" => class, "outcome" => outcome)
        .increment(1);
}
