//! The product catalogue: `GET /v1/products`, and price look-ups for new orders.
//!
//! A plain read through the runtime pool (pgbouncer, transaction mode). The stampede-safe
//! Redis cache (P30) will sit in front of it; the query stays here.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::error::ApiError;
use crate::routes::Routes;
pub use keel_events::{Currency, Money};

/// A product as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price: Money,
}

/// The catalogue's routes.
pub fn routes(pool: PgPool) -> Routes {
    Routes::new()
        .get("/v1/products", list_products)
        .with_state(pool)
}

async fn list_products(State(pool): State<PgPool>) -> Response {
    match list(&pool).await {
        Ok(products) => Json(serde_json::json!({ "products": products })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
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
            let currency = Currency::parse(currency.trim()).ok()?;
            Some(Product {
                sku,
                name,
                description,
                price: Money { minor, currency },
            })
        })
        .collect())
}

/// The current prices of `skus` that exist (unknown SKUs are simply absent from the map).
pub async fn prices(
    conn: &mut PgConnection,
    skus: &[String],
) -> Result<HashMap<String, Money>, sqlx::Error> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT sku, price_minor, currency FROM products WHERE sku = ANY($1)")
            .bind(skus)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(sku, minor, currency)| {
            let currency = Currency::parse(currency.trim()).ok()?;
            Some((sku, Money { minor, currency }))
        })
        .collect())
}
