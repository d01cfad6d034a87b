#![doc = include_str!("../README.md")]
//!
//! Modules: [`key`] (the `whsec_` secret and signing), [`verify`] (tolerance and signature
//! checks on the receiving side).

pub mod key;
pub mod send;
pub mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

pub use key::{SecretError, SigningKey, new_secret, sign_with_all};
pub use verify::{Signed, Verifier, VerifyError};

/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The header carrying the message id (the same on every retry: receivers dedupe on it).
pub const ID_HEADER: &str = "webhook-id";

/// The header carrying the attempt's unix time in seconds (fresh on every attempt).
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";

/// The header carrying one or more space-separated `v1,<base64>` signatures.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The current unix time in seconds, as senders stamp and receivers compare it. A clock
/// before 1970 reads as 0 (and every delivery then looks as if it came from the future).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
