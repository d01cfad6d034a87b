//! The outbox relay (P02), written by hand because it *is* the lesson.
//!
//! A service writes its events into its own `outbox` table in the transaction that changes
//! its state (`keel_pg::outbox::insert`). This task moves committed rows to RabbitMQ:
//!
//! ```text
//! loop:
//!   open a confirm-mode channel (fail fast: no row locks while the broker is away)
//!   BEGIN
//!     claim a batch              -- FOR UPDATE SKIP LOCKED, oldest unsent event per aggregate
//!     publish it, await confirms -- one deadline for the whole batch
//!     mark_sent(confirmed ones)  -- never a row the broker did not confirm
//!   COMMIT
//!   on failure: ROLLBACK, record_failure in its own short transaction, back off (capped,
//!               full jitter: keel_resilience, P24) and go on; rows stay in the table and
//!               drain when the broker returns
//!   idle: wait `poll_interval`
//! on stop: claim and publish until a claim comes back empty (or a batch fails), then return
//! ```
//!
//! Guarantees, and what they rest on:
//! - **Nothing invented, nothing lost.** Only committed rows are visible to `claim`; a row is
//!   marked sent only after the broker confirmed it, in the same transaction that holds its lock.
//! - **At-least-once, not exactly-once.** If the process dies (or the database fails) after
//!   the confirm but before COMMIT, the row is published again by the next attempt. Consumers
//!   dedupe by message id (P03, `keel_pg::inbox`).
//! - **Per-aggregate order.** `claim` returns only the oldest unsent event of each aggregate,
//!   so event *n + 1* of an order is not even claimable until event *n* is confirmed and
//!   marked — with any number of relays, since the locks of one relay's claim are skipped,
//!   not waited on, by the others. (A redelivered duplicate of *n* may still arrive after
//!   *n + 1*; consumers that care compare versions.) Across aggregates there is no order.
//! - **Two relays are safe**: `SKIP LOCKED` hands each row to one transaction at a time.
//! - **A final publish on stop.** The service runtime stops the relays after its consumers and
//!   job workers precisely so that the relays publish what those stages committed on their
//!   way out. So `stop` does not end the loop after its current batch (that would leave up to
//!   a poll interval of rows for the next start): it ends the idle wait at once and the loop
//!   drains the outbox, returning on the first empty claim or failed batch. The runtime's
//!   `relays` stage bounds how long that may take (a slow broker, a writer that never stops).
//!
//! Metrics: `outbox_published_total`, `outbox_publish_failures_total`,
//! `outbox_relay_batch_duration_seconds`, and the backlog gauges `outbox_unsent` and
//! `outbox_oldest_unsent_seconds` (refreshed every `relay.backlog_interval`; the alert is on
//! the age).
//!
//! Wiring it into a service is one line:
//! ```ignore
//! let relay = keel_amqp::relay::spawn(pool.clone(), broker.clone(), config.relay.clone(), stop.clone());
//! // ... at shutdown, after the work that writes outbox rows has stopped:
//! relay.await.ok();
//! ```
//!
//! Must not break: `mark_sent` and the claim share one transaction, and it commits only after
//! the confirms; never mark a row sent on a publish that was not confirmed.

use std::time::{Duration, Instant};

use keel_config::{ConfigError, Validate, ensure_range};
use keel_pg::outbox;
use keel_resilience::backoff::BackoffPolicy;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::ms;
use crate::publisher::{Outgoing, Publisher};
use crate::{AmqpError, Broker};

