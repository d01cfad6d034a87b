#![doc = include_str!("../README.md")]

pub mod api_keys;
pub mod cli;
mod config;
#[cfg(feature = "grpc")]
mod grpc;
mod health;
pub mod probe;
pub mod problem;
pub mod runtime;
mod signal;
mod tls;

pub use cli::ServiceMain;
pub use config::ShutdownConfig;
#[cfg(feature = "grpc")]
pub use grpc::GrpcConfig;
pub use health::Health;
pub use runtime::{BrokerReadiness, Drained, Service, ServiceError, Stage};
pub use signal::shutdown_signal;
pub use tls::install_crypto_provider;
