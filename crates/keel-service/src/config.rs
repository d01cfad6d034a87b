//! `[shutdown]`: the bound of every stage of the staged shutdown (P20).
//!
//! Each stage has its own bound so an operator can see, and tune, where a slow stop spends its
//! time; their sum (plus the drain delay) must fit inside the orchestrator's termination grace
//! period (Kubernetes' `terminationGracePeriodSeconds`, 30 s by default), or the process is
//! killed mid-stage. [`ShutdownConfig::total`] is that sum; the checked-in defaults keep it
//! under 30 s.

use std::time::Duration;

use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use serde::Deserialize;

/// Bounds of the shutdown stages, in the order they run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long `/readyz` reports draining before listeners close, so load
    /// balancers and Kubernetes endpoints stop sending new traffic first.
    #[serde(with = "keel_config::duration")]
    pub drain_delay: Duration,
    /// After listeners close, how long in-flight HTTP and gRPC requests may take to finish.
    #[serde(with = "keel_config::duration")]
    pub grace_period: Duration,
    /// How long consumers may take to finish and settle (ack or requeue) messages in flight.
    #[serde(with = "keel_config::duration")]
    pub consumers: Duration,
    /// How long job workers may take to finish or return their leases.
    #[serde(with = "keel_config::duration")]
    pub workers: Duration,
    /// How long outbox relays may take to publish what the stages above wrote.
    #[serde(with = "keel_config::duration")]
    pub relays: Duration,
    /// How long closing each broker connection may take.
    #[serde(with = "keel_config::duration")]
    pub broker: Duration,
    /// How long closing each database pool may take.
    #[serde(with = "keel_config::duration")]
    pub pools: Duration,
}

impl ShutdownConfig {
    /// The longest a graceful stop can take, every stage at its bound.
    pub fn total(&self) -> Duration {
        self.drain_delay
            + self.grace_period
            + self.consumers
            + self.workers
            + self.relays
            + self.broker
            + self.pools
    }

    /// Every in-flight request must end (done, or cut by its own timeout) within the grace
    /// period; otherwise shutdown would cut requests the timeout still allows. Services call
    /// this from their `Validate` with their longest request timeout.
    pub fn ensure_grace_covers(
        &self,
        key: &str,
        request_timeout: Duration,
    ) -> Result<(), ConfigError> {
        if self.grace_period < request_timeout {
            return Err(ConfigError::invalid(
                "shutdown.grace_period",
                format!("must be at least {key}"),
            ));
        }
        Ok(())
    }
}

impl Validate for ShutdownConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "shutdown.drain_delay (ms)",
            ms(self.drain_delay),
            0,
            120_000,
        )?;
        ensure_range(
            "shutdown.grace_period (ms)",
            ms(self.grace_period),
            0,
            300_000,
        )?;
        for (key, d) in [
            ("shutdown.consumers (ms)", self.consumers),
            ("shutdown.workers (ms)", self.workers),
            ("shutdown.relays (ms)", self.relays),
            ("shutdown.broker (ms)", self.broker),
            ("shutdown.pools (ms)", self.pools),
        ] {
            ensure_range(key, ms(d), 1, 300_000)?;
        }
        Ok(())
    }
}
