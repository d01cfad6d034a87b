//! Idempotency keys on the provider side (P13): the `Idempotency-Key` header every mutating
//! call must carry, and the in-memory store of answers behind it.
//!
//! Billing retries calls whose answer it did not get (a timeout, a dropped connection). The
//! key is what makes that safe: the same key with the same request gets the stored status and
//! body back (marked `Idempotent-Replayed: true`) and no second effect; the same key with a
//! different request is refused with 422, because running either one would be a guess; a
//! second request while the first is still running gets 409.
//!
//! What is stored, and the rule not to break: only *final* answers (2xx and 4xx). A 5xx, or a
//! request that never finished (client gone, request timeout, shutdown), releases the key so
//! a retry runs again — otherwise one blip would be replayed to the client forever. The store
//! counts those failed attempts per key; `tok_flaky` reads that count.
//!
//! Keys are remembered per process, oldest forgotten first (`store.max_idempotency_keys`);
//! a real provider keeps them for a time (24 h is common) in a database.

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::error::ApiError;
use crate::store::{BoundedMap, lock};

/// The request header carrying the key.
pub const HEADER: &str = "idempotency-key";

/// Set on an answer that was replayed from the store rather than produced now.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Longest key accepted; a UUID or a `saga-id:step` pair fits with room to spare.
const MAX_KEY_LEN: usize = 255;

/// A caller's idempotency key: 1 to 255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a header value into a key.
    pub fn parse(value: &HeaderValue) -> Result<Self, ApiError> {
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
            return Err(ApiError::IdempotencyKeyInvalid(
                "Idempotency-Key must be 1 to 255 characters",
            ));
        }
        match value.to_str() {
            Ok(s) if s.bytes().all(|b| b.is_ascii_graphic()) => Ok(Self(s.to_owned())),
            _ => Err(ApiError::IdempotencyKeyInvalid(
                "Idempotency-Key must be printable ASCII without spaces",
            )),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match parts.headers.get(HEADER) {
            Some(v) => Self::parse(v),
            None => Err(ApiError::IdempotencyKeyInvalid(
                "every mutating call needs an Idempotency-Key header",
            )),
        }
    }
}

/// An answer as the store keeps it: enough to produce the same response again.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    body: serde_json::Value,
    problem: bool,
    location: Option<String>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Self {
        Self {
            status,
            // Serializing our own plain structs cannot fail; `Null` would only hide a bug.
            body: serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
            problem: false,
            location: None,
        }
    }

    /// Adds a `Location` header.
    #[must_use]
    pub fn with_location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Self {
        let problem = e.problem();
        Self {
            status: e.status(),
            body: serde_json::to_value(&problem).unwrap_or(serde_json::Value::Null),
            problem: true,
            location: None,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        let headers = response.headers_mut();
        if self.problem {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(keel_http::problem::CONTENT_TYPE),
            );
        }
        if let Some(location) = self.location
            && let Ok(v) = HeaderValue::from_str(&location)
        {
            headers.insert(header::LOCATION, v);
        }
        response
    }
}

/// Remembered answers by key. `F` is the request's fingerprint: what "the same request"
/// means (for psp-sim, the operation and its parsed body).
#[derive(Debug)]
pub struct IdempotencyStore<F> {
    entries: Arc<Mutex<BoundedMap<IdempotencyKey, Entry<F>>>>,
}

#[derive(Debug)]
struct Entry<F> {
    fingerprint: F,
    state: State,
    /// Attempts with this key that ended in a 5xx or never finished.
    failed_attempts: u32,
}

#[derive(Debug)]
enum State {
    Running,
    Retryable,
    Done(Reply),
}

/// What to do with a request, decided under the store's lock.
#[derive(Debug)]
pub enum Begin<F> {
    /// First time (or a retry after a 5xx): run it, then [`Attempt::finish`].
    Run(Attempt<F>),
    /// Answered before: send this again.
    Replay(Reply),
    /// Same key, different request.
    Mismatch,
    /// Same key, first request still running.
    InProgress,
}

