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
//!     record_refusals(refused)   -- nacked or too large: an attempt each, then a retry_at
//!                                --   or, at relay.max_attempts, parked
//!   COMMIT
//!   on a failure of the path (broker unreachable, no confirm within publish_timeout, the
//!     database): ROLLBACK, note the error on the rows in its own short transaction, back
//!     off (capped, full jitter: keel_resilience, P24) and go on; rows stay in the table and
//!     drain when the broker returns
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
//! - **One unpublishable row does not stop the others.** A row the broker nacks (a full
//!   queue with `x-overflow: reject-publish`, say) is refused, not failed: it counts an
//!   attempt and waits out its own backoff (`retry_at`, the same policy as the loop's) while
//!   the batch commits the rest and the loop goes on at full speed. After
//!   `relay.max_attempts` refusals it is *parked*: the reason stays in `last_error`, the
//!   relay stops claiming it, `outbox_parked_rows` counts it, and an operator sees it with
//!   `keelctl outbox parked` and returns it with `keelctl outbox retry`. A row larger than
//!   `relay.max_message_bytes` is parked at once without being sent (its size will not
//!   change); so is one whose event type AMQP cannot carry. Rows of other aggregates never
//!   wait for a parked row; **later rows of its own aggregate do**, unsent, until it is
//!   retried and published (or an operator deals with it), because publishing them would
//!   break that aggregate's order. Failures of the path — broker unreachable, a confirm that
//!   never comes, the database — are not the row's fault: they back off the loop and are
//!   never counted towards parking, so an outage only delays the backlog.
//! - **A final publish on stop.** The service runtime stops the relays after its consumers and
//!   job workers precisely so that the relays publish what those stages committed on their
//!   way out. So `stop` does not end the loop after its current batch (that would leave up to
//!   a poll interval of rows for the next start): it ends the idle wait at once and the loop
//!   drains the outbox, returning on the first empty claim or failed batch. The runtime's
//!   `relays` stage bounds how long that may take (a slow broker, a writer that never stops).
//!
//! Metrics: `outbox_published_total`, `outbox_publish_failures_total` (every failed row
//! attempt, refused or not), `outbox_parked_total`, `outbox_relay_batch_duration_seconds`,
//! and the gauges `outbox_unsent`, `outbox_oldest_unsent_seconds` (parked rows excluded) and
//! `outbox_parked_rows`, refreshed every `relay.backlog_interval`. The backlog alert is on the
//! age; a parked row wants an operator, so alert on `outbox_parked_rows > 0` too.
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
    /// Deadline for a batch's publisher confirms (the confirm timeout): a message not
    /// confirmed by then failed, its channel is discarded and the row is retried. A failure
    /// of the path, not of the row: it never counts towards parking.
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
    /// Refusals (broker nacks) after which a row is parked for an operator instead of
    /// retried. Each refusal is followed by the row's own backoff (up to `max_backoff`), so
    /// the default of 10 parks a row the broker keeps refusing after about half a minute
    /// with `max_backoff = 10s`: long enough to ride out a queue that is briefly full.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Largest message body the relay sends; a row above it is parked at once as "too
    /// large", without publishing. Far below RabbitMQ's own `max_message_size` (128 MiB in
    /// 3.10, where the broker closes the channel instead of nacking): an event that big is a
    /// bug, and big messages stall a quorum queue's replication for every other message.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u32,
}

fn default_backlog_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_concurrency() -> u32 {
    1
}

/// `relay.max_attempts` when the config does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

/// `relay.max_message_bytes` when the config does not say: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 1024 * 1024;

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

