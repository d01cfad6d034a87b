//! `grpc.health.v1` for billing (P21 for gRPC).
//!
//! Answers from the same [`keel_service::Health`] as `/readyz`, so HTTP and gRPC probes never
//! disagree: dependency checks within their deadline, and NOT_SERVING as soon as draining
//! starts. Known service names are `""` (the whole server) and `billing`.

use std::pin::Pin;
use std::time::Duration;

use keel_contracts::grpc_health_v1::health_check_response::ServingStatus;
use keel_contracts::grpc_health_v1::health_server::Health as HealthApi;
use keel_contracts::grpc_health_v1::{HealthCheckRequest, HealthCheckResponse};
use keel_service::Health;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Service names this server reports on.
const KNOWN: [&str; 2] = ["", "billing"];

/// How often a `Watch` stream re-evaluates readiness.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The gRPC health service.
#[derive(Debug, Clone)]
pub struct GrpcHealth {
    health: Health,
}

impl GrpcHealth {
    /// Reports on `health`.
    pub fn new(health: Health) -> Self {
        Self { health }
    }

    async fn status(&self) -> ServingStatus {
        if self.health.ready().await.ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl HealthApi for GrpcHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !KNOWN.contains(&request.get_ref().service.as_str()) {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(response(self.status().await)))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let known = KNOWN.contains(&request.get_ref().service.as_str());
        // Bounded: one pending update per stream; a slow reader just sees the latest state.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            if !known {
                let _ = tx.send(Ok(response(ServingStatus::ServiceUnknown))).await;
                return;
            }
            let mut last = None;
            loop {
                let status = this.status().await;
                if last != Some(status) {
                    if tx.send(Ok(response(status))).await.is_err() {
                        return; // the client went away
                    }
                    last = Some(status);
                }
                // Ending the stream once draining lets graceful shutdown complete instead of
                // waiting out the grace period on an endless stream.
                if this.health.is_draining() {
                    return;
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
