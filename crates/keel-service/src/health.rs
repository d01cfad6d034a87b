//! The health registry of one process (P21, P28): named dependency checks and the draining
//! flag, read by `/readyz` (through [`Health::probe`]) and by gRPC health.
//!
//! Checks must be cheap (a `SELECT 1`, a connection's state): orchestrators call `/readyz`
//! every few seconds. Every check runs concurrently under one deadline, so a hanging
//! dependency makes readiness false in bounded time instead of hanging the probe.
//!
//! Must not break: once draining, readiness stays false for good.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_http::{Readiness, ReadinessProbe};
use keel_telemetry::LagMonitor;
use tokio::sync::watch;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// Readiness state of one process: its dependency checks and whether it is draining.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    checks: std::sync::RwLock<Vec<(&'static str, CheckFn)>>,
    draining: AtomicBool,
    timeout: Duration,
    // Notifies gRPC `Watch` streams and tests when draining starts.
    draining_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("draining", &self.is_draining())
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Health with no checks yet; each check gets `timeout` to answer.
    pub fn new(timeout: Duration) -> Self {
        let (draining_tx, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                checks: std::sync::RwLock::new(Vec::new()),
                draining: AtomicBool::new(false),
                timeout,
                draining_tx,
            }),
        }
    }

    /// Registers a dependency check.
    pub fn add_check<F, Fut>(&self, name: &'static str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let f: CheckFn = Arc::new(move || Box::pin(check()));
        if let Ok(mut checks) = self.inner.checks.write() {
            checks.push((name, f));
        }
    }

    /// Adds the `runtime` check (P28): not ready while the async runtime's scheduler lag over
    /// the recent window is above `max`, because a blocked runtime answers everything late.
    pub fn watch_runtime_lag(&self, lag: LagMonitor, max: Duration) {
        self.add_check("runtime", move || {
            let current = lag.recent_max();
            async move {
                if current > max {
                    Err(format!("scheduler lag {current:?} over {max:?}"))
                } else {
                    Ok(())
                }
            }
        });
    }

    /// Marks the process as draining: readiness is false from now on, for good.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.draining_tx.send_replace(true);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// A receiver that sees `true` once draining starts.
    pub fn draining_changes(&self) -> watch::Receiver<bool> {
        self.inner.draining_tx.subscribe()
    }

    /// Runs every check concurrently under the deadline.
    pub async fn ready(&self) -> Readiness {
        let checks: Vec<(&'static str, CheckFn)> = self
            .inner
            .checks
            .read()
            .map(|c| c.clone())
            .unwrap_or_default();
        let timeout = self.inner.timeout;
        let results =
            futures_util::future::join_all(checks.into_iter().map(|(name, f)| async move {
                let outcome = match tokio::time::timeout(timeout, f()).await {
                    Ok(Ok(())) => "ok".to_owned(),
                    Ok(Err(reason)) => reason,
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                (name, outcome)
            }))
            .await;
        let draining = self.is_draining();
        let checks: BTreeMap<_, _> = results.into_iter().collect();
        let ready = !draining && checks.values().all(|v| v == "ok");
        Readiness {
            ready,
            draining,
            checks,
        }
    }

    /// What the HTTP stack's `/readyz` calls.
    pub fn probe(&self) -> ReadinessProbe {
        let health = self.clone();
        ReadinessProbe::from_fn(move || {
            let health = health.clone();
            async move { health.ready().await }
        })
    }
}
