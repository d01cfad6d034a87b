//! Webhook endpoints: what a customer registers (a URL and the event types it wants), the
//! checks a registration passes, and the `webhook_endpoints` table's SQL (migrations/0005).
//!
//! A registration is refused, with the field and the reason, when the URL is not `https://`
//! (unless `webhooks.allow_http`), carries user-info, or names a host that resolves to a
//! forbidden address (loopback, private, link-local, metadata: `keel_http::client`'s
//! [`EgressPolicy`], the same policy every delivery is held to again, on the connection it
//! uses); or when an event type is unknown. Failing early is for the customer: a URL that
//! can never be delivered to is better refused than silently failed for a day.
//!
//! Must not break: an endpoint is only ever read or changed together with its owner's
//! customer id (`WHERE customer_id = $n`), so one customer can neither see nor delete
//! another's; and the secret leaves this module only in [`Registered`], once.

use chrono::{DateTime, Utc};
use keel_events::order::{EventType, State};
use keel_http::client::EgressPolicy;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use url::Url;
use uuid::Uuid;

use crate::error::FieldError;

/// The event types an endpoint may subscribe to: one per final order state, as the
/// notification that announces it (`order.confirmed`, `order.rejected`,
/// `order.payment_declined`, `order.payment_failed`).
pub fn event_types() -> impl Iterator<Item = String> {
    EventType::ALL
        .into_iter()
        .filter(|k| k.is_final())
        .map(|k| event_type_for(k.state()))
}

/// The webhook event type of a notification announcing `state`.
pub fn event_type_for(state: State) -> String {
    format!("order.{}", state.as_str().to_ascii_lowercase())
}

/// Longest URL accepted (the column's bound).
const MAX_URL_LEN: usize = 2048;
/// Most event types one endpoint lists (the column's bound).
const MAX_EVENT_TYPES: usize = 16;

/// A valid registration request.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: Url,
    pub event_types: Vec<String>,
}

/// The body of `POST /v1/webhook-endpoints`; unknown members are refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub url: String,
    pub event_types: Vec<String>,
}

impl RegisterBody {
    /// Every rule that needs no network: the URL's form and the event types. All broken
    /// fields are reported at once.
    pub fn validate(self, allow_http: bool) -> Result<NewEndpoint, Vec<FieldError>> {
        let mut errors = Vec::new();
        let url = match Url::parse(&self.url) {
            _ if self.url.len() > MAX_URL_LEN => {
                errors.push(FieldError::new("url", "must be at most 2048 bytes"));
                None
            }
            Ok(url) if url.scheme() == "https" || (allow_http && url.scheme() == "http") => {
                if url.as_str().len() > MAX_URL_LEN {
                    // Normalised (percent-encoded), it is what would be stored.
                    errors.push(FieldError::new("url", "must be at most 2048 bytes"));
                    None
                } else if !url.username().is_empty() || url.password().is_some() {
                    errors.push(FieldError::new("url", "must not carry user-info"));
                    None
                } else if url.fragment().is_some() {
                    errors.push(FieldError::new("url", "must not have a fragment"));
                    None
                } else {
                    Some(url)
                }
            }
            Ok(_) => {
                errors.push(FieldError::new(
                    "url",
                    if allow_http {
                        "must be an http:// or https:// URL"
                    } else {
                        "must be an https:// URL"
                    },
                ));
                None
            }
            Err(e) => {
                errors.push(FieldError::new("url", format!("is not a URL: {e}")));
                None
            }
        };
        let known: Vec<String> = event_types().collect();
        if self.event_types.is_empty() || self.event_types.len() > MAX_EVENT_TYPES {
            errors.push(FieldError::new(
                "event_types",
                "must list 1 to 16 event types",
            ));
        }
        for (i, t) in self.event_types.iter().enumerate() {
            if !known.contains(t) {
                errors.push(FieldError::new(
                    format!("event_types[{i}]"),
                    format!("unknown event type; known: {}", known.join(", ")),
                ));
            }
        }
        let mut event_types = self.event_types;
        event_types.sort();
        event_types.dedup();
        match url {
            Some(url) if errors.is_empty() => Ok(NewEndpoint { url, event_types }),
            _ => Err(errors),
        }
    }
}

impl NewEndpoint {
    /// The network rule: where the URL's host resolves now must be an allowed destination.
    /// (Checked again on every delivery's own connection: a name may resolve elsewhere
    /// later.)
    pub async fn check_destination(&self, policy: &EgressPolicy) -> Result<(), FieldError> {
        policy
            .check_url(&self.url)
            .await
            .map_err(|e| FieldError::new("url", e.to_string()))
    }
}

/// An endpoint as its owner sees it (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Since when every attempt to it has failed (`null` while it is healthy).
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was disabled for failing `webhooks.disable_after`, and why.
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

