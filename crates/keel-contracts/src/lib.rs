//! Keel's gRPC contracts: the `.proto` files and the code generated from them.
//!
//! Every `.proto` lives under `proto/` in this crate and is compiled at build time by protox
//! (pure Rust), so neither developers nor CI images need `protoc`. Only the services that
//! speak gRPC link this crate (checkout calls billing's `PaymentService`, billing serves it);
//! the wire types every service shares (the event envelope, typed events, `Money`, ids) are in
//! `keel-events`, which needs no RPC framework. Services never share each other's code.

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
