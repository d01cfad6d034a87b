//! The registry of services (`infra/services.toml`), as keelctl reads it.
//!
//! One file says which services exist, their ports, which own a database and which use the
//! broker; keelctl embeds it (and takes `--registry PATH` instead), so its generic commands and
//! checks cover a new service the moment its entry is appended, with no code to edit. The dev
//! scripts read the same file with a small bash reader (`infra/dev/registry.sh`); the registry
//! test proves both readers agree and that the derived files (Postgres roles, `make dev`
//! environments) match. Parse, don't validate: a [`Registry`] that exists has passed every rule
//! below, so the code using it does not re-check. Pattern: P14 (least-privilege roles) for
//! every service at once, since each entry with a database implies its own owner/app pair.
//!
//! Rules a registry must keep (each one a [`RegistryError::Invalid`] naming the entry):
//! names are `[a-z][a-z0-9-]*` and unique; every service has an `http` port and no two ports
//! collide; a service with a database has a migrate command, one without has none; queues a
//! service consumes and routing keys it publishes start with its own name (the convention
//! `<service>.<aggregate>.<event>`) and need `broker = true`; `env` keys are `KEEL_*` and not
//! one of those derived from the entry; `{service.kind}` templates name a registered port;
//! strings stay inside the TOML subset the bash reader understands.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `infra/services.toml` as checked in, embedded at build time.
pub const EMBEDDED: &str = include_str!("../../../infra/services.toml");

/// Why a registry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read registry {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("registry is not valid TOML for its schema: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("registry entry `{entry}`: {reason}")]
    Invalid { entry: String, reason: String },
}

fn invalid(entry: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

/// Every registered service and the role pairs that belong to none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// In start order (the file's order).
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
    /// `[[roles]]`: `<prefix>_owner` / `<prefix>_app` with no database (platform tests).
    #[serde(default)]
    pub roles: Vec<RolePair>,
}

/// One `[[service]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// Port by kind (`http` always; `grpc` for a gRPC server).
    pub ports: BTreeMap<String, u16>,
    /// Owns `keel_<name>`, with roles `<name>_owner` and `<name>_app`.
    #[serde(default)]
    pub database: bool,
    /// Talks to RabbitMQ (vhost `keel`).
    #[serde(default)]
    pub broker: bool,
    /// Queues it consumes.
    #[serde(default)]
    pub consumes: Vec<String>,
    /// Routing keys (patterns) it publishes to the `keel.events` exchange.
    #[serde(default)]
    pub publishes: Vec<String>,
    /// Arguments of its binary that run its migrations (`["migrate"]`).
    #[serde(default)]
    pub migrate: Vec<String>,
    /// Readiness URL template (`http://127.0.0.1:{checkout.http}/readyz`).
    pub ready: String,
    /// Service-specific `KEEL_*` settings of `make dev`, as templates over ports.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One `[[roles]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolePair {
    pub prefix: String,
}

/// The development password of a role: `<role>_dev`, the convention `init.sql`, pgbouncer's
/// auth file and the services' default configs share.
pub fn dev_password(role: &str) -> String {
    format!("{role}_dev")
}

impl Service {
    /// The port of `kind`, if the service has one.
    pub fn port(&self, kind: &str) -> Option<u16> {
        self.ports.get(kind).copied()
    }

    /// The HTTP port (every service has one: a registry without it does not parse).
    pub fn http_port(&self) -> u16 {
        self.port("http").unwrap_or_default()
    }

    /// `keel_<name>` when the service owns a database.
    pub fn database_name(&self) -> Option<String> {
        self.database.then(|| format!("keel_{}", self.name))
    }

    /// The role its migrations run as.
    pub fn owner_role(&self) -> String {
        format!("{}_owner", self.name)
    }

    /// The role it runs as.
    pub fn app_role(&self) -> String {
        format!("{}_app", self.name)
    }

