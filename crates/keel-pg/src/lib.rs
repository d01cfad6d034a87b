#![doc = include_str!("../README.md")]

use std::str::FromStr;
use std::time::Duration;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use serde::Deserialize;
use sqlx::ConnectOptions;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub mod api_keys;
pub mod idempotency;
pub mod inbox;
pub mod jobs;
pub mod outbox;
pub mod retention;
pub mod schema;
pub mod text;

pub use schema::{PLATFORM_MIGRATOR, PLATFORM_TABLES};
pub use sqlx;

/// A duration as whole milliseconds for SQL, saturating: the `$n` of
/// `make_interval(secs => $n::float8 / 1000)`, how Keel's queries take durations.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `[database]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Runtime URL: the `<svc>_app` role through pgbouncer (transaction mode). A secret.
    pub url: SecretString,
    /// Direct URL for migrations and session features: the `<svc>_owner` role. A secret.
    pub migrate_url: SecretString,
    /// Client-side pool size of *one* instance (see the sizing rule in the crate docs).
    pub max_connections: u32,
    /// How long a request may wait for a pooled connection before failing (P18): waiting
    /// longer only hides overload.
    #[serde(with = "keel_config::duration")]
    pub acquire_timeout: Duration,
    /// `[database.retention]`: what the platform purges from this database, and how often
    /// ([`retention`]). Every key has a default; the section may be left out.
    #[serde(default)]
    pub retention: retention::RetentionConfig,
}

impl Validate for DatabaseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_url("database.url", &self.url, &["postgres", "postgresql"])?;
        ensure_url(
            "database.migrate_url",
            &self.migrate_url,
            &["postgres", "postgresql"],
        )?;
        ensure_range("database.max_connections", self.max_connections, 1, 200)?;
        let ms = u64::try_from(self.acquire_timeout.as_millis()).unwrap_or(u64::MAX);
        ensure_range("database.acquire_timeout (ms)", ms, 1, 60_000)?;
        self.retention.validate()
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A URL that passed validation still did not parse as connect options.
    #[error("database URL for `{key}` is not usable: {reason}")]
    Url { key: &'static str, reason: String },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A value could not be encoded for storage (a bug, not an outage).
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl PgError {
    /// Whether the failure goes away by itself, so the same work is worth trying again
    /// unchanged: the database (or pgbouncer) is unreachable or restarting, the pool is
    /// exhausted, or a serialization conflict or deadlock that a retry resolves. A consumer
    /// answers these with a retry after a backoff (P03) instead of spending the message's
    /// delivery limit, which is for messages that fail every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlx(e) => is_transient(e),
            _ => false,
        }
    }
}

/// [`PgError::is_transient`] for a bare `sqlx::Error`, as handlers get them from queries.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 40001/40P01: serialization failure, deadlock;
            // 53: insufficient resources; 57P01-03: shutdown / cannot connect now.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

fn options(key: &'static str, url: &SecretString, app: &str) -> Result<PgConnectOptions, PgError> {
    PgConnectOptions::from_str(url.expose_secret())
        .map(|o| {
            o.application_name(app)
                // Statement logging at INFO floods logs; slow ones are worth a warning.
                .log_statements(tracing::log::LevelFilter::Debug)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
        })
        .map_err(|e| PgError::Url {
            key,
            // sqlx's message does not include the URL itself.
            reason: e.to_string(),
        })
}

/// The runtime pool (through pgbouncer). Lazy: no connection is made until first use, so
/// start-up does not depend on the database being up.
pub fn runtime_pool(config: &DatabaseConfig, app: &str) -> Result<PgPool, PgError> {
    let options = options("database.url", &config.url, app)?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        // pgbouncer closes idle server connections itself; the client side need not hold
        // idle connections for long.
        .idle_timeout(Some(Duration::from_secs(60)))
        .connect_lazy_with(options))
}

/// Applies the platform's tables ([`schema`]) and then `migrator`, the service's own
/// migrations, on a direct connection as the owner role. Migrations take locks and may use
/// session state, so they never go through the transaction pooler.
pub async fn migrate(
    config: &DatabaseConfig,
    app: &str,
    migrator: &Migrator,
) -> Result<(), PgError> {
    let options = options("database.migrate_url", &config.migrate_url, app)?;
    let mut conn = options.connect().await?;
    schema::apply(&mut conn, migrator).await?;
    tracing::info!(
        platform_migrations = PLATFORM_MIGRATOR.iter().count(),
        service_migrations = migrator.iter().count(),
        "migrations applied"
    );
    Ok(())
}

/// A cheap readiness probe: one round trip through the pool.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(|_| ())
        // Only the error kind: connection strings never reach a response.
        .map_err(|e| match e {
            sqlx::Error::PoolTimedOut => "pool timed out".to_owned(),
            sqlx::Error::Io(_) => "unreachable".to_owned(),
            sqlx::Error::Database(db) => {
                format!("database error {}", db.code().unwrap_or_default())
            }
            _ => "unavailable".to_owned(),
        })
}
