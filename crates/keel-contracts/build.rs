//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in pure Rust), so building Keel
//! needs no `protoc` binary on the machine or in the container image.
//!
//! `grpc.health.v1` is compiled for clients only: the server side is tonic-health's, wired by
//! `keel_service::Service::grpc` for every gRPC service. billing's `AuthorizeRequest` gets no
//! derived `Debug` (it carries a payment token); `src/lib.rs` writes one that redacts it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const HEALTH: &str = "proto/grpc/health/v1/health.proto";
    const BILLING: &str = "proto/keel/billing/v1/payments.proto";
    for p in ["build.rs", HEALTH, BILLING] {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile([HEALTH], ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(["keel.billing.v1.AuthorizeRequest"])
        .compile_fds(protox::compile([BILLING], ["proto"])?)?;
    Ok(())
}
