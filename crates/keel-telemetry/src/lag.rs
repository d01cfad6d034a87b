//! Async-runtime scheduler lag (P28).
//!
//! A task asks to be woken every `interval` and records how late the wake-up was. When some
//! code blocks a worker thread (a synchronous DNS lookup, a CPU loop, `std::thread::sleep`),
//! every task on that runtime is late by the same amount, and this gauge shows it while the
//! process otherwise looks alive. Written by hand because it is twenty lines and the lesson.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Gauge name exported to Prometheus.
pub const LAG_GAUGE: &str = "runtime_scheduler_lag_seconds";

/// How many recent samples [`LagMonitor::recent_max`] covers (5 s at the default 100 ms).
/// A stall must stay visible long enough for a readiness probe polling every few seconds to
/// see it; the latest sample alone is overwritten within one interval.
pub const WINDOW: usize = 50;

/// Shared view of the recently measured lag.
#[derive(Debug, Clone, Default)]
pub struct LagMonitor {
    samples: Arc<Mutex<VecDeque<Duration>>>,
}

impl LagMonitor {
    /// Spawns [`LagMonitor::run`] on the current runtime (tests and tools; services register
    /// the probe with their runtime instead, which starts it when the service runs).
    pub fn spawn(interval: Duration, stop: CancellationToken) -> Self {
        let monitor = Self::default();
        tokio::spawn(monitor.clone().run(interval, stop));
        monitor
    }

    /// The probe: wakes every `interval` and records how late it woke, until `stop`.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        // Exported from the start (recorder first, or the value goes nowhere), so dashboards
        // and alerts never see the series missing.
        crate::metrics_handle();
        metrics::gauge!(LAG_GAUGE).set(0.0);
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
            if let Ok(mut s) = self.samples.lock() {
                if s.len() == WINDOW {
                    s.pop_front();
                }
                s.push_back(lag);
            }
            metrics::gauge!(LAG_GAUGE).set(lag.as_secs_f64());
        }
    }

    /// The lag measured at the latest wake-up.
    pub fn current(&self) -> Duration {
        self.samples
            .lock()
            .ok()
            .and_then(|s| s.back().copied())
            .unwrap_or_default()
    }

    /// The largest lag over the last [`WINDOW`] wake-ups: what readiness judges by.
    pub fn recent_max(&self) -> Duration {
        self.samples
            .lock()
            .ok()
            .and_then(|s| s.iter().max().copied())
            .unwrap_or_default()
    }
}
