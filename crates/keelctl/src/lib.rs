#![doc = include_str!("../README.md")]

pub mod audit;
pub mod demo;

use std::time::Duration;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use serde::Deserialize;
use sqlx::{Connection, PgConnection};

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// One service database keelctl reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseTarget {
    pub url: SecretString,
}

/// `[rabbitmq]`: the management API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTarget {
    pub management_url: String,
    pub username: String,
    pub password: SecretString,
    pub vhost: String,
    pub queues: Vec<String>,
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

/// `[demo]`: the services `keelctl demo` drives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoTargets {
    pub checkout_url: String,
    pub notification_url: String,
    pub psp_url: String,
    #[serde(with = "keel_config::duration")]
    pub settle_timeout: Duration,
}

/// keelctl's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub checkout: DatabaseTarget,
    pub billing: DatabaseTarget,
    pub notification: DatabaseTarget,
    pub rabbitmq: RabbitTarget,
    pub audit: AuditBounds,
    pub demo: DemoTargets,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let pg = &["postgres", "postgresql"];
        ensure_url("checkout.url", &self.checkout.url, pg)?;
        ensure_url("billing.url", &self.billing.url, pg)?;
        ensure_url("notification.url", &self.notification.url, pg)?;
        ensure_url(
            "rabbitmq.management_url",
            &SecretString::from(self.rabbitmq.management_url.clone()),
            &["http", "https"],
        )?;
        for (key, url) in [
            ("demo.checkout_url", &self.demo.checkout_url),
            ("demo.notification_url", &self.demo.notification_url),
            ("demo.psp_url", &self.demo.psp_url),
        ] {
            ensure_url(key, &SecretString::from(url.clone()), &["http", "https"])?;
        }
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
pub async fn connect(target: &DatabaseTarget) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(target.url.expose_secret()).await
}