fn default_max_message_bytes() -> u32 {
    DEFAULT_MAX_MESSAGE_BYTES
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
        ensure_range("relay.max_attempts", self.max_attempts, 1, 100)?;
        // 128 MiB: RabbitMQ 3.10's max_message_size; above it the broker, not the relay, refuses.
        ensure_range(
            "relay.max_message_bytes",
            self.max_message_bytes,
            1024,
            128 * 1024 * 1024,
        )?;
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
    let policy = BackoffPolicy::new(Duration::from_millis(100), config.max_backoff);
    let mut backoff = policy.backoff();
    let rules = Rules {
        limit: i64::from(config.batch_size),
        max_attempts: config.max_attempts.max(1),
        max_message_bytes: usize::try_from(config.max_message_bytes).unwrap_or(usize::MAX),
        retry: policy,
    };
    let mut failing = false;
    loop {
        // Read before the batch: a stop that fires during it is answered by the next one.
        let draining = stop.is_cancelled();
        let started = Instant::now();
        let pause = match relay_batch(&pool, &mut publisher, &rules).await {
            Ok(claimed) => {
                if failing {
                    tracing::info!("outbox relay recovered");
                    failing = false;
                }
                backoff.reset();
                if claimed > 0 {
                    metrics::histogram!("outbox_relay_batch_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    // Publishing one event may have made the next one of its aggregate
                    // claimable, and refused rows wait on their own `retry_at`: go again at
                    // once; only an empty claim means idle.
                    continue;
                }
                if draining {
                    // Everything committed before the stop is out (or parked, or waiting).
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

/// What a batch may send and what it does with a refused row.
#[derive(Debug, Clone, Copy)]
struct Rules {
    limit: i64,
    max_attempts: u32,
    max_message_bytes: usize,
    /// A refused row's own backoff before its next attempt.
    retry: BackoffPolicy,
}

/// Why a row was refused. Only these count towards parking: they are the row's doing, not
/// the broker's or the network's.
#[derive(Debug)]
enum Refused {
    /// The broker said no (`basic.nack`), or returned it as unroutable: it may say yes later
    /// (a full queue drains, a binding is added).
    Broker(String),
    /// It can never be sent as it is (too large, a type AMQP cannot carry, not encodable):
    /// retrying only burns attempts, so it is parked at once.
    Never(String),
}

impl Refused {
    fn reason(&self) -> String {
        match self {
            Self::Broker(reason) => reason.clone(),
            Self::Never(reason) => reason.clone(),
        }
    }
}

/// The row's refusal as the table records it: retry after its backoff, or park.
fn refusal(row: &outbox::Pending, why: &Refused, rules: &Rules) -> outbox::Refusal {
    let attempts = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
    let retry_in = match why {
        Refused::Broker(_) if attempts < rules.max_attempts => Some(rules.retry.delay(attempts)),
        _ => None,
    };
    outbox::Refusal {
        id: row.id,
        reason: why.reason(),
        retry_in,
    }
}

/// One iteration: claim, send, mark the confirmed rows sent and the refused ones refused;
/// returns how many rows it claimed. `Err` only for a failure of the path (then the loop
/// backs off).
async fn relay_batch(
    pool: &PgPool,
    publisher: &mut Publisher,
    rules: &Rules,
) -> Result<usize, RelayError> {
    // Before claiming: holding row locks while we already know we cannot publish would only
    // block the other relays.
    publisher.ready().await?;

    let mut tx = pool.begin().await?;
    let rows = outbox::claim(&mut tx, rules.limit).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut sendable = Vec::with_capacity(rows.len());
    let mut batch = Vec::with_capacity(rows.len());
    let mut refused: Vec<(&outbox::Pending, Refused)> = Vec::new();
    for row in &rows {
        match Outgoing::from_outbox(row) {
            // Refused before sending: the broker never sees it.
            Ok(m) if m.body.len() > rules.max_message_bytes => refused.push((
                row,
                Refused::Never(format!(
                    "too large: {} bytes, relay.max_message_bytes is {}",
                    m.body.len(),
                    rules.max_message_bytes
                )),
            )),
            Ok(m) => {
                sendable.push(row);
                batch.push(m);
            }
            Err(e) => refused.push((row, Refused::Never(format!("not encodable: {e}")))),
        }
    }

    let results = match publisher.publish_batch(&batch).await {
        Ok(results) => results,
        Err(e) => {
            drop(tx.rollback().await);
            let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
            record_transient(pool, &ids, &e.to_string()).await;
            metrics::counter!("outbox_publish_failures_total").increment(ids.len() as u64);
            return Err(e.into());
        }
    };
    let mut confirmed = Vec::with_capacity(batch.len());
    let mut failed: Vec<(Uuid, String)> = Vec::new();
    for (row, result) in sendable.into_iter().zip(results) {
        match result {
            Ok(()) => confirmed.push(row.id),
            Err(e @ (AmqpError::Nacked | AmqpError::Unroutable { .. })) => {
                refused.push((row, Refused::Broker(e.to_string())));
            }
            Err(AmqpError::InvalidName(name)) => {
                refused.push((row, Refused::Never(format!("invalid event type: {name}"))));
            }
            // Timeouts and channel errors: the path failed, not this row.
            Err(e) => failed.push((row.id, e.to_string())),
        }
    }
    if !confirmed.is_empty() {
        outbox::mark_sent(&mut tx, &confirmed).await?;
    }
    let refusals: Vec<outbox::Refusal> = refused
        .iter()
        .map(|(row, why)| refusal(row, why, rules))
        .collect();
    // In the claim's transaction: the row locks keep `attempts` what the claim read.
    let parked = outbox::record_refusals(&mut tx, &refusals).await?;
    // If this commit fails the confirmed rows stay unsent and are published again: the
    // at-least-once half of the guarantee.
    tx.commit().await?;
    metrics::counter!("outbox_published_total").increment(confirmed.len() as u64);
    metrics::counter!("outbox_publish_failures_total").increment(refusals.len() as u64);
    metrics::counter!("outbox_parked_total").increment(parked);
    for r in refusals.iter().filter(|r| r.retry_in.is_none()) {
        // Once per parked row, where it is handled: it now waits for an operator.
        tracing::warn!(outbox_id = %r.id, reason = %r.reason,
            "outbox row parked; `keelctl outbox parked` lists it, `keelctl outbox retry` returns it");
    }

    if let Some((_, first)) = failed.first() {
        let first = first.clone();
        let ids: Vec<Uuid> = failed.iter().map(|(id, _)| *id).collect();
        record_transient(pool, &ids, &first).await;
        metrics::counter!("outbox_publish_failures_total").increment(ids.len() as u64);
        return Err(RelayError::Unconfirmed {
            failed: ids.len(),
            claimed: rows.len(),
            first,
        });
    }
    Ok(rows.len())
}

/// Notes a failure of the path on the rows (operators see `last_error`), in its own short
/// transaction so it survives the batch's rollback. Best effort: if the database is what
/// failed, nothing is noted.
async fn record_transient(pool: &PgPool, ids: &[Uuid], error: &str) {
    let result = async {
        let mut conn = pool.acquire().await?;
        outbox::record_transient(&mut conn, ids, error).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not note the publish failure on the outbox rows");
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
                metrics::gauge!("outbox_parked_rows").set(b.parked as f64);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A `[relay]` section with only the keys that have no default.
    fn section() -> serde_json::Value {
        serde_json::json!({
            "batch_size": 100, "poll_interval": "200ms",
            "publish_timeout": "5s", "max_backoff": "10s",
        })
    }

    fn config(overrides: serde_json::Value) -> RelayConfig {
        let mut section = section();
        for (k, v) in overrides.as_object().unwrap() {
            section[k] = v.clone();
        }
        serde_json::from_value(section).unwrap()
    }

    fn refused_key(overrides: serde_json::Value) -> String {
        match config(overrides).validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_section_without_the_optional_keys_gets_the_documented_defaults() {
        let c = config(serde_json::json!({}));
        assert_eq!(c.backlog_interval, Duration::from_secs(5));
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.max_attempts, 10);
        assert_eq!(c.max_message_bytes, 1_048_576, "1 MiB");
        c.validate().unwrap();
    }

    /// Each bound is where the field's doc says, and a value past it is refused naming the
    /// key (the service then exits 78 with that name).
    #[test]
    fn every_bound_accepts_its_edge_and_refuses_one_past_it() {
        use serde_json::json;
        // (field, the key the refusal names, the edge value, one past it)
        #[rustfmt::skip]
        let cases = [
            ("batch_size", "relay.batch_size", json!(1), json!(0)),
            ("batch_size", "relay.batch_size", json!(1000), json!(1001)),
            ("poll_interval", "relay.poll_interval (ms)", json!("10ms"), json!("9ms")),
            ("poll_interval", "relay.poll_interval (ms)", json!("60s"), json!("60001ms")),
            ("publish_timeout", "relay.publish_timeout (ms)", json!("100ms"), json!("99ms")),
            ("publish_timeout", "relay.publish_timeout (ms)", json!("60s"), json!("60001ms")),
            ("max_backoff", "relay.max_backoff (ms)", json!("100ms"), json!("99ms")),
            ("max_backoff", "relay.max_backoff (ms)", json!("300s"), json!("300001ms")),
            ("concurrency", "relay.concurrency", json!(1), json!(0)),
            ("concurrency", "relay.concurrency", json!(16), json!(17)),
            ("max_attempts", "relay.max_attempts", json!(1), json!(0)),
            ("max_attempts", "relay.max_attempts", json!(100), json!(101)),
            ("max_message_bytes", "relay.max_message_bytes", json!(1024), json!(1023)),
            // RabbitMQ 3.10's own max_message_size, 128 MiB, is the ceiling.
            ("max_message_bytes", "relay.max_message_bytes", json!(134_217_728), json!(134_217_729)),
            ("backlog_interval", "relay.backlog_interval (ms)", json!("100ms"), json!("99ms")),
            ("backlog_interval", "relay.backlog_interval (ms)", json!("300s"), json!("300001ms")),
        ];
        for (field, key, edge, past) in cases {
            config(json!({ field: edge }))
                .validate()
                .unwrap_or_else(|e| panic!("{field} = {edge} refused: {e}"));
            assert_eq!(refused_key(json!({ field: past })), key, "{field} = {past}");
        }
    }
}
