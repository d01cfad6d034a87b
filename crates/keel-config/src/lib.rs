#![doc = include_str!("../README.md")]

mod profile;
mod redact;

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

/// Selects a profile (`KEEL_PROFILE=dev`); not itself a key.
pub const PROFILE_VAR: &str = "KEEL_PROFILE";

pub use profile::DEV_PROFILE;

/// A service's checked-in configuration, embedded in its binary (see [`embed!`]): the
/// defaults, which hold no secret, and the development profile, which holds nothing but
/// development secrets and is layered over the defaults only under `KEEL_PROFILE=dev`.
///
/// A bare `&'static str` converts to defaults with an empty profile, for a tool or a test
/// that has no secrets to keep apart.
#[derive(Debug, Clone, Copy)]
pub struct Embedded {
    /// `config/default.toml`: every setting's default, no secret.
    pub defaults: &'static str,
    /// `config/dev.toml`: every secret's development value; refused anywhere but in dev.
    pub dev: &'static str,
}

impl Embedded {
    /// The defaults and the development profile, as TOML text.
    pub const fn new(defaults: &'static str, dev: &'static str) -> Self {
        Self { defaults, dev }
    }
}

impl From<&'static str> for Embedded {
    fn from(defaults: &'static str) -> Self {
        Self::new(defaults, "")
    }
}

/// Embeds the calling crate's `config/default.toml` and `config/dev.toml` as an [`Embedded`]:
/// the one line a service writes to get both, and the profile rules with them.
///
/// ```ignore
/// pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();
/// ```
#[macro_export]
macro_rules! embed {
    () => {
        $crate::Embedded::new(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")),
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.toml")),
        )
    };
}

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
    /// `KEEL_PROFILE` names a profile that does not exist.
    #[error(
        "{PROFILE_VAR}: unknown profile `{value}`; the one profile is `dev` (the checked-in \
         development secrets); leave it unset anywhere else"
    )]
    UnknownProfile { value: String },
    /// Outside the dev profile, a secret is set nowhere. `also` names the other missing ones.
    #[error(
        "config key `{key}`: secret not set: mount it with {}_FILE (or set {}); \
         KEEL_PROFILE=dev selects the development one{}",
        profile::env_var(.key),
        profile::env_var(.key),
        also_missing(.also)
    )]
    MissingSecret { key: String, also: Vec<String> },
    /// Outside the dev profile, a setting holds a value the dev profile holds.
    #[error(
        "config key `{key}`: holds a development secret{source_hint}, refused outside \
         KEEL_PROFILE=dev; give it a secret of its own"
    )]
    DevSecret {
        key: String,
        /// Where the value came from (e.g. ` (from KEEL_DATABASE__URL)`), empty when unknown.
        source_hint: String,
    },
    /// The embedded defaults set a key the dev profile holds as a secret.
    #[error(
        "config key `{key}`: set in the embedded defaults, but it is a secret: it belongs in \
         the dev profile (config/dev.toml) and the deployment's secrets"
    )]
    SecretInDefaults { key: String },
}

