//! The benchmark baseline: the same catalogue query on a bare axum server — no request id,
//! limits, timeouts, metrics, tracing or health. `make bench` measures its idle memory next to
//! the services', and the throughput bench runs the same handler in-process.
//!
//! Env: `DATABASE_URL` (runtime URL through pgbouncer), `BIND` (default `127.0.0.1:0`).
//! Prints `{"message":"listening","addr":…}` once bound.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect_lazy(&url)?;
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(bind).await?;
    #[allow(clippy::print_stdout)]
    {
        println!(
            r#"{{"message":"listening","addr":"{}"}}"#,
            listener.local_addr()?
        );
    }
    axum::serve(listener, router(pool)).await?;
    Ok(())
}

fn router(pool: PgPool) -> Router {
    Router::new()
        .route(
            "/v1/products",
            get(|State(pool): State<PgPool>| async move {
                Json(serde_json::json!({ "products": checkout::catalogue::list(&pool).await.unwrap_or_default() }))
            }),
        )
        .with_state(pool)
}