impl<F: PartialEq> IdempotencyStore<F> {
    /// A store remembering at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Arc::new(Mutex::new(BoundedMap::new("idempotency_keys", capacity))),
        }
    }

    /// Claims `key` for a request with `fingerprint`, or says why not.
    pub fn begin(&self, key: IdempotencyKey, fingerprint: F) -> Begin<F> {
        let mut entries = lock(&self.entries);
        let failed_attempts = match entries.get_mut(&key) {
            None => {
                entries.insert(
                    key.clone(),
                    Entry {
                        fingerprint,
                        state: State::Running,
                        failed_attempts: 0,
                    },
                );
                0
            }
            Some(entry) if entry.fingerprint != fingerprint => return Begin::Mismatch,
            Some(entry) => match &entry.state {
                State::Running => return Begin::InProgress,
                State::Done(reply) => {
                    metrics::counter!("psp_idempotent_replays_total").increment(1);
                    return Begin::Replay(reply.clone());
                }
                State::Retryable => {
                    entry.state = State::Running;
                    entry.failed_attempts
                }
            },
        };
        Begin::Run(Attempt {
            entries: Arc::clone(&self.entries),
            key,
            number: failed_attempts + 1,
            finished: false,
        })
    }

    /// Runs `op` once per key: replays, refuses or runs it and stores a final answer.
    /// `op` gets the attempt number for this key (1 for the first).
    pub async fn run<Fut>(
        &self,
        key: IdempotencyKey,
        fingerprint: F,
        op: impl FnOnce(u32) -> Fut,
    ) -> Response
    where
        Fut: Future<Output = Result<Reply, ApiError>>,
    {
        match self.begin(key, fingerprint) {
            Begin::Replay(reply) => {
                let mut response = reply.into_response();
                response
                    .headers_mut()
                    .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                response
            }
            Begin::Mismatch => ApiError::IdempotencyKeyReused.into_response(),
            Begin::InProgress => ApiError::IdempotencyKeyInUse.into_response(),
            Begin::Run(attempt) => {
                // If this future is dropped here (client gone, request timeout), `attempt`'s
                // Drop releases the key.
                let reply = op(attempt.number()).await.unwrap_or_else(Reply::from);
                attempt.finish(&reply);
                reply.into_response()
            }
        }
    }
}

/// A claimed key. Finish it with the answer; dropping it unfinished counts a failed attempt
/// and releases the key for a retry.
#[derive(Debug)]
pub struct Attempt<F> {
    entries: Arc<Mutex<BoundedMap<IdempotencyKey, Entry<F>>>>,
    key: IdempotencyKey,
    number: u32,
    finished: bool,
}

impl<F> Attempt<F> {
    /// 1 for the first attempt with this key, 2 after one failed attempt, ...
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Stores a final answer, or releases the key after a retryable one.
    pub fn finish(mut self, reply: &Reply) {
        self.finished = true;
        let final_answer = !reply.status().is_server_error();
        self.settle(final_answer.then(|| reply.clone()));
    }

    fn settle(&self, answer: Option<Reply>) {
        let mut entries = lock(&self.entries);
        // The entry may have been evicted while the request ran; then there is nothing to keep.
        if let Some(entry) = entries.get_mut(&self.key) {
            match answer {
                Some(reply) => entry.state = State::Done(reply),
                None => {
                    entry.state = State::Retryable;
                    entry.failed_attempts = entry.failed_attempts.saturating_add(1);
                }
            }
        }
    }
}

impl<F> Drop for Attempt<F> {
    fn drop(&mut self) {
        if !self.finished {
            self.settle(None);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::parse(&HeaderValue::from_str(s).unwrap()).unwrap()
    }

    #[test]
    fn an_unfinished_attempt_releases_the_key_and_counts_as_failed() {
        let store = IdempotencyStore::new(10);
        let Begin::Run(first) = store.begin(key("k"), 1) else {
            panic!("first use runs")
        };
        assert!(matches!(store.begin(key("k"), 1), Begin::InProgress));
        drop(first);
        let Begin::Run(second) = store.begin(key("k"), 1) else {
            panic!("released key runs again")
        };
        assert_eq!(second.number(), 2);
        second.finish(&Reply::json(StatusCode::CREATED, &"ok"));
        assert!(matches!(store.begin(key("k"), 1), Begin::Replay(_)));
        assert!(matches!(store.begin(key("k"), 2), Begin::Mismatch));
    }

    #[test]
    fn keys_must_be_printable_ascii_of_bounded_length() {
        assert!(IdempotencyKey::parse(&HeaderValue::from_static("")).is_err());
        assert!(IdempotencyKey::parse(&HeaderValue::from_static("a b")).is_err());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(IdempotencyKey::parse(&HeaderValue::from_str(&long).unwrap()).is_err());
        assert!(IdempotencyKey::parse(&HeaderValue::from_static("saga-1:authorize")).is_ok());
    }
}
