//! Where keelctl reaches each registered service: the registry joined with the configuration.
//!
//! By default everything is derived, so a service appended to the registry is a target with
//! no configuration at all: its database is `keel_<name>` as `<name>_app` through pgbouncer
//! (`[stack]`), its HTTP base URL the registry's port on `stack.host`. A `[<service>]` table
//! (or `KEEL_<SERVICE>__URL` / `__HTTP_URL`) overrides either, which is how tests point keelctl
//! at their own per-test databases and how production gives it a read-only auditor role.
//! Pattern: P14 (keelctl reads with a runtime role, never a service's owner role).

use keel_config::{ConfigError, SecretString};

use crate::registry::{Registry, Service, dev_password};
use crate::{Config, ServiceOverride};

/// One registered service as keelctl reaches it.
#[derive(Debug, Clone)]
pub struct Target {
    pub service: Service,
    /// Its database, when it owns one.
    pub database_url: Option<SecretString>,
    pub http_url: String,
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

    /// The database targets named in `names`, or all of them when `names` is empty. An unknown
    /// name, or one without a database, is an error naming what is registered.
    pub fn select(&self, names: &[String]) -> Result<Vec<(&Target, &SecretString)>, String> {
        if names.is_empty() {
            return Ok(self.with_database().collect());
        }
        let known: Vec<&str> = self
            .with_database()
            .map(|(t, _)| t.service.name.as_str())
            .collect();
        names
            .iter()
            .map(|n| {
                self.with_database()
                    .find(|(t, _)| t.service.name == *n)
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
            if o.url.is_some() && !service.database {
                return Err(ConfigError::invalid(
                    format!("{key}.url"),
                    format!("{} owns no database in the registry", service.name),
                ));
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
                let database_url = s.database_name().map(|db| {
                    o.url.unwrap_or_else(|| {
                        let role = s.app_role();
                        SecretString::from(format!(
                            "postgres://{role}:{}@{}:{}/{db}",
                            dev_password(&role),
                            stack.host,
                            stack.pgbouncer_port
                        ))
                    })
                });
                let http_url = o
                    .http_url
                    .unwrap_or_else(|| format!("http://{}:{}", stack.host, s.http_port()));
                Target {
                    service: s.clone(),
                    database_url,
                    http_url: http_url.trim_end_matches('/').to_owned(),
                }
            })
            .collect();
        Ok(Targets { registry, all })
    }
}
