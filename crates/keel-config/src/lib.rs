#![doc = include_str!("../README.md")]

use std::fmt;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::de::DeserializeOwned;

pub use secrecy::{ExposeSecret, SecretString};

/// Durations in config files are human strings (`"250ms"`, `"5s"`); use with
/// `#[serde(with = "keel_config::duration")]`.
pub use humantime_serde as duration;

/// Exit code for a configuration error: `EX_CONFIG` from BSD `sysexits.h`.
pub const EXIT_CONFIG: i32 = 78;

/// The environment prefix every Keel setting carries.
pub const ENV_PREFIX: &str = "KEEL_";

/// Names an extra config file layered over the defaults; not itself a key.
pub const CONFIG_FILE_VAR: &str = "KEEL_CONFIG_FILE";

/// A configuration problem, always tied to the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value could not be parsed into the expected type, or the key is unknown.
    #[error("config key `{key}`: {reason}{source_hint}")]
    Parse {
        key: String,
        reason: String,
        /// Where the bad value came from (e.g. ` (from KEEL_HTTP__PORT)`), empty when unknown.
        source_hint: String,
    },
    /// The value parsed but breaks a rule (range, scheme, relation to another key).
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// A `*_FILE` variable points at a file that cannot be read.
    #[error("config key `{key}`: cannot read secret file named by {var}: {reason}")]
    SecretFile {
        key: String,
        var: String,
        reason: String,
    },
}

impl ConfigError {
    /// A rule violation for `key`.
    pub fn invalid(key: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

/// Checks that parsing alone cannot express. Implement it for every config struct and call
/// the nested structs' `validate` with their key prefix.
pub trait Validate {
    /// Returns the first broken rule, naming its full key (e.g. `http.port`).
    fn validate(&self) -> Result<(), ConfigError>;
}

/// A duration as whole milliseconds, saturating: how bounds on durations are range-checked
/// (`ensure_range("http.request_timeout (ms)", millis(d), 1, 300_000)`).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Fails with the key's name unless `min <= value <= max`.
pub fn ensure_range<T>(key: &str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(ConfigError::invalid(
            key,
            format!("{value} is out of range {min}..={max}"),
        ));
    }
    Ok(())
}

/// Fails unless the secret parses as a URL with one of `schemes`. The value itself is never
/// put in the error: URLs carry passwords.
pub fn ensure_url(key: &str, value: &SecretString, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(value.expose_secret()) {
        Ok(u) if schemes.contains(&u.scheme()) => Ok(()),
        Ok(u) => Err(ConfigError::invalid(
            key,
            format!("scheme `{}` is not one of {schemes:?}", u.scheme()),
        )),
        Err(e) => Err(ConfigError::invalid(key, format!("not a valid URL ({e})"))),
    }
}

/// Loads `T` from the embedded defaults and the process environment.
pub fn load<T>(defaults_toml: &str) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    load_from(defaults_toml, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (what tests use).
pub fn load_from<T, I>(defaults_toml: &str, env: I) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    load_effective_from(defaults_toml, env).map(|(config, _)| config)
}

/// Like [`load_from`], and also every effective setting as `key = value` lines, sorted by key,
/// with secrets redacted (what `<service> check-config` prints): a value under a key whose
/// last part names a secret (`password`, `secret`, `secrets`, `token`, `api_key`…) is replaced
/// whole; a URL keeps everything but its password.
pub fn load_effective_from<T, I>(
    defaults_toml: &str,
    env: I,
) -> Result<(T, Vec<(String, String)>), ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    let (figment, origins) = layered(defaults_toml, env)?;
    let config: T = figment
        .extract_lossy()
        .map_err(|e| to_config_error(&e, &origins))?;
    config.validate()?;
    let mut effective = Vec::new();
    if let Ok(value) = figment.extract::<figment::value::Value>() {
        flatten("", &value, &mut effective);
    }
    effective.sort();
    Ok((config, effective))
}

/// The defaults, an optional `KEEL_CONFIG_FILE`, `KEEL_*` overrides and `*_FILE` secrets, in
/// that order of precedence (later wins), plus which variable set which key.
fn layered<I>(defaults_toml: &str, env: I) -> Result<(Figment, Vec<(String, String)>), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();

    let mut figment = Figment::new().merge(Toml::string(defaults_toml));
    if let Some((_, path)) = env.iter().find(|(k, _)| k == CONFIG_FILE_VAR) {
        figment = figment.merge(Toml::file_exact(PathBuf::from(path)));
    }

    // Plain KEEL_* overrides, kept as strings; `extract_lossy` turns `8080` into a number
    // only where the field is a number, so a numeric password stays a string.
    // `*_FILE` variables are handled below, so they are not keys themselves.
    let mut origins: Vec<(String, String)> = Vec::new();
    for (var, value) in env
        .iter()
        .filter(|(k, _)| k != CONFIG_FILE_VAR && !k.ends_with("_FILE"))
    {
        let key = env_var_to_key(var);
        figment = figment.merge((key.clone(), value.clone()));
        origins.push((key, var.clone()));
    }

    // Secrets from files win over everything: that is how mounted secrets rotate.
    for (var, path) in env
        .iter()
        .filter(|(k, _)| k != CONFIG_FILE_VAR && k.ends_with("_FILE"))
    {
        let key = env_var_to_key(&var[..var.len() - "_FILE".len()]);
        let contents = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
            key: key.clone(),
            var: var.clone(),
            reason: e.kind().to_string(),
        })?;
        let value = contents.trim_end_matches(['\n', '\r']).to_owned();
        figment = figment.merge((key.clone(), value));
        origins.push((key, var.clone()));
    }
    Ok((figment, origins))
}

