//! Liveness and readiness (P21).
//!
//! - `GET /livez` answers 200 whenever the process can answer at all. It checks no
//!   dependency: if it did, a slow database would make Kubernetes restart every pod at once
//!   (the death spiral this pattern prevents).
//! - `GET /readyz` runs every registered check concurrently, each under the configured
//!   deadline, and answers 200 only if all pass and the process is not draining. Failing
//!   readiness takes the instance out of the load balancer without restarting it.
//!
//! gRPC services read the same state through [`Health::ready`] for `grpc.health.v1`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tokio::sync::watch;

use crate::problem::Problem;

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

/// The outcome of one readiness evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub draining: bool,
    /// `"ok"` or the failure reason, per check name.
    pub checks: BTreeMap<&'static str, String>,
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

    /// Registers a dependency check. It must be cheap (a `SELECT 1`, a connection state) because
    /// orchestrators call `/readyz` every few seconds.
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
    pub fn watch_runtime_lag(&self, lag: keel_telemetry::LagMonitor, max: Duration) {
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
}

/// `GET /livez`.
pub async fn livez() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "alive" }))
}

/// `GET /readyz`.
pub async fn readyz(State(health): State<Health>) -> Response {
    let r = health.ready().await;
    if r.ready {
        return Json(serde_json::json!({ "status": "ready", "checks": r.checks })).into_response();
    }
    let detail = if r.draining {
        "the process is shutting down"
    } else {
        "a dependency check failed"
    };
    if !r.draining {
        tracing::warn!(checks = ?r.checks, "not ready");
    }
    // Check outcomes name the dependency and the kind of failure only (no addresses or
    // credentials): they help an operator and reveal nothing a client could use.
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
        .with_detail(detail)
        .with("draining", r.draining.into())
        .with(
            "checks",
            serde_json::to_value(&r.checks).unwrap_or_default(),
        )
        .into_response()
}