    /// Its name as a configuration key: `psp-sim` -> `psp_sim` (`KEEL_PSP_SIM__HTTP_URL`).
    pub fn config_key(&self) -> String {
        self.name.replace('-', "_")
    }

    /// The `KEEL_*` variables derived from the entry itself, which `env` must not repeat.
    pub fn derived_env_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .ports
            .keys()
            .map(|k| format!("KEEL_{}__PORT", k.to_ascii_uppercase()))
            .collect();
        if self.database {
            keys.push("KEEL_DATABASE__URL".to_owned());
            keys.push("KEEL_DATABASE__MIGRATE_URL".to_owned());
        }
        if self.broker {
            keys.push("KEEL_AMQP__URL".to_owned());
        }
        keys
    }
}

impl Registry {
    /// The registry keelctl was built with.
    pub fn embedded() -> Result<Self, RegistryError> {
        Self::parse(EMBEDDED)
    }

    /// Reads and checks the registry at `path`.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks a registry.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let registry: Self = toml::from_str(text)?;
        registry.check()?;
        Ok(registry)
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Services that own a database, in registry order.
    pub fn with_database(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.database)
    }

    /// Every role the registry implies, with its development password: each database
    /// service's owner and app roles, then each `[[roles]]` pair.
    pub fn roles(&self) -> Vec<(String, String)> {
        self.with_database()
            .map(|s| s.name.as_str())
            .chain(self.roles.iter().map(|r| r.prefix.as_str()))
            .flat_map(|p| [format!("{p}_owner"), format!("{p}_app")])
            .map(|role| {
                let password = dev_password(&role);
                (role, password)
            })
            .collect()
    }

    /// Replaces every `{service.kind}` in `template` with that port (the registry's value).
    pub fn expand(&self, template: &str) -> Result<String, RegistryError> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| invalid(template, "a `{` without its `}`"))?;
            let reference = &rest[open + 1..close];
            let port = reference
                .split_once('.')
                .and_then(|(svc, kind)| self.service(svc)?.port(kind))
                .ok_or_else(|| {
                    invalid(
                        template,
                        format!("`{{{reference}}}` is not a registered service's port"),
                    )
                })?;
            out.push_str(&rest[..open]);
            out.push_str(&port.to_string());
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(invalid(template, "a `}` without its `{`"));
        }
        out.push_str(rest);
        Ok(out)
    }

    fn check(&self) -> Result<(), RegistryError> {
        let mut names = BTreeSet::new();
        let mut ports: BTreeMap<u16, String> = BTreeMap::new();
        for s in &self.services {
            let n = s.name.as_str();
            if !is_name(n) {
                return Err(invalid(n, "a name is [a-z][a-z0-9-]*"));
            }
            if !names.insert(n) {
                return Err(invalid(n, "registered twice"));
            }
            if s.port("http").is_none() {
                return Err(invalid(
                    n,
                    "every service has an http port (health, metrics)",
                ));
            }
            for (kind, port) in &s.ports {
                if !is_key(kind) || *port == 0 {
                    return Err(invalid(n, format!("port `{kind} = {port}`")));
                }
                if let Some(other) = ports.insert(*port, format!("{n}.{kind}")) {
                    return Err(invalid(n, format!("port {port} is also {other}")));
                }
            }
            if s.database == s.migrate.is_empty() {
                return Err(invalid(
                    n,
                    "a service with a database has a migrate command, one without has none",
                ));
            }
            for (what, list) in [("consumes", &s.consumes), ("publishes", &s.publishes)] {
                for item in list {
                    if !item.starts_with(&format!("{n}.")) || !is_plain(item) {
                        return Err(invalid(
                            n,
                            format!("{what} `{item}`: names start with `{n}.` (no spaces)"),
                        ));
                    }
                }
                if !list.is_empty() && !s.broker {
                    return Err(invalid(n, format!("{what} queues but broker = false")));
                }
            }
            if s.migrate.iter().any(|a| !is_plain(a)) {
                return Err(invalid(n, "migrate arguments are plain words"));
            }
            let derived = s.derived_env_keys();
            for (key, value) in &s.env {
                let upper_snake = key
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !key.starts_with("KEEL_") || !upper_snake {
                    return Err(invalid(n, format!("env `{key}` is not a KEEL_* name")));
                }
                if derived.contains(key) {
                    return Err(invalid(
                        n,
                        format!("env `{key}` follows from the entry; do not repeat it"),
                    ));
                }
                check_string(n, value)?;
            }
            check_string(n, &s.ready)?;
        }
        for r in &self.roles {
            if !is_name(&r.prefix) || names.contains(r.prefix.as_str()) {
                return Err(invalid(
                    &r.prefix,
                    "a [[roles]] prefix is a name that no service has",
                ));
            }
        }
        // Templates last: they may name any service, including later ones.
        for s in &self.services {
            for template in s.env.values().chain([&s.ready]) {
                self.expand(template)?;
            }
        }
        Ok(())
    }
}

