//! Keel's gRPC contracts: the `.proto` files and the code generated from them.
//!
//! Every `.proto` lives under `proto/` in this crate and is compiled at build time by protox
//! (pure Rust), so neither developers nor CI images need `protoc`. Only the services that
//! speak gRPC link this crate (checkout calls billing's `PaymentService`, billing serves it);
//! the wire types every service shares (the event envelope, typed events, `Money`, ids) are in
//! `keel-events`, which needs no RPC framework. Services never share each other's code.

/// The standard gRPC health-checking protocol (`grpc.health.v1`), the *client* side: for
/// callers and tests that probe a service. Every gRPC service serves it through
/// `keel_service::Service::grpc` (tonic-health), so Kubernetes gRPC probes and
/// `grpc-health-probe` work; the wire contract is the same file either way.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod grpc_health_v1 {
    tonic::include_proto!("grpc.health.v1");
}

/// billing's payments API (`keel.billing.v1.PaymentService`), called by checkout's saga.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod billing_v1 {
    tonic::include_proto!("keel.billing.v1");
}

/// By hand instead of derived: a payment token must never reach a log line through `{:?}`.
impl std::fmt::Debug for billing_v1::AuthorizeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizeRequest")
            .field("idempotency_key", &self.idempotency_key)
            .field("order_id", &self.order_id)
            .field("amount", &self.amount)
            .field("payment_token", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::billing_v1::AuthorizeRequest;

    #[test]
    fn an_authorize_requests_debug_output_carries_no_payment_token() {
        let request = AuthorizeRequest {
            idempotency_key: "k".to_owned(),
            payment_token: "tok_secret_4242".to_owned(),
            ..Default::default()
        };
        let shown = format!("{request:?} {request:#?}");
        assert!(!shown.contains("tok_secret_4242"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
