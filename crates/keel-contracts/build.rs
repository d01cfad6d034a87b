//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in pure Rust), so building Keel
//! needs no `protoc` binary on the machine or in the container image.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/grpc/health/v1/health.proto",
        "proto/keel/billing/v1/payments.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