/// The answer to a registration: the endpoint and, this once, its signing secret. `Debug`
/// leaves the secret out.
#[derive(Serialize)]
pub struct Registered {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// `whsec_...`: verify each delivery's `webhook-signature` with it (Standard Webhooks).
    /// Shown only in this answer.
    pub secret: String,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str =
    "id, url, event_types, created_at, failing_since, disabled_at, disabled_reason";

/// Why a registration was not stored.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("the customer already has {0} endpoints")]
    TooMany(i64),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Stores `new` for `customer` with `secret`, unless the customer already has `max` live
/// endpoints. One transaction, the customer's rows locked, so two registrations at once
/// cannot both pass the count.
pub async fn insert(
    pool: &PgPool,
    customer: &str,
    new: &NewEndpoint,
    secret: &str,
    max: i64,
) -> Result<Endpoint, InsertError> {
    let mut tx = pool.begin().await?;
    // A transaction-scoped advisory lock per customer (pgbouncer's transaction mode keeps it
    // for exactly this transaction): serialises this customer's registrations only.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('webhook_endpoints:' || $1))")
        .bind(customer)
        .execute(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_endpoints WHERE customer_id = $1 AND deleted_at IS NULL",
    )
    .bind(customer)
    .fetch_one(&mut *tx)
    .await?;
    if live >= max {
        return Err(InsertError::TooMany(live));
    }
    let endpoint = sqlx::query_as::<_, Endpoint>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_endpoints (id, customer_id, url, event_types, secret)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(customer)
    .bind(new.url.as_str())
    .bind(&new.event_types)
    .bind(secret)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(endpoint)
}

/// The customer's live endpoints, oldest first, at most `limit`.
pub async fn list(pool: &PgPool, customer: &str, limit: i64) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_endpoints
          WHERE customer_id = $1 AND deleted_at IS NULL
          ORDER BY created_at, id LIMIT $2"
    )))
    .bind(customer)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One of the customer's live endpoints.
pub async fn get(pool: &PgPool, customer: &str, id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_endpoints
          WHERE id = $1 AND customer_id = $2 AND deleted_at IS NULL"
    )))
    .bind(id)
    .bind(customer)
    .fetch_optional(pool)
    .await
}

/// Deletes one of the customer's endpoints (no more deliveries; its history stays). `false`
/// if the customer has no such live endpoint.
pub async fn delete(pool: &PgPool, customer: &str, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET deleted_at = now()
          WHERE id = $1 AND customer_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(customer)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The endpoints a notification of `event_type` for `customer` goes to: live, enabled, and
/// subscribed to the type. Inside the consumer's transaction.
pub async fn subscribed(
    conn: &mut PgConnection,
    customer: &str,
    event_type: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM webhook_endpoints
          WHERE customer_id = $1 AND $2 = ANY (event_types)
            AND deleted_at IS NULL AND disabled_at IS NULL",
    )
    .bind(customer)
    .bind(event_type)
    .fetch_all(conn)
    .await
}

/// What the email telling an owner about a disabled endpoint needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwnerEmail {
    pub id: Uuid,
    pub customer_id: String,
    pub url: String,
    pub disabled_reason: Option<String>,
    pub owner_told_at: Option<DateTime<Utc>>,
}

/// Endpoint `id` as that email needs it.
pub async fn for_owner_email(pool: &PgPool, id: Uuid) -> Result<Option<OwnerEmail>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, customer_id, url, disabled_reason, owner_told_at
           FROM webhook_endpoints WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Records that the owner's email was accepted (the first time is kept).
pub async fn mark_owner_told(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET owner_told_at = now()
          WHERE id = $1 AND owner_told_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn body(url: &str, types: &[&str]) -> RegisterBody {
        RegisterBody {
            url: url.to_owned(),
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn the_event_types_are_the_final_order_states() {
        let all: Vec<String> = event_types().collect();
        assert_eq!(
            all,
            [
                "order.confirmed",
                "order.rejected",
                "order.payment_declined",
                "order.payment_failed"
            ]
        );
    }

    #[test]
    fn a_valid_registration_is_deduplicated_and_sorted() {
        let new = body(
            "https://hooks.example.com/keel",
            &["order.rejected", "order.confirmed", "order.rejected"],
        )
        .validate(false)
        .unwrap();
        assert_eq!(new.event_types, ["order.confirmed", "order.rejected"]);
    }

    #[test]
    fn every_broken_field_is_reported_at_once() {
        let errors = body("http://hooks.example.com/", &["order.shipped"])
            .validate(false)
            .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["url", "event_types[0]"]);
        assert!(errors[0].message.contains("https://"), "{errors:?}");
        // Plain HTTP only when development allows it; user-info never.
        assert!(
            body("http://h.example/", &["order.confirmed"])
                .validate(true)
                .is_ok()
        );
        for bad in [
            "https://u:p@h.example/",
            "ftp://h.example/",
            "not a url",
            "https://h.example/#x",
        ] {
            assert!(
                body(bad, &["order.confirmed"]).validate(true).is_err(),
                "{bad}"
            );
        }
        assert!(body("https://h.example/", &[]).validate(false).is_err());
    }
}
