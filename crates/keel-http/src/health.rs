//! Liveness and readiness (P21).
//!
//! - `GET /livez` answers 200 whenever the process can answer at all. It checks no
//!   dependency: if it did, a slow database would make Kubernetes restart every pod at once
//!   (the death spiral this pattern prevents).
//! - `GET /readyz` runs every registered check concurrently, each under the configured
//!   deadline, and answers 200 only if all pass and the process is not draining. Failing
//!   readiness takes the instance out of the load balancer without restarting it.
//!
//! The checks themselves live in the service runtime (`keel_service::Health`), which hands
//! this crate a [`ReadinessProbe`]; gRPC services read the same state for `grpc.health.v1`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

type ProbeFuture = Pin<Box<dyn Future<Output = Readiness> + Send>>;

/// How the HTTP stack asks "is this process ready?". The answer is computed elsewhere (the
/// service runtime's health registry, `keel_service::Health`); keel-http only renders it, so
/// this crate never depends on the runtime that sits above it.
#[derive(Clone)]
pub struct ReadinessProbe(Arc<dyn Fn() -> ProbeFuture + Send + Sync>);

impl std::fmt::Debug for ReadinessProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadinessProbe")
    }
}

impl ReadinessProbe {
    /// A probe answered by `f` on every `/readyz` call.
    pub fn from_fn<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Readiness> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(f())))
    }

    /// A probe that is always ready (tests of the stack itself; tools without dependencies).
    pub fn always_ready() -> Self {
        Self::from_fn(|| async {
            Readiness {
                ready: true,
                draining: false,
                checks: BTreeMap::new(),
            }
        })
    }

    /// Evaluates readiness once.
    pub async fn check(&self) -> Readiness {
        (self.0)().await
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

/// `GET /livez`.
pub async fn livez() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "alive" }))
}

/// `GET /readyz`.
pub async fn readyz(State(probe): State<ReadinessProbe>) -> Response {
    let r = probe.check().await;
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
