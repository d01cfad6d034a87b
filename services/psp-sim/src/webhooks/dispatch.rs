//! The webhook sender: takes deliveries off the queue and attempts each until a 2xx, its
//! attempt budget, or shutdown (the sending side of P32, retried like P16's client calls).
//!
//! Each attempt is signed afresh for its own `webhook-timestamp` with `keel_webhooks`, over
//! the same body bytes; between attempts the sender waits [`retry_delay`] — capped exponential
//! backoff with jitter, so webhooks that failed together (billing restarting) do not all come
//! back at the same instant.
//!
//! Must not break: at most `webhook.max_concurrent` deliveries run at once, and a job waits
//! on the bounded queue (where a full queue refuses captures), never in this loop; on stop,
//! every queued or running delivery ends at its next await and is marked abandoned.

use keel_resilience::BackoffPolicy;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keel_webhooks::{ID_HEADER, SIGNATURE_HEADER, SigningKey, TIMESTAMP_HEADER};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::queue::{Job, Records};
use super::{AttemptRecord, DeliveryStatus, WebhookConfig, WebhookError};

/// What a delivery ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Failed,
    Abandoned,
}

/// Everything one delivery needs, shared by the concurrent deliveries.
#[derive(Debug)]
pub(super) struct Dispatcher {
    records: Arc<Records>,
    client: reqwest::Client,
    url: url::Url,
    key: SigningKey,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
}

impl Dispatcher {
    pub(super) fn new(config: &WebhookConfig, records: Arc<Records>) -> Result<Self, WebhookError> {
        let key = config.signing_key()?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            // A receiver redirecting a signed POST elsewhere is a misconfiguration to see, not
            // to follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keel-psp-sim/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            records,
            client,
            url: config.url.clone(),
            key,
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff,
            max_attempts: config.max_attempts,
        })
    }
}

/// The sender: takes jobs off the queue, runs up to `max_concurrent` deliveries, and on stop
/// abandons what is left.
pub(super) async fn run(
    dispatcher: Dispatcher,
    mut rx: mpsc::Receiver<Job>,
    max_concurrent: usize,
    stop: CancellationToken,
) {
    let dispatcher = Arc::new(dispatcher);
    let slots = Arc::new(Semaphore::new(max_concurrent));
    let mut deliveries = JoinSet::new();
    let mut abandoned = 0_usize;
    loop {
        // Reap finished deliveries so the set does not grow.
        while deliveries.try_join_next().is_some() {}
        // A free slot first, then a job: a job waits *on the queue* (where `queue_capacity`
        // bounds it and a full queue refuses captures), not in this loop.
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break }; // the semaphore is never closed
        let job = tokio::select! {
            () = stop.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        metrics::gauge!("psp_webhook_queue_depth").set(rx.len() as f64);
        let dispatcher = Arc::clone(&dispatcher);
        let stop = stop.clone();
        deliveries.spawn(async move {
            metrics::gauge!("psp_webhook_deliveries_in_flight").increment(1.0);
            let outcome = dispatcher.deliver(job, &stop).await;
            metrics::gauge!("psp_webhook_deliveries_in_flight").decrement(1.0);
            drop(slot);
            outcome
        });
    }
    // No new jobs; jobs already behind a reserved permit still arrive, so drain to the end.
    rx.close();
    while let Some(job) = rx.recv().await {
        dispatcher
            .records
            .set_status(&job.id, DeliveryStatus::Abandoned);
        abandoned += 1;
    }
    // Running deliveries watch the same token and end at their next await.
    while let Some(outcome) = deliveries.join_next().await {
        if matches!(outcome, Ok(Outcome::Abandoned)) {
            abandoned += 1;
        }
    }
    if abandoned > 0 {
        // Not an error (the simulator keeps no state by design), but webhooks billing will
        // never get: worth a warning.
        tracing::warn!(
            abandoned,
            "webhook sender stopped; pending deliveries abandoned"
        );
    } else {
        tracing::info!(abandoned, "webhook sender stopped; nothing pending");
    }
}

impl Dispatcher {
    /// One delivery: attempts until a 2xx, `max_attempts`, or stop.
    async fn deliver(&self, job: Job, stop: &CancellationToken) -> Outcome {
        if let Some(settle) = job.on_dispatch {
            settle();
        }
        for attempt in 1..=self.max_attempts {
            let timestamp = Utc::now().timestamp();
            let signature = self.key.sign(&job.id, timestamp, &job.body);
            let request = self
                .client
                .post(self.url.clone())
                .header(ID_HEADER, &job.id)
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, signature)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(job.body.clone())
                .send();
            let result = tokio::select! {
                r = request => r,
                () = stop.cancelled() => {
                    self.records.set_status(&job.id, DeliveryStatus::Abandoned);
                    return Outcome::Abandoned;
                }
            };
            let (status_code, error) = match &result {
                Ok(response) => (Some(response.status().as_u16()), None),
                // Without the URL: it is ours, and the error is about the attempt.
                Err(e) => (None, Some(error_kind(e))),
            };
            let delivered = status_code.is_some_and(|s| (200..300).contains(&s));
            metrics::counter!(
                "psp_webhook_attempts_total",
                "outcome" => if delivered { "2xx" } else if error.is_some() { "error" } else { "non_2xx" }
            )
            .increment(1);
            self.records.record_attempt(
                &job.id,
                AttemptRecord {
                    delivery: job.delivery,
                    attempt,
                    at: Utc::now(),
                    timestamp,
                    status_code,
                    error,
                },
            );
            if delivered {
                self.records.set_status(&job.id, DeliveryStatus::Delivered);
                tracing::info!(webhook_id = %job.id, attempt, "webhook delivered");
                return Outcome::Delivered;
            }
            if attempt == self.max_attempts {
                break;
            }
            let pause = retry_delay(attempt, self.initial_backoff, self.max_backoff);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => {
                    self.records.set_status(&job.id, DeliveryStatus::Abandoned);
                    return Outcome::Abandoned;
                }
            }
        }
        self.records.set_status(&job.id, DeliveryStatus::Failed);
        tracing::warn!(
            webhook_id = %job.id,
            attempts = self.max_attempts,
            "webhook not delivered; giving up"
        );
        Outcome::Failed
    }
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connect".to_owned()
    } else {
        "request".to_owned()
    }
}

/// The pause after failed attempt `attempt` (1-based): Keel's one backoff (P24,
/// `keel_resilience`), `initial * 2^(attempt-1)` capped at `max`, full jitter, so webhooks
/// that failed together do not all come back at the same instant. The one place the sender's
/// retry delay is computed.
fn retry_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    BackoffPolicy::new(initial, max).delay(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_stay_under_a_ceiling_that_grows_to_the_cap() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let full = Duration::from_millis(full);
            for _ in 0..50 {
                let d = retry_delay(attempt, initial, max);
                assert!(d <= full, "attempt {attempt}: {d:?} over {full:?}");
            }
        }
    }
}
