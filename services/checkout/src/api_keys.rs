//! Who is calling: API keys (`Authorization: Bearer keel_…`) and the [`Authenticated`]
//! extractor of the orders API. Details for clients are in `openapi.yaml`; the threat model in
//! docs/security.md.
//!
//! A key belongs to one customer, and a request made with it acts for that customer: the
//! customer comes from the key, never from the body (a `customer_id` member is refused as an
//! unknown field), and an order is shown only to the customer who placed it.
//!
//! Keys are issued by the operator, `keelctl api-keys create --customer <id>`
//! (`crates/keelctl/src/api_keys.rs`), which prints the key once; this service only verifies
//! them. The two share no code (keelctl never links a service), only the table
//! (`migrations/0005_api_keys.sql`) and the format, `keel_<id>_<secret>`: `id` is 12 hex
//! digits, not secret, the row's primary key and how logs name a key; `secret` is 64 hex
//! digits (32 bytes from the OS CSPRNG). The tests issue every key through keelctl's function,
//! so a change on one side alone fails them.
//!
//! Stored: SHA-256 of the whole key. Not argon2 or bcrypt: those are slow on purpose because
//! a password has little entropy and falls to a list of likely guesses; a key of 256 random
//! bits has no such list, so one fast hash is already beyond brute force, and each request
//! costs one cheap hash instead of a deliberately expensive one (which would also give an
//! attacker a CPU and memory lever on every unauthenticated request).
//!
//! Verification, per request: parse the header (a malformed key never reaches the
//! database), load the row by `id`, compare its hash with SHA-256 of the presented key in
//! constant time, refuse a revoked key. Every failure is the same 401 problem
//! (`unauthenticated`) with `WWW-Authenticate: Bearer`; the client is told whether the key
//! was missing or invalid, never which check an invalid key failed (the
//! `api_key_rejections_total{reason}` metric tells operators).
//!
//! Must not break: the key, or any part of its secret, is never logged, stored or returned;
//! only its `id` is.

use axum::extract::{FromRef, FromRequestParts};
use http::HeaderMap;
use http::request::Parts;
use keel_events::CustomerId;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Every key starts with this (recognisable to secret scanners and log filters).
pub const PREFIX: &str = "keel_";
/// Hex digits of a key's id.
const ID_LEN: usize = 12;
/// Hex digits of a key's secret.
const SECRET_LEN: usize = 64;

/// Why a request is not authenticated. Each is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header of another scheme than `Bearer`.
    NotBearer,
    /// A bearer token that is not a Keel API key.
    Malformed,
    /// A well-formed key whose id is not in `api_keys`.
    Unknown,
    /// A key whose id exists with another secret.
    WrongSecret,
    /// A valid key, revoked.
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
        if lower_hex(id, ID_LEN) && lower_hex(secret, SECRET_LEN) {
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

/// SHA-256 of the whole key, as stored in `api_keys.key_hash`.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The bearer token of `headers` (RFC 6750 §2.1: `Authorization: Bearer <token>`, the scheme
/// in any case).
pub fn bearer(headers: &HeaderMap) -> Result<&str, Rejection> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(Rejection::Missing)?;
    let value = value.to_str().map_err(|_| Rejection::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(Rejection::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Rejection::NotBearer);
    }
    Ok(token.trim())
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

/// Authenticates the request whose headers are `headers` against `api_keys` (one primary-key
/// lookup). A database failure is a 503/500 like any other, never a 401.
pub async fn authenticate(pool: &PgPool, headers: &HeaderMap) -> Result<Authenticated, ApiError> {
    let outcome = match bearer(headers).and_then(PresentedKey::parse) {
        Ok(presented) => verify(pool, presented).await?,
        Err(rejection) => Err(rejection),
    };
    outcome.map_err(|rejection| {
        metrics::counter!("api_key_rejections_total", "reason" => rejection.reason()).increment(1);
        ApiError::Unauthenticated(rejection)
    })
}

async fn verify(
    pool: &PgPool,
    presented: PresentedKey<'_>,
) -> Result<Result<Authenticated, Rejection>, ApiError> {
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT customer_id, key_hash, revoked_at IS NOT NULL AS revoked
           FROM api_keys WHERE id = $1",
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

/// Handlers that take an [`Authenticated`] run only for a valid key; every other request is
/// answered 401 before the handler (and before its body is read).
impl<S> FromRequestParts<S> for Authenticated
where
    S: Send + Sync,
    PgPool: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        authenticate(&PgPool::from_ref(state), &parts.headers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn valid() -> String {
        format!("keel_0123456789ab_{}", "f".repeat(64))
    }

    #[test]
    fn the_stored_hash_is_sha256_of_the_whole_key() {
        // The same vector is pinned in keelctl's api_keys tests: both sides hash alike.
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
    fn the_bearer_scheme_is_required_in_any_case() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(Rejection::Missing));
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        assert_eq!(bearer(&h), Err(Rejection::NotBearer));
        h.insert("authorization", HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&h), Err(Rejection::NotBearer));
        h.insert("authorization", HeaderValue::from_static("bEaReR  abc "));
        assert_eq!(bearer(&h), Ok("abc"));
    }
}