/// `[relay]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Most events claimed, published and marked in one transaction.
    pub batch_size: u32,
    /// Pause when the outbox is empty (the latency floor of an event that finds the relay idle).
    #[serde(with = "keel_config::duration")]
    pub poll_interval: Duration,
    /// Deadline for a batch's publisher confirms; a message not confirmed by then failed.
    #[serde(with = "keel_config::duration")]
    pub publish_timeout: Duration,
    /// Cap of the backoff after a failure (broker or database unreachable).
    #[serde(with = "keel_config::duration")]
    pub max_backoff: Duration,
    /// How often the backlog gauges are refreshed.
    #[serde(with = "keel_config::duration", default = "default_backlog_interval")]
    pub backlog_interval: Duration,
    /// Batches in flight at once in this process, each in its own transaction on its own
    /// channel. While one batch waits for its confirms the next is claimed and sent, so the
    /// database round trips of one overlap the broker's of the other. `SKIP LOCKED` keeps
    /// their rows apart and the claim's per-aggregate rule keeps each aggregate's order.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn default_backlog_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_concurrency() -> u32 {
    1
}

impl Validate for RelayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // The claim's per-aggregate check costs more per row than a plain SKIP LOCKED pop;
        // past ~1000 rows a batch holds its locks (and its confirms) too long.
        ensure_range("relay.batch_size", self.batch_size, 1, 1000)?;
        ensure_range(
            "relay.poll_interval (ms)",
            ms(self.poll_interval),
            10,
            60_000,
        )?;
        ensure_range(
            "relay.publish_timeout (ms)",
            ms(self.publish_timeout),
            100,
            60_000,
        )?;
        ensure_range("relay.max_backoff (ms)", ms(self.max_backoff), 100, 300_000)?;
        ensure_range("relay.concurrency", self.concurrency, 1, 16)?;
        ensure_range(
            "relay.backlog_interval (ms)",
            ms(self.backlog_interval),
            100,
            300_000,
        )
    }
}

/// Why a relay iteration did not publish everything it claimed.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("broker: {0}")]
    Broker(#[from] AmqpError),
    #[error("database: {0}")]
    Database(#[from] keel_pg::PgError),
    #[error("{failed} of {claimed} messages not confirmed: {first}")]
    Unconfirmed {
        failed: usize,
        claimed: usize,
        first: String,
    },
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e.into())
    }
}

/// Starts the relay as a task; when `stop` is cancelled it publishes what is committed (until
/// a claim finds nothing, or a batch fails) and returns. Await the handle to know it has
/// stopped; bound that wait (the runtime's `relays` stage does).
pub fn spawn(
    pool: PgPool,
    broker: Broker,
    config: RelayConfig,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(pool, broker, config, stop))
}

