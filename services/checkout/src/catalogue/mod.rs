//! The product catalogue: `GET /v1/products`.
//!
//! A plain read through the runtime pool (pgbouncer, transaction mode). Step 4 puts the
//! stampede-safe Redis cache (P30) in front of it; the query stays here.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_problem::problem_for_db;
use serde::Serialize;
use sqlx::PgPool;

/// An amount of money in integer minor units (cents), never a float.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

/// An ISO 4217 currency code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses three upper-case ASCII letters.
    pub fn parse(code: &str) -> Option<Self> {
        let bytes: [u8; 3] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Self(bytes))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A product as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price: Money,
}

/// The catalogue's routes.
pub fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/v1/products", get(list_products))
        .with_state(pool)
}

async fn list_products(State(pool): State<PgPool>) -> Response {
    match list(&pool).await {
        Ok(products) => Json(serde_json::json!({ "products": products })).into_response(),
        Err(e) => problem_for_db(&e),
    }
}

/// Every product, ordered by SKU.
pub async fn list(pool: &PgPool) -> Result<Vec<Product>, sqlx::Error> {
    let rows: Vec<(String, String, String, i64, String)> = sqlx::query_as(
        "SELECT sku, name, description, price_minor, currency FROM products ORDER BY sku",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(sku, name, description, minor, currency)| {
            // The table's CHECK constraint guarantees the format; skip rather than panic.
            let currency = Currency::parse(currency.trim())?;
            Some(Product {
                sku,
                name,
                description,
                price: Money { minor, currency },
            })
        })
        .collect())
}

mod http_problem {
    use axum::response::{IntoResponse, Response};
    use http::StatusCode;
    use keel_http::Problem;

    /// Maps a database failure to a client-safe problem, logging the cause once, here.
    pub(super) fn problem_for_db(e: &sqlx::Error) -> Response {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
                tracing::warn!(error = %e, "catalogue unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Service unavailable",
                )
                .with_detail("the catalogue is temporarily unavailable; retry later")
                .into_response()
            }
            _ => {
                tracing::error!(error = %e, "catalogue query failed");
                Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR).into_response()
            }
        }
    }
}
