//! Where keelctl reaches each registered service: the registry joined with the configuration.
//!
//! By default everything is derived, so a service appended to the registry is a target with
//! no configuration at all: its database is `keel_<name>` through pgbouncer (`[stack]`), its
//! HTTP base URL the registry's port on `stack.host`. A `[<service>]` table (or
//! `KEEL_<SERVICE>__URL`, `__OPERATOR_URL`, `__HTTP_URL`) overrides any of them, which is how
//! tests point keelctl at their own per-test databases and how production gives it its own
//! credentials.
//!
//! Pattern: P14. keelctl never connects as a service's roles: the app role may rewrite every
//! row the service owns, which an audit has no business being able to do. Each database
//! target has two connections, and each command takes the one it needs:
//! - [`Target::database_url`], as [`AUDITOR_ROLE`]: read-only (SELECT on what the audit and
//!   the listings read). `audit`, `jobs`, `outbox`, `demo`'s reads; [`Targets::select`].
//! - [`Target::operator_url`], as [`OPERATOR_ROLE`]: the few changes an operator makes, each
//!   granted column by column (`jobs retry`, `outbox retry`, `api-keys create`);
//!   [`Targets::select_operator`].
//!
//! Both roles are the cluster's, created by `infra/postgres/init.sql` and granted by the
//! platform's migration 0007 and the services' own; see the P14 page.

use keel_config::{ConfigError, SecretString};

use crate::registry::{Registry, Service, dev_password};
use crate::{Config, ServiceOverride, StackConfig};

/// The read-only role keelctl reads every service database as.
pub const AUDITOR_ROLE: &str = "keel_auditor";
/// The role keelctl makes its few changes as (`jobs retry`, `outbox retry`, `api-keys create`).
pub const OPERATOR_ROLE: &str = "keel_operator";

/// One registered service as keelctl reaches it.
#[derive(Debug, Clone)]
pub struct Target {
    pub service: Service,
    /// Its database, for reading, when it owns one: [`AUDITOR_ROLE`] unless overridden.
    pub database_url: Option<SecretString>,
    /// Its database, for an operator's changes, when it owns one: [`OPERATOR_ROLE`] unless
    /// overridden. Nothing that only reads uses it.
    pub operator_url: Option<SecretString>,
    pub http_url: String,
    /// Its admin listener, when the registry gives it an `admin` port.
    pub admin_url: Option<String>,
}

/// Every registered service, in registry order.
#[derive(Debug, Clone)]
pub struct Targets {
    pub registry: Registry,
    pub all: Vec<Target>,
}

impl Targets {
    /// The target called `name`.
    pub fn get(&self, name: &str) -> Option<&Target> {
        self.all.iter().find(|t| t.service.name == name)
    }

    /// Targets that own a database.
    pub fn with_database(&self) -> impl Iterator<Item = (&Target, &SecretString)> {
        self.all
            .iter()
            .filter_map(|t| t.database_url.as_ref().map(|url| (t, url)))
    }

    /// The database targets named in `names`, or all of them when `names` is empty, each with
    /// its read-only URL: for commands that only read. An unknown name, or one without a
    /// database, is an error naming what is registered.
    pub fn select(&self, names: &[String]) -> Result<Vec<(&Target, &SecretString)>, String> {
        self.pick(names, |t| t.database_url.as_ref())
    }

    /// As [`Targets::select`], each with its operator URL: for the commands that change
    /// something (`jobs retry`).
    pub fn select_operator(
        &self,
        names: &[String],
    ) -> Result<Vec<(&Target, &SecretString)>, String> {
        self.pick(names, |t| t.operator_url.as_ref())
    }

    fn pick<'a>(
        &'a self,
        names: &[String],
        url: impl Fn(&'a Target) -> Option<&'a SecretString>,
    ) -> Result<Vec<(&'a Target, &'a SecretString)>, String> {
        let all: Vec<(&Target, &SecretString)> = self
            .all
            .iter()
            .filter_map(|t| url(t).map(|u| (t, u)))
            .collect();
        if names.is_empty() {
            return Ok(all);
        }
        let known: Vec<&str> = all.iter().map(|(t, _)| t.service.name.as_str()).collect();
        names
            .iter()
            .map(|n| {
                all.iter()
                    .find(|(t, _)| t.service.name == *n)
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "no registered service with a database is called `{n}` (those with one: {})",
                            known.join(", ")
                        )
                    })
            })
            .collect()
    }
}

/// `role`'s derived URL of database `db`: its development password, through pgbouncer.
fn derived_url(stack: &StackConfig, role: &str, db: &str) -> SecretString {
    SecretString::from(format!(
        "postgres://{role}:{}@{}:{}/{db}",
        dev_password(role),
        stack.host,
        stack.pgbouncer_port
    ))
}

impl Config {
    /// The registry in force: `registry` (a path) if set, else the embedded one.
    pub fn registry(&self) -> Result<Registry, ConfigError> {
        match &self.registry {
            Some(path) => Registry::load(path),
            None => Registry::embedded(),
        }
        .map_err(|e| ConfigError::invalid("registry", e))
    }

    /// Joins the registry and this configuration. Fails, naming the key, when an override
    /// names no registered service, or sets a database for one that owns none.
    pub fn targets(&self) -> Result<Targets, ConfigError> {
        let registry = self.registry()?;
        for (key, o) in &self.services {
            let service = registry
                .services
                .iter()
                .find(|s| s.config_key() == *key)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        registry.services.iter().map(Service::config_key).collect();
                    ConfigError::invalid(
                        key.as_str(),
                        format!(
                            "not a registered service (keys: {}, rabbitmq, stack, audit, demo, registry)",
                            names.join(", ")
                        ),
                    )
                })?;
            for (field, set) in [
                ("url", o.url.is_some()),
                ("operator_url", o.operator_url.is_some()),
            ] {
                if set && !service.database {
                    return Err(ConfigError::invalid(
                        format!("{key}.{field}"),
                        format!("{} owns no database in the registry", service.name),
                    ));
                }
            }
        }
        let stack = &self.stack;
        let all = registry
            .services
            .iter()
            .map(|s| {
                let o = self
                    .services
                    .get(&s.config_key())
                    .cloned()
                    .unwrap_or_else(ServiceOverride::default);
                let db = s.database_name();
                let database_url = db.as_ref().map(|db| {
                    o.url
                        .unwrap_or_else(|| derived_url(stack, AUDITOR_ROLE, db))
                });
                let operator_url = db.as_ref().map(|db| {
                    o.operator_url
                        .unwrap_or_else(|| derived_url(stack, OPERATOR_ROLE, db))
                });
                let http_url = o
                    .http_url
                    .unwrap_or_else(|| format!("http://{}:{}", stack.host, s.http_port()));
                let admin_url = o
                    .admin_url
                    .or_else(|| Some(format!("http://{}:{}", stack.host, s.port("admin")?)))
                    .map(|url| url.trim_end_matches('/').to_owned());
                Target {
                    service: s.clone(),
                    database_url,
                    operator_url,
                    http_url: http_url.trim_end_matches('/').to_owned(),
                    admin_url,
                }
            })
            .collect();
        Ok(Targets { registry, all })
    }
}
