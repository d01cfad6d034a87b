//! Profiles: where development secrets live, and the guard that keeps them out of anything
//! else.
//!
//! A service's embedded defaults (`config/default.toml`) hold no secret. Its development
//! secrets (database URLs with the dev passwords, webhook signing keys) are in
//! `config/dev.toml`, embedded too, and layered over the defaults only when `KEEL_PROFILE=dev`
//! (`make dev`, the tests and compose set it). Without the profile:
//! - every key the dev profile sets must come from somewhere else (`KEEL_*`, `KEEL_*_FILE`,
//!   `KEEL_CONFIG_FILE`), or loading fails naming the keys ([`ConfigError::MissingSecret`]);
//! - no setting may hold a value the dev profile holds ([`ConfigError::DevSecret`]): a
//!   development secret copied into a production environment is refused, not used.
//!
//! Must not break: the profile's values are compared, never printed.

use std::collections::BTreeSet;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::Value;

use crate::{ConfigError, PROFILE_VAR};

/// The profile's one known value.
pub const DEV_PROFILE: &str = "dev";

/// Which profile the environment selects: `Some(())` for dev, `None` when `KEEL_PROFILE` is
/// unset or empty (an empty value is what `KEEL_PROFILE=` in a compose file or a shell gives,
/// and means no profile). Any other value is refused: a typo (`KEEL_PROFILE=devel`) must not
/// silently start a service without its development secrets, nor a made-up "prod" profile
/// suggest that one exists.
pub(crate) fn is_dev(env: &[(String, String)]) -> Result<bool, ConfigError> {
    // The last assignment wins, as when a test's own variables follow the harness's.
    match env
        .iter()
        .rev()
        .find(|(k, _)| k == PROFILE_VAR)
        .map(|(_, v)| v.trim())
    {
        None | Some("") => Ok(false),
        Some(DEV_PROFILE) => Ok(true),
        Some(other) => Err(ConfigError::UnknownProfile {
            // Not a secret, but it may be anything: keep the line short.
            value: other.chars().take(40).collect(),
        }),
    }
}

/// What the checked-in dev profile holds: its keys (each one a secret) and its values (each
/// one a known development secret).
#[derive(Debug, Default)]
pub(crate) struct DevSecrets {
    /// Every key the profile sets, as `database.url`.
    pub keys: Vec<String>,
    /// Every value it holds; a list's items one by one.
    values: BTreeSet<String>,
    /// The passwords of the URLs among them: `postgres://app:app_dev@127.0.0.1/db` with
    /// another host is the same leaked password.
    url_passwords: BTreeSet<String>,
}

impl DevSecrets {
    /// Reads the profile's text. It is checked in, so a syntax error is a build mistake; it
    /// is still reported as a configuration error naming the profile, not a panic.
    pub fn parse(dev_toml: &str) -> Result<Self, ConfigError> {
        let mut secrets = Self::default();
        if dev_toml.trim().is_empty() {
            return Ok(secrets);
        }
        let value: Value = Figment::from(Toml::string(dev_toml))
            .extract()
            .map_err(|e| ConfigError::invalid("<dev profile>", e.kind))?;
        let mut leaves = Vec::new();
        strings("", &value, &mut leaves);
        for (key, value) in leaves {
            if !secrets.keys.contains(&key) {
                secrets.keys.push(key);
            }
            if value.is_empty() {
                continue;
            }
            if let Some(password) = url_password(&value) {
                secrets.url_passwords.insert(password);
            }
            secrets.values.insert(value);
        }
        Ok(secrets)
    }

    /// The defaults must not set what the profile holds: a secret in the defaults would be
    /// in every binary, whatever the profile.
    pub fn ensure_not_in_defaults(&self, defaults: &Figment) -> Result<(), ConfigError> {
        match self.keys.iter().find(|k| defaults.find_value(k).is_ok()) {
            Some(key) => Err(ConfigError::SecretInDefaults { key: key.clone() }),
            None => Ok(()),
        }
    }

    /// Without the profile, every key it sets must be set by something else.
    pub fn ensure_set(&self, layered: &Figment) -> Result<(), ConfigError> {
        let mut missing = self
            .keys
            .iter()
            .filter(|k| layered.find_value(k).is_err())
            .cloned();
        match missing.next() {
            Some(key) => Err(ConfigError::MissingSecret {
                key,
                also: missing.collect(),
            }),
            None => Ok(()),
        }
    }

    /// Without the profile, no setting may hold one of its values (whole, as an item of a
    /// list written as one string, or as a URL's password). `origin` names where a key's
    /// value came from, for the message.
    pub fn ensure_unused(
        &self,
        layered: &Figment,
        origin: impl Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let Ok(value) = layered.extract::<Value>() else {
            // Unreadable as a whole: extraction reports it, by key.
            return Ok(());
        };
        let mut leaves = Vec::new();
        strings("", &value, &mut leaves);
        match leaves.into_iter().find(|(_, v)| self.holds(v)) {
            Some((key, _)) => Err(ConfigError::DevSecret {
                source_hint: origin(&key),
                key,
            }),
            None => Ok(()),
        }
    }

    /// Whether `value` is, or carries, a development secret.
    fn holds(&self, value: &str) -> bool {
        let known = |v: &str| {
            self.values.contains(v)
                || url_password(v).is_some_and(|p| self.url_passwords.contains(&p))
        };
        // A list given as one string (`KEEL_WEBHOOK__SECRETS="whsec_a whsec_b"`) is checked
        // item by item, split as the services split it.
        known(value)
            || value
                .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
                .filter(|t| !t.is_empty())
                .any(known)
    }
}

/// Every string (and every string item of a list) under `prefix`, with its key. Numbers and
/// booleans are not secrets' shapes and are left out.
fn strings(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                strings(&key, v, out);
            }
        }
        Value::Array(_, items) => {
            for item in items {
                strings(prefix, item, out);
            }
        }
        Value::String(_, s) => out.push((prefix.to_owned(), s.clone())),
        _ => {}
    }
}

/// The password of a URL that has one (as written, percent-encoded).
fn url_password(s: &str) -> Option<String> {
    let u = url::Url::parse(s).ok()?;
    u.password().filter(|p| !p.is_empty()).map(str::to_owned)
}

/// `database.url` -> `KEEL_DATABASE__URL`: the variable that sets a key.
pub(crate) fn env_var(key: &str) -> String {
    format!(
        "{}{}",
        crate::ENV_PREFIX,
        key.replace('.', "__").to_ascii_uppercase()
    )
}
