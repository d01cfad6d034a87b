#![doc = include_str!("../README.md")]

pub mod body_deadline;
pub mod client;
pub mod config;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod problem;
pub mod serve;
pub mod stack;

pub use config::HttpConfig;
pub use health::{Readiness, ReadinessProbe};
pub use problem::Problem;
pub use serve::{ServerLimits, serve};
