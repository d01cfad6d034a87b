//! Housekeeping on the job queue: removing expired idempotency keys (P13), as a singleton
//! recurring job (P08).
//!
//! Recurrence with keel-pg's queue: a job id can be used once (`enqueue` with a fixed id is
//! idempotent), so "the same job re-enqueued" is a fixed id *per time slot*:
//! `slot = floor(now / orders.idempotency_purge_interval)`, job id derived from the slot.
//! Every checkout instance enqueues the current slot's job at start and each run enqueues the
//! next slot's; instances racing to do so create one row, so exactly one instance purges per
//! slot, and the `jobs` table keeps one row per run as the history operators can read.
//!
//! The next run is enqueued *before* purging: a run that fails (database down) never breaks
//! the chain. Deleting happens in batches of `orders.idempotency_purge_batch` (short locks,
//! small WAL bursts), at most [`MAX_BATCHES_PER_RUN`] per run; what is left waits for the next.
//!
//! The payload is typed ([`MaintenanceJob`], serde, as the saga's `SagaJob`): the handler gets
//! a task or a decode error, never a `serde_json::Value` to pick fields out of. Must not
//! break: the task names and field names are stored in `jobs.payload` of queued jobs.

use keel_resilience::BackoffPolicy;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_pg::PgError;
use keel_pg::jobs::{self, Job, NewJob, Outcome, WorkerConfig};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{MaintenanceConfig, OrdersConfig};

/// The queue of checkout's housekeeping jobs.
pub const MAINTENANCE_QUEUE: &str = "checkout.maintenance";

/// The payload of a maintenance job: its task, named by the `task` field, and the task's
/// fields beside it (`{"task": "purge_idempotency_keys", "slot": 29043}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task", deny_unknown_fields)]
pub enum MaintenanceJob {
    /// Delete expired idempotency keys; `slot` is the time slot the run belongs to (its job
    /// id is derived from it, [`purge_job_id`]).
    #[serde(rename = "purge_idempotency_keys")]
    PurgeIdempotencyKeys { slot: u64 },
}

