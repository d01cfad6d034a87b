#![doc = include_str!("../README.md")]

pub mod backoff;
pub mod breaker;

pub use backoff::{Backoff, BackoffPolicy};
pub use breaker::{Breaker, BreakerConfig, BreakerOpen, Permit, State};