fn also_missing(also: &[String]) -> String {
    if also.is_empty() {
        return String::new();
    }
    let keys: Vec<String> = also.iter().map(|k| format!("`{k}`")).collect();
    format!("; also not set: {}", keys.join(", "))
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

/// Loads `T` from the embedded configuration and the process environment.
pub fn load<T>(embedded: impl Into<Embedded>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    load_from(embedded, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (what tests use).
pub fn load_from<T, I>(embedded: impl Into<Embedded>, env: I) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    load_effective_from(embedded, env).map(|(config, _)| config)
}

/// Like [`load_from`], and also every effective setting as `key = value` lines, sorted by key,
/// with secrets redacted (what `<service> check-config` prints): a value under a key whose
/// last part names a secret (`password`, `secret`, `secrets`, `token`, `api_key`…) or that
/// the dev profile sets is replaced whole; a URL keeps everything but its password.
pub fn load_effective_from<T, I>(
    embedded: impl Into<Embedded>,
    env: I,
) -> Result<(T, Vec<(String, String)>), ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    let embedded = embedded.into();
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    let dev = profile::is_dev(&env)?;
    let secrets = profile::DevSecrets::parse(embedded.dev)?;
    secrets.ensure_not_in_defaults(&Figment::from(Toml::string(embedded.defaults)))?;
    let (figment, origins) = layered(&embedded, dev, &env)?;
    if !dev {
        // A development secret first: of the two mistakes it is the dangerous one.
        secrets.ensure_unused(&figment, |key| source_hint(&figment, &origins, key))?;
        secrets.ensure_set(&figment)?;
    }
    let config: T = figment
        .extract_lossy()
        .map_err(|e| to_config_error(&e, &origins))?;
    config.validate()?;
    let mut effective = Vec::new();
    if let Ok(value) = figment.extract::<figment::value::Value>() {
        redact::flatten("", &value, &secrets.keys, &mut effective);
    }
    effective.sort();
    Ok((config, effective))
}

/// The defaults, the dev profile when selected, an optional `KEEL_CONFIG_FILE`, `KEEL_*`
/// overrides and `*_FILE` secrets, in that order of precedence (later wins), plus which
/// variable set which key.
fn layered(
    embedded: &Embedded,
    dev: bool,
    env: &[(String, String)],
) -> Result<(Figment, Vec<(String, String)>), ConfigError> {
    let mut figment = Figment::new().merge(Toml::string(embedded.defaults));
    if dev {
        figment = figment.merge(Toml::string(embedded.dev));
    }
    if let Some((_, path)) = env.iter().find(|(k, _)| k == CONFIG_FILE_VAR) {
        figment = figment.merge(Toml::file_exact(PathBuf::from(path)));
    }

    // Plain KEEL_* overrides, kept as strings; `extract_lossy` turns `8080` into a number
    // only where the field is a number, so a numeric password stays a string.
    // `*_FILE` variables are handled below, so they are not keys themselves.
    let is_key = |k: &str| k != CONFIG_FILE_VAR && k != PROFILE_VAR;
    let mut origins: Vec<(String, String)> = Vec::new();
    for (var, value) in env
        .iter()
        .filter(|(k, _)| is_key(k) && !k.ends_with("_FILE"))
    {
        let key = env_var_to_key(var);
        figment = figment.merge((key.clone(), value.clone()));
        origins.push((key, var.clone()));
    }

    // Secrets from files win over everything: that is how mounted secrets rotate.
    for (var, path) in env
        .iter()
        .filter(|(k, _)| is_key(k) && k.ends_with("_FILE"))
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

/// ` (from KEEL_X)` or ` (from /path/file.toml)` for `key`, empty when unknown.
fn source_hint(figment: &Figment, origins: &[(String, String)], key: &str) -> String {
    origins
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, var)| format!(" (from {var})"))
        .or_else(|| {
            figment.find_metadata(key).and_then(|m| match &m.source {
                Some(figment::Source::File(p)) => Some(format!(" (from {})", p.display())),
                _ => None,
            })
        })
        .unwrap_or_default()
}

/// Loads the configuration or ends the process with exit code 78 and one line naming the key.
/// For `main` only: a library must never exit the process.
pub fn load_or_exit<T>(service: &str, embedded: impl Into<Embedded>) -> T
where
    T: DeserializeOwned + Validate,
{
    match load(embedded) {
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

/// A list in configuration: `["a", "b"]` in a file, `a,b` in an environment variable (where
/// a list cannot be spelled otherwise; an empty value is an empty list). For
/// `#[serde(deserialize_with = "keel_config::list")]` on a `Vec<T>` whose items parse from
/// text, such as `Vec<keel_http::client::Cidr>`.
pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<String>),
        Text(String),
    }
    let items: Vec<String> = match List::deserialize(d)? {
        List::Items(items) => items,
        List::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    items
        .iter()
        .map(|s| s.trim().parse().map_err(serde::de::Error::custom))
        .collect()
}

/// A list of human durations (see [`list`] and [`parse_duration`]): `["1s", "10s"]` in a
/// file, `1s,10s` in an environment variable.
pub fn durations<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<std::time::Duration>, D::Error> {
    Ok(list::<D, humantime_serde::re::humantime::Duration>(d)?
        .into_iter()
        .map(Into::into)
        .collect())
}
