#![doc = include_str!("../README.md")]

pub mod backoff;
pub mod breaker;
pub mod budget;

pub use backoff::{Backoff, BackoffPolicy};
pub use breaker::{Breaker, BreakerConfig, BreakerOpen, Permit, State};
pub use budget::{RetryBudget, RetryBudgetConfig};