/// The relay (see the module docs): `relay.concurrency` batch loops and the backlog gauges;
/// returns when `stop` is cancelled and every loop has drained the outbox (or failed to).
pub async fn run(pool: PgPool, broker: Broker, config: RelayConfig, stop: CancellationToken) {
    let backlog = tokio::spawn(watch_backlog(
        pool.clone(),
        config.backlog_interval,
        stop.clone(),
    ));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        loops.spawn(relay_loop(
            pool.clone(),
            broker.clone(),
            config.clone(),
            stop.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    let _ = backlog.await;
    tracing::info!("outbox relay stopped");
}

/// One batch loop: claim, publish, confirm, mark, commit; back off on failure. Once `stop`
/// is cancelled, a final drain: batches back to back until one claims nothing or fails.
async fn relay_loop(pool: PgPool, broker: Broker, config: RelayConfig, stop: CancellationToken) {
    let mut publisher = Publisher::new(broker, config.publish_timeout);
    let mut backoff = BackoffPolicy::new(Duration::from_millis(100), config.max_backoff).backoff();
    let limit = i64::from(config.batch_size);
    let mut failing = false;
    loop {
        // Read before the batch: a stop that fires during it is answered by the next one.
        let draining = stop.is_cancelled();
        let started = Instant::now();
        let pause = match relay_batch(&pool, &mut publisher, limit).await {
            Ok(published) => {
                if failing {
                    tracing::info!("outbox relay recovered");
                    failing = false;
                }
                backoff.reset();
                if published > 0 {
                    metrics::histogram!("outbox_relay_batch_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    // Publishing one event may have made the next one of its aggregate
                    // claimable: go again at once; only an empty claim means idle.
                    continue;
                }
                if draining {
                    // Everything committed before the stop is out.
                    break;
                }
                config.poll_interval
            }
            Err(e) if draining => {
                // No backoff on the way out: what is unsent waits in the outbox for the next
                // start (or another instance's relay).
                tracing::warn!(error = %e, "outbox relay's final publish failed; stopping");
                break;
            }
            Err(e) => {
                let pause = backoff.next_delay_without_deadline();
                // Logged where handled, once per outage at warn; the repeats are debug.
                if failing {
                    tracing::debug!(error = %e, backoff_ms = ms(pause), "outbox relay still failing");
                } else {
                    tracing::warn!(error = %e, backoff_ms = ms(pause), "outbox relay failed; backing off");
                    failing = true;
                }
                pause
            }
        };
        tokio::select! {
            // Not `break`: the rows committed since the last claim are published first.
            () = stop.cancelled() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
    publisher.discard().await;
}

/// One iteration: returns how many events were confirmed and marked sent.
async fn relay_batch(
    pool: &PgPool,
    publisher: &mut Publisher,
    limit: i64,
) -> Result<usize, RelayError> {
    // Before claiming: holding row locks while we already know we cannot publish would only
    // block the other relays.
    publisher.ready().await?;

    let mut tx = pool.begin().await?;
    let rows = outbox::claim(&mut tx, limit).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut batch = Vec::with_capacity(rows.len());
    let mut unencodable = Vec::new();
    for row in &rows {
        match Outgoing::from_outbox(row) {
            Ok(m) => batch.push(m),
            Err(e) => unencodable.push((row.id, e.to_string())),
        }
    }

    let results = match publisher.publish_batch(&batch).await {
        Ok(results) => results,
        Err(e) => {
            drop(tx.rollback().await);
            let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
            record_failure(pool, &ids, &e.to_string()).await;
            metrics::counter!("outbox_publish_failures_total").increment(ids.len() as u64);
            return Err(e.into());
        }
    };
    let mut confirmed = Vec::with_capacity(batch.len());
    let mut failed: Vec<(Uuid, String)> = unencodable;
    for (message, result) in batch.iter().zip(results) {
        match result {
            Ok(()) => confirmed.push(message.id),
            Err(e) => failed.push((message.id, e.to_string())),
        }
    }
    if !confirmed.is_empty() {
        outbox::mark_sent(&mut tx, &confirmed).await?;
    }
    // If this commit fails the confirmed rows stay unsent and are published again: the
    // at-least-once half of the guarantee.
    tx.commit().await?;
    metrics::counter!("outbox_published_total").increment(confirmed.len() as u64);

    if let Some((_, first)) = failed.first() {
        let first = first.clone();
        let ids: Vec<Uuid> = failed.iter().map(|(id, _)| *id).collect();
        record_failure(pool, &ids, &first).await;
        metrics::counter!("outbox_publish_failures_total").increment(ids.len() as u64);
        return Err(RelayError::Unconfirmed {
            failed: ids.len(),
            claimed: rows.len(),
            first,
        });
    }
    Ok(confirmed.len())
}

/// Counts the failed attempt on the rows (operators see `attempts`, `last_error`), in its own
/// short transaction so it survives the batch's rollback. Best effort: if the database is what
/// failed, the counter simply does not move.
async fn record_failure(pool: &PgPool, ids: &[Uuid], error: &str) {
    let result = async {
        let mut conn = pool.acquire().await?;
        outbox::record_failure(&mut conn, ids, error).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not record the publish failure on the outbox rows");
    }
}

async fn watch_backlog(pool: PgPool, every: Duration, stop: CancellationToken) {
    loop {
        let result = async {
            let mut conn = pool.acquire().await?;
            outbox::backlog(&mut conn).await
        }
        .await;
        match result {
            Ok(b) => {
                metrics::gauge!("outbox_unsent").set(b.unsent as f64);
                metrics::gauge!("outbox_oldest_unsent_seconds").set(b.oldest_unsent_seconds);
            }
            // The relay loop reports database trouble; this only keeps the last values.
            Err(e) => tracing::debug!(error = %e, "outbox backlog not refreshed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