/// A job whose payload is not a [`MaintenanceJob`] (a bug or a hand-edited row: retrying
/// cannot fix it, so the job fails for an operator).
#[derive(Debug, thiserror::Error)]
#[error("maintenance job payload: {0}")]
pub struct PayloadError(#[from] serde_json::Error);

impl MaintenanceJob {
    /// The payload of a claimed job.
    pub fn from_job(job: &Job) -> Result<Self, PayloadError> {
        Ok(Self::deserialize(&job.payload)?)
    }
}

/// Upper half of every purge job id ("keel" "purg" in ASCII); the lower half is the slot.
const PURGE_JOB_ID_HIGH: u64 = 0x6b65_656c_7075_7267;

/// Most batches deleted by one run.
pub const MAX_BATCHES_PER_RUN: u32 = 100;

/// Attempts of one purge run (the next slot's run is already enqueued when it fails).
const PURGE_MAX_ATTEMPTS: i32 = 3;

/// The fixed id of the purge job of `slot`.
pub fn purge_job_id(slot: u64) -> Uuid {
    Uuid::from_u64_pair(PURGE_JOB_ID_HIGH, slot)
}

/// The maintenance worker.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pool: PgPool,
    orders: OrdersConfig,
    config: MaintenanceConfig,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Maintenance {
    pub fn new(pool: PgPool, orders: OrdersConfig, config: MaintenanceConfig) -> Self {
        Self {
            pool,
            orders,
            config,
        }
    }

    /// The current slot and the time until the next one begins.
    fn slot(&self) -> (u64, Duration) {
        let interval = millis(self.orders.idempotency_purge_interval);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let slot = now / interval;
        let next = (slot + 1).saturating_mul(interval);
        (slot, Duration::from_millis(next.saturating_sub(now)))
    }

    async fn enqueue_purge(&self, slot: u64, delay: Duration) -> Result<(), PgError> {
        let payload = serde_json::to_value(MaintenanceJob::PurgeIdempotencyKeys { slot })
            .map_err(|e| PgError::Encode(e.to_string()))?;
        let mut conn = self.pool.acquire().await?;
        jobs::enqueue(
            &mut conn,
            &NewJob {
                queue: MAINTENANCE_QUEUE,
                payload,
                max_attempts: PURGE_MAX_ATTEMPTS,
                delay,
                id: Some(purge_job_id(slot)),
            },
        )
        .await?;
        Ok(())
    }

    /// Enqueues the current slot's purge (a no-op if it exists, whichever instance made it).
    pub async fn schedule(&self) -> Result<(), PgError> {
        let (slot, _) = self.slot();
        self.enqueue_purge(slot, Duration::ZERO).await
    }

    /// Deletes expired idempotency keys in batches; returns how many.
    pub async fn purge_idempotency_keys(&self) -> Result<u64, PgError> {
        let batch = self.orders.idempotency_purge_batch;
        let mut purged = 0;
        for _ in 0..MAX_BATCHES_PER_RUN {
            // One batch per statement, each its own transaction.
            let mut conn = self.pool.acquire().await?;
            let n = keel_pg::idempotency::purge_expired(&mut conn, batch).await?;
            purged += n;
            if n < u64::try_from(batch).unwrap_or(u64::MAX) {
                break;
            }
        }
        Ok(purged)
    }

    async fn handle(&self, job: Job) -> Outcome {
        match MaintenanceJob::from_job(&job) {
            Ok(MaintenanceJob::PurgeIdempotencyKeys { .. }) => self.purge_run().await,
            Err(e) => Outcome::Fail(e.to_string()),
        }
    }

    /// One run of the purge job: the next slot's run enqueued, then the purge.
    async fn purge_run(&self) -> Outcome {
        // The next run first, so a failure below cannot end the chain.
        let (slot, until_next) = self.slot();
        if let Err(e) = self.enqueue_purge(slot + 1, until_next).await {
            return Outcome::RetryAfter(self.config.poll_interval, e.to_string());
        }
        match self.purge_idempotency_keys().await {
            Ok(purged) => {
                metrics::counter!("idempotency_keys_purged_total").increment(purged);
                tracing::info!(purged, "expired idempotency keys purged");
                Outcome::Done
            }
            Err(e) => Outcome::RetryAfter(self.config.poll_interval, e.to_string()),
        }
    }

    /// Schedules the purge (retrying while the database is unreachable), then runs the
    /// maintenance queue, one job at a time, until `stop`.
    pub async fn run_worker(self, worker: String, stop: CancellationToken) {
        // Jittered: every instance starts this loop at once after a deploy or an outage.
        let mut backoff =
            BackoffPolicy::new(self.config.poll_interval, Duration::from_secs(30)).backoff();
        loop {
            match self.schedule().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot schedule the idempotency-key purge yet")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay_without_deadline()) => {}
            }
        }
        let config = WorkerConfig {
            queue: MAINTENANCE_QUEUE.to_owned(),
            worker,
            concurrency: 1,
            lease: self.config.lease,
            poll_interval: self.config.poll_interval,
        };
        let pool = self.pool.clone();
        jobs::run_worker(pool, config, stop, move |job| {
            let this = self.clone();
            async move { this.handle(job).await }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_purge_payload_is_the_task_and_its_slot_as_queued_rows_hold_them() {
        let job = MaintenanceJob::PurgeIdempotencyKeys { slot: 7 };
        let stored = serde_json::json!({ "task": "purge_idempotency_keys", "slot": 7 });
        assert_eq!(serde_json::to_value(job).unwrap(), stored);
        assert_eq!(MaintenanceJob::deserialize(&stored).unwrap(), job);
        for unknown in [
            serde_json::json!({ "task": "vacuum", "slot": 7 }),
            serde_json::json!({ "task": "purge_idempotency_keys" }),
            serde_json::json!({ "slot": 7 }),
        ] {
            assert!(MaintenanceJob::deserialize(&unknown).is_err(), "{unknown}");
        }
    }
}
