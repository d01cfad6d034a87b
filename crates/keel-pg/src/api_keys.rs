//! Customer API keys: `Authorization: Bearer keel_<id>_<secret>` on a service's public API.
//! Issued by the operator ([`issue`], `keelctl api-keys create`), verified by a service on every
//! request ([`verify`], through `keel_service::api_keys::ApiKey`), revoked by the operator
//! ([`revoke`], `keelctl api-keys revoke`). The table is the platform's, `customer_api_keys`
//! (`migrations/0009_customer_api_keys.sql`); the threat model is in docs/security.md.
//!
//! A key belongs to one customer, and a request made with it acts for that customer: the
//! customer comes from the key, never from a request's body. Each service's database holds its
//! own keys, so a key is valid on the API of the service it was issued for and nowhere else.
//!
//! Issuing and verifying live in this one module on purpose: keelctl and the services share
//! the format and the hash by sharing this code, and the pinned vector in the tests below
//! keeps the hash from changing under keys already issued.
//!
//! A key is `keel_<id>_<secret>`:
//! - `keel_` ([`PREFIX`]): a fixed prefix, so a leaked key is recognisable (secret scanners,
//!   log filters);
//! - `<id>`: 12 lowercase hex digits (6 random bytes), the row's primary key. Not secret: it is
//!   how operators and logs name a key, and how a service finds the row without a hash index;
//! - `<secret>`: 64 lowercase hex digits, 32 bytes from the operating system's CSPRNG.
//!
//! Stored: SHA-256 of the whole key ([`hash`]). Not argon2 or bcrypt: those are slow on purpose
//! because a password has little entropy and falls to a list of likely guesses; a key of 256
//! random bits has no such list, so one fast hash is already beyond brute force, and each
//! request costs one cheap hash instead of a deliberately expensive one (which would also give
//! an attacker a CPU and memory lever on every unauthenticated request).
//!
//! Verification, per request: parse the token (a malformed key never reaches the database),
//! load the row by `id`, compare its hash with SHA-256 of the presented key in constant time,
//! refuse a revoked key. Every failure is a [`Rejection`]: the client is told whether the key
//! was missing or invalid ([`Rejection::no_credentials`]), never which check an invalid key
//! failed ([`Rejection::reason`] is for the `api_key_rejections_total{reason}` metric).
//!
//! Privileges (P14): the app role only reads this table; `keel_operator` may insert the three
//! columns [`issue`] writes and set `revoked_at` as [`revoke`] does, and cannot read a hash.
//!
//! Must not break: the key, or any part of its secret, is never logged, stored or returned;
//! only its `id` is. It exists only in the [`IssuedKey`] returned to the operator, once.

use keel_config::{ExposeSecret, SecretString};
use keel_events::CustomerId;
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;

/// Every key starts with this (recognisable to secret scanners and log filters).
pub const PREFIX: &str = "keel_";
/// Random bytes in a key's id (12 hex digits).
pub const ID_BYTES: usize = 6;
/// Random bytes in a key's secret (64 hex digits).
pub const SECRET_BYTES: usize = 32;
/// Longest customer id (`customer_api_keys.customer_id` allows 200 characters).
pub const MAX_CUSTOMER_CHARS: usize = 200;

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No `Authorization` header.
    #[error("no Authorization header")]
    Missing,
    /// An `Authorization` header of another scheme than `Bearer`.
    #[error("not a bearer token")]
    NotBearer,
    /// A bearer token that is not a Keel API key.
    #[error("not a Keel API key")]
    Malformed,
    /// A well-formed key whose id is not in `customer_api_keys`.
    #[error("unknown API key")]
    Unknown,
    /// A key whose id exists with another secret.
    #[error("wrong secret for the API key's id")]
    WrongSecret,
    /// A valid key, revoked.
    #[error("revoked API key")]
    Revoked,
}

impl Rejection {
    /// The metric label: operators see which check failed, clients do not.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer => "not_bearer",
            Self::Malformed => "malformed",
            Self::Unknown => "unknown",
            Self::WrongSecret => "wrong_secret",
            Self::Revoked => "revoked",
        }
    }

    /// Whether the client sent no usable credentials at all (RFC 6750: then the challenge
    /// carries no error code), as opposed to an invalid key.
    pub fn no_credentials(self) -> bool {
        matches!(self, Self::Missing | Self::NotBearer)
    }
}

