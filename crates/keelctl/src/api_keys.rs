//! `keelctl api-keys create --customer <id>`: issue an API key for checkout's orders API.
//!
//! The key is made here, shown once, and only its SHA-256 is stored. keelctl links no service
//! code: what it shares with checkout is a table contract, checkout's `api_keys`
//! (`services/checkout/migrations/0005_api_keys.sql`), and the key's format below. checkout
//! only verifies keys (`checkout::api_keys`); its tests issue every key they use through
//! [`create`], so the two sides cannot drift apart unnoticed.
//!
//! A key is `keel_<id>_<secret>`:
//! - `keel_`: a fixed prefix, so a leaked key is recognisable (secret scanners, log filters);
//! - `<id>`: 12 lowercase hex digits (6 random bytes), the row's primary key. Not secret: it is
//!   how operators and logs name a key, and how checkout finds the row without a hash index;
//! - `<secret>`: 64 lowercase hex digits, 32 bytes from the operating system's CSPRNG.
//!
//! Stored: SHA-256 of the whole key, not argon2 or bcrypt. Those are slow on purpose because a
//! password has little entropy and its hash can be attacked with a list of likely guesses; a
//! key of 256 random bits has no such list, so one fast hash is already beyond brute force,
//! and the service can verify every request with one cheap hash instead of a deliberately
//! expensive one (which would also hand attackers a CPU and memory lever).
//!
//! The database write is one INSERT of three columns, with no RETURNING and no sequence: the
//! only privilege it needs is `INSERT (id, customer_id, key_hash) ON api_keys`.
//!
//! Must not break: the key is never logged or stored; it exists only in the [`IssuedKey`]
//! returned to the caller, which prints it once.

use keel_config::{ExposeSecret, SecretString};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

/// Every key starts with this.
pub const PREFIX: &str = "keel_";
/// Random bytes in a key's id (12 hex digits).
pub const ID_BYTES: usize = 6;
/// Random bytes in a key's secret (64 hex digits).
pub const SECRET_BYTES: usize = 32;
/// Longest customer id (checkout's `orders.customer_id` and `api_keys.customer_id` allow 200).
pub const MAX_CUSTOMER_CHARS: usize = 200;

/// Why a key could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The customer id is unusable; the message says why (a usage error, exit 64).
    #[error("--customer {0}")]
    InvalidCustomer(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("checkout database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A key just issued. `key` is the only copy there will ever be.
#[derive(Debug)]
pub struct IssuedKey {
    /// The key's non-secret id (the part after `keel_`).
    pub id: String,
    pub customer_id: String,
    /// `keel_<id>_<secret>`; `Debug` prints it redacted.
    pub key: SecretString,
}

impl IssuedKey {
    /// The key itself, to print once or send as `Authorization: Bearer <key>`.
    pub fn expose(&self) -> &str {
        self.key.expose_secret()
    }
}

/// A customer id as checkout stores it: 1 to 200 characters, not blank, no control
/// characters (it is printed in logs and tables).
pub fn validate_customer(customer: &str) -> Result<&str, ApiKeyError> {
    let why = if customer.trim().is_empty() {
        "must not be empty"
    } else if customer.chars().count() > MAX_CUSTOMER_CHARS {
        "must be at most 200 characters"
    } else if customer.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(customer);
    };
    Err(ApiKeyError::InvalidCustomer(why.to_owned()))
}

/// SHA-256 of the whole key, as stored in `api_keys.key_hash`.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn random_hex<const N: usize>() -> Result<String, ApiKeyError> {
    let mut bytes = [0u8; N];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ApiKeyError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Issues a key for `customer`: one INSERT on `conn` (a connection to checkout's database).
///
/// Two keys drawing the same 48-bit id is a primary-key violation reported as an error (run
/// the command again), never a second key under one id.
pub async fn create(conn: &mut PgConnection, customer: &str) -> Result<IssuedKey, ApiKeyError> {
    let customer = validate_customer(customer)?;
    let id = random_hex::<ID_BYTES>()?;
    let key = format!("{PREFIX}{id}_{}", random_hex::<SECRET_BYTES>()?);
    sqlx::query("INSERT INTO api_keys (id, customer_id, key_hash) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(customer)
        .bind(&hash(&key)[..])
        .execute(conn)
        .await?;
    Ok(IssuedKey {
        id,
        customer_id: customer.to_owned(),
        key: SecretString::from(key),
    })
}

/// [`create`] on a connection of its own to `database_url` (checkout's database, as a role
/// allowed the INSERT): for harnesses that hold a URL, not a connection.
pub async fn issue(database_url: &str, customer: &str) -> Result<IssuedKey, ApiKeyError> {
    let mut conn = crate::connect(&SecretString::from(database_url.to_owned())).await?;
    let issued = create(&mut conn, customer).await;
    // Closing is courtesy to the server; the key is issued (or not) either way.
    let _ = sqlx::Connection::close(conn).await;
    issued
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_hash_is_sha256_of_the_whole_key() {
        // The same vector is pinned in checkout's api_keys tests: both sides hash alike.
        let key = format!("keel_000000000000_{}", "0".repeat(64));
        let hex: String = hash(&key).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "43e2d50af586116a835f23d07e4da66c849e5c9150a37437f5e3f7206aa8628b"
        );
    }

    #[test]
    fn random_parts_are_lowercase_hex_of_the_right_length_and_differ() {
        let (a, b) = (
            random_hex::<SECRET_BYTES>().ok(),
            random_hex::<SECRET_BYTES>().ok(),
        );
        let a = a.unwrap_or_default();
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_ne!(Some(a), b);
        assert_eq!(random_hex::<ID_BYTES>().map(|s| s.len()).ok(), Some(12));
    }

    #[test]
    fn unusable_customer_ids_are_refused() {
        for bad in ["", "   ", "a\nb", &"c".repeat(201)] {
            assert!(
                matches!(validate_customer(bad), Err(ApiKeyError::InvalidCustomer(_))),
                "{bad:?}"
            );
        }
        assert_eq!(validate_customer("cus_123").ok(), Some("cus_123"));
    }
}
