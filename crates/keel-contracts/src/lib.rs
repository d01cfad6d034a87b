//! Keel's wire contracts.
//!
//! Every `.proto` lives under `proto/` in this crate and is compiled at build time by protox
//! (pure Rust), so neither developers nor CI images need `protoc`. Services share only this
//! crate and the platform crates, never each other's code.

/// The standard gRPC health-checking protocol (`grpc.health.v1`), served by billing so that
/// Kubernetes gRPC probes and `grpc-health-probe` work.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod grpc_health_v1 {
    tonic::include_proto!("grpc.health.v1");
}

/// billing's payments API (`keel.billing.v1.PaymentService`), called by checkout's saga.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod billing_v1 {
    tonic::include_proto!("keel.billing.v1");
}

pub mod events;
