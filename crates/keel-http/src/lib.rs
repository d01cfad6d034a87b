#![doc = include_str!("../README.md")]

pub mod config;
pub mod health;
pub mod metrics;
pub mod problem;
pub mod shutdown;
pub mod stack;

pub use config::HttpConfig;
pub use health::Health;
pub use problem::Problem;
pub use shutdown::{Lifecycle, shutdown_signal};
