//! The HTTP side of idempotency keys (P13), the same for every service's `POST`: the header
//! names, what a usable key is, and the replay marker. What a key *does* (one stored answer
//! per key, a mismatch refused) is `keel_pg::idempotency`; which error document a bad key
//! becomes is the service's `ApiError`, which knows what the key is for.

use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The request header carrying the client's idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Set on a response that was stored earlier and is being replayed.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest idempotency key accepted (UUIDs and similar fit many times over).
pub const MAX_KEY_LEN: usize = 255;

/// Why a request's idempotency key cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// No `Idempotency-Key` header.
    Missing,
    /// Empty, too long, or not visible ASCII.
    Unusable,
}

impl KeyError {
    /// What a client is told about an unusable key.
    pub const UNUSABLE: &'static str =
        "the Idempotency-Key must be 1 to 255 visible ASCII characters";
}

/// The request's idempotency key: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<&str, KeyError> {
    let value = headers.get(&IDEMPOTENCY_KEY).ok_or(KeyError::Missing)?;
    let key = value.to_str().unwrap_or_default();
    let usable =
        (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if usable {
        Ok(key)
    } else {
        Err(KeyError::Unusable)
    }
}

/// Whether the request says its body is `application/json` (parameters such as `charset`
/// allowed): a body stored under an idempotency key must be the JSON it claims to be.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Marks `response` as the stored answer of an earlier request with the same key.
pub fn mark_replayed(response: &mut Response) {
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            &IDEMPOTENCY_KEY,
            HeaderValue::from_str(key).expect("header value"),
        );
        h
    }

    #[test]
    fn a_key_is_one_to_255_visible_ascii_characters() {
        assert_eq!(key(&HeaderMap::new()), Err(KeyError::Missing));
        assert_eq!(key(&headers("")), Err(KeyError::Unusable));
        assert_eq!(key(&headers("a b")), Err(KeyError::Unusable));
        assert_eq!(key(&headers(&"k".repeat(256))), Err(KeyError::Unusable));
        assert_eq!(key(&headers(&"k".repeat(255))).map(str::len), Ok(255));
        assert_eq!(key(&headers("saga-1:authorize")), Ok("saga-1:authorize"));
    }

    #[test]
    fn json_is_recognised_with_parameters_and_in_any_case() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
    }
}
