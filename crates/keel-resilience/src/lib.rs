#![doc = include_str!("../README.md")]

pub mod backoff;

pub use backoff::{Backoff, BackoffPolicy};
