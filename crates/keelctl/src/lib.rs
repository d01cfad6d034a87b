#![doc = include_str!("../README.md")]

pub mod api_keys;
pub mod audit;
pub mod demo;
pub mod jobs;
pub mod outbox;
pub mod output;
pub mod progress;
pub mod registry;
pub mod services;
pub mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use serde::Deserialize;
use sqlx::{Connection, PgConnection};

pub use registry::Registry;
pub use targets::{Target, Targets};

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// `[<service>]`: where keelctl reaches one registered service, when not where the registry
/// and `[stack]` say (`KEEL_CHECKOUT__URL`, `KEEL_PSP_SIM__HTTP_URL`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceOverride {
    /// Its database, for reading (a read-only role, see [`targets`]): a secret.
    pub url: Option<SecretString>,
    /// Its database, for an operator's changes (see [`targets`]): a secret.
    pub operator_url: Option<SecretString>,
    /// Its HTTP base URL.
    pub http_url: Option<String>,
    /// Its admin listener's base URL, for a service with an `admin` port (psp-sim's fault
    /// knobs): `http://<stack.host>:<admin port>` unless set.
    pub admin_url: Option<String>,
}

/// `[stack]`: where the registry's services and their databases run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    pub host: String,
    /// pgbouncer: keelctl reaches every service database through it, as its own roles.
    pub pgbouncer_port: u16,
}

/// `[rabbitmq]`: the management API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTarget {
    pub management_url: String,
    pub username: String,
    pub password: SecretString,
    pub vhost: String,
}

/// `[audit]`: the bounds the invariants are checked against.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBounds {
    #[serde(with = "keel_config::duration")]
    pub settle_within: Duration,
    #[serde(with = "keel_config::duration")]
    pub outbox_within: Duration,
    pub max_queue_backlog: u64,
}

/// `[demo]`: how long `keelctl demo` waits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    #[serde(with = "keel_config::duration")]
    pub settle_timeout: Duration,
}

/// keelctl's configuration.
///
/// Not `deny_unknown_fields` at the top, on purpose: every other top-level table is a
/// registered service's [`ServiceOverride`], and which names exist is the registry's to say,
/// not this struct's. [`Config::targets`] refuses a name the registry does not know, so a typo
/// still exits 78 naming its key.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// A registry file to use instead of the embedded `infra/services.toml`.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    pub stack: StackConfig,
    pub rabbitmq: RabbitTarget,
    pub audit: AuditBounds,
    pub demo: DemoSettings,
    /// Per-service overrides, keyed by [`registry::Service::config_key`].
    #[serde(flatten)]
    pub services: BTreeMap<String, ServiceOverride>,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let pg = &["postgres", "postgresql"];
        let http = &["http", "https"];
        for (name, o) in &self.services {
            if let Some(url) = &o.url {
                ensure_url(&format!("{name}.url"), url, pg)?;
            }
            if let Some(url) = &o.operator_url {
                ensure_url(&format!("{name}.operator_url"), url, pg)?;
            }
            if let Some(url) = &o.http_url {
                ensure_url(
                    &format!("{name}.http_url"),
                    &SecretString::from(url.clone()),
                    http,
                )?;
            }
        }
        ensure_url(
            "rabbitmq.management_url",
            &SecretString::from(self.rabbitmq.management_url.clone()),
            http,
        )?;
        ensure_range("stack.pgbouncer_port", self.stack.pgbouncer_port, 1, 65_535)?;
        let secs = |d: Duration| d.as_secs();
        ensure_range(
            "demo.settle_timeout (s)",
            secs(self.demo.settle_timeout),
            1,
            3_600,
        )?;
        ensure_range(
            "audit.settle_within (s)",
            secs(self.audit.settle_within),
            1,
            86_400,
        )?;
        ensure_range(
            "audit.outbox_within (s)",
            secs(self.audit.outbox_within),
            1,
            86_400,
        )
    }
}

/// Connects to one service database (a plain connection: keelctl runs a few queries).
pub async fn connect(url: &SecretString) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(url.expose_secret()).await
}

/// Whether the connected database has `table` on its search path: the platform's tables
/// (`jobs`, `outbox`) are optional per service, and a command covering every service skips
/// the ones without them instead of failing.
pub async fn has_table(conn: &mut PgConnection, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(conn)
        .await
}
