#![doc = include_str!("../README.md")]

pub mod api_keys;
pub mod audit;
pub mod demo;
pub mod dlq;
pub mod jobs;
pub mod outbox;
pub mod output;
pub mod progress;
pub mod queues;
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
    /// RabbitMQ's AMQP port: where [`Config::amqp_url`] points when `rabbitmq.url` is unset.
    pub amqp_port: u16,
}

/// `[rabbitmq]`: the management API (the audit), and the AMQP URL (`dlq`, `queues`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTarget {
    pub management_url: String,
    pub username: String,
    pub password: SecretString,
    pub vhost: String,
    /// The AMQP URL `keelctl dlq` and `keelctl queues` connect with, as
    /// [`keel_amqp::definitions::OPERATOR`]: a secret (`KEEL_RABBITMQ__URL`, or `_FILE`).
    /// Unset, it is derived like the database URLs: that user's development password on
    /// `stack.host`:`stack.amqp_port`, vhost `vhost` ([`Config::amqp_url`]).
    #[serde(default)]
    pub url: Option<SecretString>,
}

/// `[dlq]`: how `keelctl dlq` and `keelctl queues` reach and read the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqSettings {
    /// The consumers' retry tiers (their `consumer.retry_tiers`): AMQP cannot list queues, so
    /// `keelctl queues` probes `<queue>.retry.<tier>` for each of these.
    #[serde(deserialize_with = "durations")]
    pub retry_tiers: Vec<Duration>,
    /// How long a browse waits for the broker's next message before it takes the queue as
    /// read: the bound of a listing that finds fewer messages than the queue said it had.
    #[serde(with = "keel_config::duration")]
    pub idle_timeout: Duration,
    /// Deadline of the AMQP connection (TCP, TLS, handshake).
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
}

/// A list of human durations (`["1s", "10s", "60s"]`), as the consumers' `retry_tiers`.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| keel_config::parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
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
    pub dlq: DlqSettings,
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
        if let Some(url) = &self.rabbitmq.url {
            ensure_url("rabbitmq.url", url, &["amqp", "amqps"])?;
        }
        ensure_range("stack.pgbouncer_port", self.stack.pgbouncer_port, 1, 65_535)?;
        ensure_range("stack.amqp_port", self.stack.amqp_port, 1, 65_535)?;
        ensure_range("dlq.retry_tiers (count)", self.dlq.retry_tiers.len(), 0, 16)?;
        ensure_range(
            "dlq.idle_timeout (ms)",
            keel_config::millis(self.dlq.idle_timeout),
            10,
            60_000,
        )?;
        ensure_range(
            "dlq.connect_timeout (ms)",
            keel_config::millis(self.dlq.connect_timeout),
            100,
            300_000,
        )?;
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

impl Config {
    /// The AMQP URL of `keelctl dlq` and `keelctl queues`: `rabbitmq.url`, or, unset, the
    /// development stack's as [`keel_amqp::definitions::OPERATOR`] (read every queue, publish
    /// to `keel.events` and `keel.retry`, configure nothing), derived as the database URLs are
    /// ([`targets`]).
    pub fn amqp_url(&self) -> SecretString {
        if let Some(url) = &self.rabbitmq.url {
            return url.clone();
        }
        let user = keel_amqp::definitions::OPERATOR;
        // A vhost is one path segment: `/` (the default vhost's name) must be escaped.
        let vhost = self.rabbitmq.vhost.replace('%', "%25").replace('/', "%2F");
        SecretString::from(format!(
            "amqp://{user}:{}@{}:{}/{vhost}",
            keel_amqp::definitions::dev_password(user),
            self.stack.host,
            self.stack.amqp_port,
        ))
    }
}

/// Why keelctl could not reach the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Refused (credentials, vhost) or unreachable.
    #[error("connect to RabbitMQ (rabbitmq.url): {0}")]
    Connect(lapin::Error),
    #[error("connect to RabbitMQ (rabbitmq.url): no answer within {0:?}")]
    ConnectTimeout(Duration),
    /// An operation on an open connection failed (`what` names it and its queue).
    #[error("{what}: {source}")]
    Amqp { what: String, source: lapin::Error },
}

impl BrokerError {
    /// An error of operation `what` (`"browse notification.events.dlq"`).
    pub fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let what = what.into();
        move |source| Self::Amqp { what, source }
    }
}

/// Connects to the broker at `url` within `timeout`: one plain connection (a command runs a
/// few operations; no supervisor, no reconnect), named `keelctl` in the management UI.
pub async fn connect_broker(
    url: &SecretString,
    timeout: Duration,
) -> Result<lapin::Connection, BrokerError> {
    let props = lapin::ConnectionProperties::default().with_connection_name("keelctl".into());
    match tokio::time::timeout(
        timeout,
        lapin::Connection::connect(url.expose_secret(), props),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(BrokerError::Connect(e)),
        Err(_) => Err(BrokerError::ConnectTimeout(timeout)),
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
