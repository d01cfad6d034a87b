//! Async-runtime scheduler lag (P28).
//!
//! A task asks to be woken every `interval` and records how late the wake-up was. When some
//! code blocks a worker thread (a synchronous DNS lookup, a CPU loop, `std::thread::sleep`),
//! every task on that runtime is late by the same amount, and this gauge shows it while the
//! process otherwise looks alive. Written by hand because it is twenty lines and the lesson.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Gauge name exported to Prometheus.
pub const LAG_GAUGE: &str = "runtime_scheduler_lag_seconds";

/// Shared view of the latest measured lag.
#[derive(Debug, Clone, Default)]
pub struct LagMonitor {
    micros: Arc<AtomicU64>,
}

impl LagMonitor {
    /// Spawns the probe on the current runtime; it stops when `stop` is cancelled.
    pub fn spawn(interval: Duration, stop: CancellationToken) -> Self {
        let monitor = Self::default();
        let micros = monitor.micros.clone();
        // Exported from the start (recorder first, or the value goes nowhere), so dashboards
        // and alerts never see the series missing.
        crate::metrics_handle();
        metrics::gauge!(LAG_GAUGE).set(0.0);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            // After a stall, measure the next tick from now instead of firing a burst.
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut expected = Instant::now() + interval;
            ticker.tick().await; // the first tick completes immediately
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let now = Instant::now();
                let lag = now.saturating_duration_since(expected);
                expected = now + interval;
                let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
                micros.store(us, Ordering::Relaxed);
                metrics::gauge!(LAG_GAUGE).set(lag.as_secs_f64());
            }
        });
        monitor
    }

    /// The lag measured at the latest wake-up.
    pub fn current(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}