/// A key as presented: the id to look up and the whole key to hash. `Debug` shows the id only.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a> {
    id: &'a str,
    key: &'a str,
}

impl std::fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl<'a> PresentedKey<'a> {
    /// Parses `keel_<12 hex>_<64 hex>`.
    pub fn parse(key: &'a str) -> Result<Self, Rejection> {
        let (id, secret) = key
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .ok_or(Rejection::Malformed)?;
        if lower_hex(id, 2 * ID_BYTES) && lower_hex(secret, 2 * SECRET_BYTES) {
            Ok(Self { id, key })
        } else {
            Err(Rejection::Malformed)
        }
    }

    /// The key's non-secret id.
    pub fn id(&self) -> &'a str {
        self.id
    }
}

/// SHA-256 of the whole key, as stored in `customer_api_keys.key_hash`.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The caller, authenticated: the customer its key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Every request made with the key acts for this customer.
    pub customer: CustomerId,
    /// The key's non-secret id, for logs.
    pub key_id: String,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    customer_id: String,
    key_hash: Vec<u8>,
    revoked: bool,
}

/// Verifies `token`, the bearer token of a request, against `customer_api_keys` (one
/// primary-key lookup; none for a token that is not a key). The outer error is the database's,
/// which a service answers like any other database failure (503 or 500), never as a 401; the
/// inner one says why the key is refused.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool, token: &str) -> Result<(), sqlx::Error> {
/// match keel_pg::api_keys::verify(&pool, token).await? {
///     Ok(caller) => println!("customer {}", caller.customer),
///     Err(rejection) => println!("401 ({})", rejection.reason()),
/// }
/// # Ok(())
/// # }
/// ```
pub async fn verify(
    pool: &PgPool,
    token: &str,
) -> Result<Result<Authenticated, Rejection>, sqlx::Error> {
    let presented = match PresentedKey::parse(token) {
        Ok(presented) => presented,
        Err(rejection) => return Ok(Err(rejection)),
    };
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT customer_id, key_hash, revoked_at IS NOT NULL AS revoked
           FROM customer_api_keys WHERE id = $1",
    )
    .bind(presented.id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(Err(Rejection::Unknown));
    };
    // Constant time: how long the comparison takes says nothing about how many leading bytes
    // matched. (With SHA-256 on both sides that would help an attacker little, since they cannot
    // steer the hash of a guess; the habit costs nothing and survives a change of scheme.)
    if !bool::from(hash(presented.key).ct_eq(&row.key_hash[..])) {
        return Ok(Err(Rejection::WrongSecret));
    }
    if row.revoked {
        return Ok(Err(Rejection::Revoked));
    }
    Ok(Ok(Authenticated {
        customer: CustomerId::from(row.customer_id),
        key_id: presented.id.to_owned(),
    }))
}

/// Why a key could not be issued or revoked.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The customer id is unusable; the reason says why (a usage error for a command line).
    #[error("customer id {0}")]
    InvalidCustomer(&'static str),
    /// Not a key's id (12 lowercase hex digits).
    #[error("an API key's id is 12 lowercase hex digits (the part after `keel_`)")]
    InvalidId,
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("database: {0}")]
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

/// A customer id as stored: 1 to 200 characters, not blank, no control characters (it is
/// printed in logs and tables). Checked before anything is written, so a command line can
/// refuse it as a usage error.
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
    Err(ApiKeyError::InvalidCustomer(why))
}

/// A key's id as stored: 12 lowercase hex digits.
pub fn validate_id(id: &str) -> Result<&str, ApiKeyError> {
    if lower_hex(id, 2 * ID_BYTES) {
        Ok(id)
    } else {
        Err(ApiKeyError::InvalidId)
    }
}