fn is_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_key(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// No whitespace, quotes or backslashes: what the bash reader's arrays can hold.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
}

/// Strings the bash reader reads as TOML does: no quotes or backslashes (no escapes).
fn check_string(entry: &str, s: &str) -> Result<(), RegistryError> {
    if s.contains(['"', '\\', '\n']) {
        return Err(invalid(
            entry,
            format!("`{s}`: quotes, backslashes and newlines are outside the registry's subset"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn with(extra: &str) -> Result<Registry, RegistryError> {
        Registry::parse(&format!("{EMBEDDED}\n{extra}"))
    }

    #[test]
    fn the_checked_in_registry_parses() {
        let r = Registry::embedded().expect("infra/services.toml is valid");
        assert!(r.services.iter().any(|s| s.database));
        assert!(r.services.iter().all(|s| s.http_port() > 0));
    }

    #[test]
    fn a_port_used_twice_is_refused() {
        let e = with("[[service]]\nname = \"inventory\"\nports = { http = 8080 }\nready = \"x\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("port 8080"), "{e}");
    }

    #[test]
    fn a_template_naming_no_registered_port_is_refused() {
        let e = with(
            "[[service]]\nname = \"inventory\"\nports = { http = 8095 }\n\
             ready = \"http://127.0.0.1:{inventory.grpc}/readyz\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("inventory.grpc"), "{e}");
    }

    #[test]
    fn a_database_without_a_migrate_command_is_refused() {
        let e = with(
            "[[service]]\nname = \"inventory\"\nports = { http = 8095 }\ndatabase = true\n\
             ready = \"http://127.0.0.1:{inventory.http}/readyz\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("migrate"), "{e}");
    }

    #[test]
    fn derived_settings_are_not_repeated_in_env() {
        let e = with(
            "[[service]]\nname = \"inventory\"\nports = { http = 8095 }\n\
             ready = \"http://127.0.0.1:{inventory.http}/readyz\"\n\
             [service.env]\nKEEL_HTTP__PORT = \"1\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("KEEL_HTTP__PORT"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let e = with(
            "[[service]]\nname = \"inventory\"\nports = { http = 8095 }\ndatabse = true\n\
             ready = \"http://127.0.0.1:{inventory.http}/readyz\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("databse"), "{e}");
    }

    #[test]
    fn roles_cover_database_services_and_role_pairs() {
        let r = Registry::embedded().unwrap();
        let roles = r.roles();
        for s in r.with_database() {
            assert!(roles.contains(&(s.app_role(), dev_password(&s.app_role()))));
            assert!(roles.contains(&(s.owner_role(), dev_password(&s.owner_role()))));
        }
        for p in &r.roles {
            assert!(
                roles
                    .iter()
                    .any(|(role, _)| *role == format!("{}_app", p.prefix))
            );
        }
    }
}