/// Key parts that name a secret: their values are never printed.
const SECRET_KEYS: &[&str] = &["password", "secret", "secrets", "token", "api_key", "key"];

fn flatten(prefix: &str, value: &figment::value::Value, out: &mut Vec<(String, String)>) {
    use figment::value::Value;
    let last = prefix.rsplit('.').next().unwrap_or(prefix);
    match value {
        // First, whatever the value's shape: a table or list under a secret's name
        // (`[webhook.secrets] current = "whsec_…"`) is redacted whole too.
        _ if is_secret_key(last) => {
            out.push((prefix.to_owned(), "<redacted>".to_owned()));
        }
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(_, s) => out.push((prefix.to_owned(), redact_url(s))),
        Value::Array(_, items) => {
            let items: Vec<String> = items
                .iter()
                .map(|v| match v {
                    Value::String(_, s) => format!("{:?}", redact_url(s)),
                    other => display(other),
                })
                .collect();
            out.push((prefix.to_owned(), format!("[{}]", items.join(", "))));
        }
        other => out.push((prefix.to_owned(), display(other))),
    }
}

fn display(value: &figment::value::Value) -> String {
    use figment::value::Value;
    match value {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Empty(..) => String::new(),
        Value::Dict(..) | Value::Array(..) => "…".to_owned(),
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS
        .iter()
        .any(|s| key == *s || key.ends_with(&format!("_{s}")))
}

/// `postgres://app:pw@host/db?sslpassword=x` -> the password and every query parameter that
/// names a secret redacted (libpq also takes `?password=`); anything that is not a URL as is.
fn redact_url(s: &str) -> String {
    let Ok(mut u) = url::Url::parse(s) else {
        return s.to_owned();
    };
    if u.cannot_be_a_base() {
        return s.to_owned();
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("<redacted>"));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_key(&k) || k.to_ascii_lowercase().contains("password") {
                    "<redacted>".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Loads the configuration or ends the process with exit code 78 and one line naming the key.
/// For `main` only: a library must never exit the process.
pub fn load_or_exit<T>(service: &str, defaults_toml: &str) -> T
where
    T: DeserializeOwned + Validate,
{
    match load(defaults_toml) {
        Ok(config) => config,
        Err(e) => {
            // Telemetry is not up yet (its settings are part of this config), so stderr it is.
            eprintln!("{service}: invalid configuration: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// `KEEL_DATABASE__URL` -> `database.url`.
fn env_var_to_key(var: &str) -> String {
    var.trim_start_matches(ENV_PREFIX)
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

fn to_config_error(e: &figment::Error, origins: &[(String, String)]) -> ConfigError {
    // Make sure the path ends with the field an unknown/missing-field error is about.
    let mut path = e.path.clone();
    let field = match &e.kind {
        figment::error::Kind::UnknownField(field, _) => Some(field.clone()),
        figment::error::Kind::MissingField(field) => Some(field.to_string()),
        _ => None,
    };
    if let Some(field) = field
        && path.last() != Some(&field)
    {
        path.push(field);
    }
    let key = if path.is_empty() {
        "<root>".to_owned()
    } else {
        path.join(".")
    };
    let source_hint = origins
        .iter()
        .rev()
        .find(|(k, _)| *k == key)
        .map(|(_, var)| format!(" (from {var})"))
        .or_else(|| {
            e.metadata.as_ref().and_then(|m| match &m.source {
                Some(figment::Source::File(p)) => Some(format!(" (from {})", p.display())),
                _ => None,
            })
        })
        .unwrap_or_default();
    // Only the kind of the bad value is reported, never the value: it may be a secret.
    let reason = match &e.kind {
        figment::error::Kind::InvalidType(actual, expected) => {
            format!("expected {expected}, found {}", actual_kind(actual))
        }
        figment::error::Kind::UnknownField(_, _) => "unknown key".to_owned(),
        figment::error::Kind::MissingField(_) => "missing".to_owned(),
        figment::error::Kind::InvalidValue(_, expected) => {
            format!("invalid value, expected {expected}")
        }
        figment::error::Kind::UnknownVariant(_, expected) => {
            format!("unknown value, expected one of {expected:?}")
        }
        other => other.to_string(),
    };
    ConfigError::Parse {
        key,
        reason,
        source_hint,
    }
}

fn actual_kind(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(_) => "a string".to_owned(),
        Actual::Signed(_) | Actual::Unsigned(_) => "an integer".to_owned(),
        Actual::Float(_) => "a float".to_owned(),
        Actual::Bool(_) => "a boolean".to_owned(),
        other => other.to_string(),
    }
}

/// Parses a human duration (`"250ms"`, `"30s"`, `"1m 30s"`) as config files spell them.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, impl std::error::Error + use<>> {
    humantime_serde::re::humantime::parse_duration(s)
}
