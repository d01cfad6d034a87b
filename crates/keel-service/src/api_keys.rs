//! Who is calling a service's public API: the [`ApiKey`] extractor, for routes that act for a
//! customer. The key's format, its storage and its verification are `keel_pg::api_keys`; this
//! module is the HTTP side: the `Authorization: Bearer` header, the 401 and the metric.
//!
//! ```
//! use axum::{Router, routing::get};
//! use keel_service::api_keys::ApiKey;
//!
//! // `caller.customer` is whom the request acts for; `caller.key_id` names the key in logs.
//! async fn whoami(ApiKey(caller): ApiKey) -> String {
//!     caller.customer.to_string()
//! }
//!
//! fn routes(pool: sqlx::PgPool) -> Router {
//!     Router::new().route("/v1/whoami", get(whoami)).with_state(pool)
//! }
//! ```
//!
//! Any router state `S` with `PgPool: FromRef<S>` works: the key is looked up through the
//! service's runtime pool (one primary-key query on `customer_api_keys`). A handler that takes
//! an [`ApiKey`] runs only for a valid key; every other request is answered before the handler
//! runs, and before its body is read, so put `ApiKey` first in the handler's arguments.
//!
//! The answer to a refused key ([`AuthRejection`]) is the same in every service: `401`
//! problem+json, type `unauthenticated`, title "Authentication required", with
//! `WWW-Authenticate: Bearer realm="keel"` (RFC 6750 §3), plus `error="invalid_token"` when a
//! key was presented and refused. The client learns whether its key was missing or invalid,
//! never which check an invalid one failed; operators read that from
//! `api_key_rejections_total{reason}` (`keel_pg::api_keys::Rejection::reason`). A database
//! failure during the lookup is not a 401: it is the service's usual 503 (transient, with
//! `Retry-After`) or 500 ([`crate::problem::database`]).
//!
//! Each service's database holds its own keys: a key issued for one service
//! (`keelctl api-keys create --customer <id> --service <name>`) is unknown to every other.
//!
//! Must not break: the key, or any part of its secret, is never logged or returned; only its
//! id is (the `Debug` forms here hold no key).

use axum::extract::{FromRef, FromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use keel_http::Problem;
use sqlx::PgPool;

pub use keel_pg::api_keys::{Authenticated, Rejection};

/// The extractor: the caller of a request made with a valid API key (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey(pub Authenticated);

/// Why an [`ApiKey`] could not be extracted; its response is the platform's (module docs).
#[derive(Debug, thiserror::Error)]
pub enum AuthRejection {
    /// 401: no usable key, or not a valid one.
    #[error("unauthenticated: {}", .0.reason())]
    Unauthenticated(Rejection),
    /// 503 or 500: the key could not be looked up.
    #[error("API key lookup failed: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<Rejection> for AuthRejection {
    fn from(rejection: Rejection) -> Self {
        Self::Unauthenticated(rejection)
    }
}

/// The bearer token of `headers` (RFC 6750 §2.1: `Authorization: Bearer <token>`, the scheme
/// in any case).
pub fn bearer(headers: &HeaderMap) -> Result<&str, Rejection> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Rejection::Missing)?;
    let value = value.to_str().map_err(|_| Rejection::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(Rejection::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Rejection::NotBearer);
    }
    Ok(token.trim())
}

/// Authenticates the request whose headers are `headers` against `pool`'s
/// `customer_api_keys`, counting every refusal in `api_key_rejections_total{reason}`: what
/// [`ApiKey`] runs, for code that holds headers rather than a request.
pub async fn authenticate(
    pool: &PgPool,
    headers: &HeaderMap,
) -> Result<Authenticated, AuthRejection> {
    let outcome = match bearer(headers) {
        Ok(token) => keel_pg::api_keys::verify(pool, token).await?,
        Err(rejection) => Err(rejection),
    };
    outcome.map_err(|rejection| {
        metrics::counter!("api_key_rejections_total", "reason" => rejection.reason()).increment(1);
        AuthRejection::Unauthenticated(rejection)
    })
}

impl<S> FromRequestParts<S> for ApiKey
where
    S: Send + Sync,
    PgPool: FromRef<S>,
{
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        authenticate(&PgPool::from_ref(state), &parts.headers)
            .await
            .map(ApiKey)
    }
}

impl AuthRejection {
    /// The problem document (the database's cause is logged here, once).
    fn problem(&self) -> Problem {
        match self {
            Self::Unauthenticated(rejection) => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            )
            .with_detail(if rejection.no_credentials() {
                "send an API key: `Authorization: Bearer keel_...`"
            } else {
                "the API key is not valid: it is malformed, unknown or revoked"
            }),
            Self::Database(e) => crate::problem::database(e),
        }
    }
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let unavailable = problem.status == StatusCode::SERVICE_UNAVAILABLE.as_u16();
        let mut response = problem.into_response();
        if unavailable {
            // Transient (crate::problem): the client may retry, and is told when.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Self::Unauthenticated(rejection) = self {
            // RFC 6750 §3: the challenge names the scheme; `invalid_token` only when a key was
            // presented and refused.
            let challenge = if rejection.no_credentials() {
                r#"Bearer realm="keel""#
            } else {
                r#"Bearer realm="keel", error="invalid_token""#
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