fn random_hex<const N: usize>() -> Result<String, ApiKeyError> {
    let mut bytes = [0u8; N];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ApiKeyError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Issues a key for `customer`: one INSERT on `conn`, a connection to the database of the
/// service whose API the key is for (as `keel_operator`, or the owner).
///
/// The INSERT has no RETURNING and uses no sequence: the only privilege it needs is
/// `INSERT (id, customer_id, key_hash)`. Two keys drawing the same 48-bit id is a primary-key
/// violation reported as an error (issue again), never a second key under one id.
pub async fn issue(conn: &mut PgConnection, customer: &str) -> Result<IssuedKey, ApiKeyError> {
    let customer = validate_customer(customer)?;
    let id = random_hex::<ID_BYTES>()?;
    let key = format!("{PREFIX}{id}_{}", random_hex::<SECRET_BYTES>()?);
    sqlx::query("INSERT INTO customer_api_keys (id, customer_id, key_hash) VALUES ($1, $2, $3)")
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

/// Revokes the key `id` on `conn` (the service's database, as `keel_operator` or the owner):
/// every request made with it is refused from the next one on. `false` when there is no
/// unrevoked key of that id (unknown, or revoked already; a revocation is never moved later).
/// The row stays, so log lines naming the key can still be traced to its customer.
pub async fn revoke(conn: &mut PgConnection, id: &str) -> Result<bool, ApiKeyError> {
    let id = validate_id(id)?;
    let done = sqlx::query(
        "UPDATE customer_api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> String {
        format!("keel_0123456789ab_{}", "f".repeat(64))
    }

    #[test]
    fn the_stored_hash_is_sha256_of_the_whole_key() {
        // Pinned: keys already issued are stored under this hash, so it can never change.
        let key = format!("keel_000000000000_{}", "0".repeat(64));
        let hex: String = hash(&key).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "43e2d50af586116a835f23d07e4da66c849e5c9150a37437f5e3f7206aa8628b"
        );
    }

    #[test]
    fn only_the_keel_format_parses() {
        let key = valid();
        assert_eq!(
            PresentedKey::parse(&key).map(|k| k.id()),
            Ok("0123456789ab")
        );
        let secret = "f".repeat(64);
        for bad in [
            String::new(),
            "keel_".to_owned(),
            format!("sk_0123456789ab_{secret}"),
            format!("keel_0123456789AB_{secret}"),
            format!("keel_0123456789a_{secret}"),
            format!("keel_0123456789ab_{}", "f".repeat(63)),
            format!("keel_0123456789ab_{secret}f"),
            format!("keel_0123456789ab-{secret}"),
            format!("keel_0123456789ab_{}g", "f".repeat(63)),
        ] {
            assert_eq!(
                PresentedKey::parse(&bad).map(|k| k.id().to_owned()),
                Err(Rejection::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_debug_form_never_shows_the_secret() {
        let key = valid();
        let shown = format!("{:?}", PresentedKey::parse(&key));
        assert!(shown.contains("0123456789ab"));
        assert!(!shown.contains("ffff"), "{shown}");
    }

    #[test]
    fn random_parts_are_lowercase_hex_of_the_right_length_and_differ() {
        let (a, b) = (
            random_hex::<SECRET_BYTES>().ok(),
            random_hex::<SECRET_BYTES>().ok(),
        );
        let a = a.unwrap_or_default();
        assert!(lower_hex(&a, 64), "{a}");
        assert_ne!(Some(a), b);
        assert_eq!(random_hex::<ID_BYTES>().map(|s| s.len()).ok(), Some(12));
    }

    #[test]
    fn an_issued_key_parses_back_to_its_id() {
        let id = random_hex::<ID_BYTES>().unwrap_or_default();
        let key = format!(
            "{PREFIX}{id}_{}",
            random_hex::<SECRET_BYTES>().unwrap_or_default()
        );
        assert_eq!(PresentedKey::parse(&key).map(|k| k.id()), Ok(id.as_str()));
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
        assert_eq!(
            validate_customer(&"c".repeat(200)).map(str::len).ok(),
            Some(200)
        );
    }

    #[test]
    fn only_a_key_id_is_a_key_id() {
        assert_eq!(validate_id("0123456789ab").ok(), Some("0123456789ab"));
        for bad in ["", "0123456789AB", "0123456789a", &valid()] {
            assert!(
                matches!(validate_id(bad), Err(ApiKeyError::InvalidId)),
                "{bad}"
            );
        }
    }
}
