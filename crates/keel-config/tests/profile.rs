//! The dev profile's promises: the embedded defaults hold no secret; `KEEL_PROFILE=dev` adds
//! the checked-in development secrets; without it a missing secret fails naming its key, a
//! development secret is refused wherever it comes from, and an unknown profile is refused
//! naming `KEEL_PROFILE`; `check-config`'s listing redacts every key the profile holds.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use keel_config::{ConfigError, Embedded, ExposeSecret, SecretString, Validate};
use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Config {
    http: Http,
    database: Database,
    webhook: Webhook,
    psp: Psp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Http {
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Database {
    url: SecretString,
    #[serde(default)]
    replica_url: Option<SecretString>,
    max_connections: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Webhook {
    /// A list in TOML, or one string of space-separated items from a variable or a file, as
    /// billing takes its signing secrets.
    #[serde(deserialize_with = "secret_list")]
    secrets: Vec<SecretString>,
    tolerance: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Psp {
    base_url: String,
    /// A secret whose name says nothing: only the profile tells the loader it is one.
    credentials: SecretString,
}

fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let items = match Form::deserialize(d)? {
        Form::One(s) => s.split_whitespace().map(str::to_owned).collect(),
        Form::Many(v) => v,
    };
    Ok(items.into_iter().map(SecretString::from).collect())
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// No secret: a service's `config/default.toml`.
const DEFAULTS: &str = r#"
[http]
port = 8080

[database]
max_connections = 10

[webhook]
tolerance = "5m"

[psp]
base_url = "http://127.0.0.1:8090"
"#;

/// Nothing but secrets: a service's `config/dev.toml`.
const DEV: &str = r#"
[database]
url = "postgres://app:app_dev@127.0.0.1:6432/keel"

[webhook]
secrets = ["whsec_devAAAAAAAAAAAA", "whsec_devBBBBBBBBBBBB"]

[psp]
credentials = "psp-dev-credentials"
"#;

const EMBEDDED: Embedded = Embedded::new(DEFAULTS, DEV);

/// Every development value, none of which may ever be printed.
const DEV_VALUES: [&str; 4] = [
    "app_dev",
    "whsec_devAAAAAAAAAAAA",
    "whsec_devBBBBBBBBBBBB",
    "psp-dev-credentials",
];

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    keel_config::load_from(EMBEDDED, env(pairs))
}

/// A deployment's own secrets: what production sets instead of the profile.
const PRODUCTION: [(&str, &str); 3] = [
    (
        "KEEL_DATABASE__URL",
        "postgres://app:Zq9-prod-only@db.internal:6432/keel",
    ),
    ("KEEL_WEBHOOK__SECRETS", "whsec_prodCCCCCCCCCCCC"),
    ("KEEL_PSP__CREDENTIALS", "psp-prod-credentials"),
];

fn production_with(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = env(&PRODUCTION);
    vars.extend(env(pairs));
    vars
}

fn file_with(name: &str, contents: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("keel-config-profile-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

fn assert_no_dev_value(text: &str) {
    for value in DEV_VALUES {
        assert!(!text.contains(value), "{value} printed: {text}");
    }
}

#[test]
fn the_dev_profile_adds_the_development_secrets() {
    let c = load(&[("KEEL_PROFILE", "dev")]).unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://app:app_dev@127.0.0.1:6432/keel"
    );
    assert_eq!(c.webhook.secrets.len(), 2);
    assert_eq!(c.psp.credentials.expose_secret(), "psp-dev-credentials");
    // Overrides still win over the profile, as over the defaults.
    let c = load(&[("KEEL_PROFILE", "dev"), ("KEEL_HTTP__PORT", "0")]).unwrap();
    assert_eq!(c.http.port, 0);
}

#[test]
fn without_the_profile_a_missing_secret_names_its_key_and_the_others_missing() {
    let e = load(&[]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::MissingSecret { key, .. } if key == "database.url"),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with("config key `database.url`: secret not set"),
        "{text}"
    );
    assert!(
        text.contains("KEEL_DATABASE__URL_FILE"),
        "how to set it: {text}"
    );
    assert!(
        text.contains("KEEL_PROFILE=dev"),
        "how to get dev's: {text}"
    );
    for other in ["`psp.credentials`", "`webhook.secrets`"] {
        assert!(text.contains(other), "{other} missing too: {text}");
    }
    assert!(!text.contains('\n'), "one line: {text}");
    assert_no_dev_value(&text);

    // One left out of three: only that one is named.
    let e = keel_config::load_from::<Config, _>(
        EMBEDDED,
        env(&PRODUCTION[..2]).into_iter().chain(env(&[])),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("config key `psp.credentials`: secret not set"),
        "{e}"
    );
    assert!(!e.contains("also"), "{e}");
}

#[test]
fn without_the_profile_the_deployments_own_secrets_load() {
    let secrets = file_with(
        "own-secrets",
        "whsec_prodCCCCCCCCCCCC\nwhsec_prodDDDDDDDDDDDD\n",
    );
    let vars = production_with(&[("KEEL_WEBHOOK__SECRETS_FILE", secrets.to_str().unwrap())]);
    let c: Config = keel_config::load_from(EMBEDDED, vars).unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://app:Zq9-prod-only@db.internal:6432/keel"
    );
    assert_eq!(c.webhook.secrets.len(), 2);
    let _ = std::fs::remove_file(secrets);
}

/// Asserts the variables (over production's own secrets) are refused as a development secret
/// under `key`, naming where it came from, without printing it.
fn assert_refused(pairs: &[(&str, &str)], key: &str, from: &str) {
    let e = keel_config::load_from::<Config, _>(EMBEDDED, production_with(pairs)).unwrap_err();
    assert!(
        matches!(&e, ConfigError::DevSecret { key: k, .. } if k == key),
        "{pairs:?}: {e:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("config key `{key}`: holds a development secret")),
        "{text}"
    );
    assert!(text.contains(&format!("(from {from})")), "{text}");
    assert!(text.contains("KEEL_PROFILE=dev"), "{text}");
    assert_no_dev_value(&text);
}

#[test]
fn a_development_secret_is_refused_outside_the_profile_wherever_it_comes_from() {
    let dev_url = "postgres://app:app_dev@127.0.0.1:6432/keel";
    // From a variable, whole.
    assert_refused(
        &[("KEEL_DATABASE__URL", dev_url)],
        "database.url",
        "KEEL_DATABASE__URL",
    );
    // Its password with another host: the same leaked password.
    assert_refused(
        &[(
            "KEEL_DATABASE__URL",
            "postgres://app:app_dev@db.internal:6432/keel",
        )],
        "database.url",
        "KEEL_DATABASE__URL",
    );
    // Under a key the profile does not set.
    assert_refused(
        &[("KEEL_DATABASE__REPLICA_URL", dev_url)],
        "database.replica_url",
        "KEEL_DATABASE__REPLICA_URL",
    );
    // One item of a list given as one string, next to a real one.
    assert_refused(
        &[(
            "KEEL_WEBHOOK__SECRETS",
            "whsec_prodCCCCCCCCCCCC whsec_devBBBBBBBBBBBB",
        )],
        "webhook.secrets",
        "KEEL_WEBHOOK__SECRETS",
    );
    // From a mounted secret file.
    let file = file_with("dev-secret", "psp-dev-credentials\n");
    assert_refused(
        &[("KEEL_PSP__CREDENTIALS_FILE", file.to_str().unwrap())],
        "psp.credentials",
        "KEEL_PSP__CREDENTIALS_FILE",
    );
    let _ = std::fs::remove_file(file);
    // From a KEEL_CONFIG_FILE.
    let file = file_with(
        "config.toml",
        "[webhook]\nsecrets = [\"whsec_devAAAAAAAAAAAA\"]\n",
    );
    let path = file.to_str().unwrap().to_owned();
    let e = keel_config::load_from::<Config, _>(
        EMBEDDED,
        env(&[
            ("KEEL_DATABASE__URL", PRODUCTION[0].1),
            ("KEEL_PSP__CREDENTIALS", PRODUCTION[2].1),
            ("KEEL_CONFIG_FILE", &path),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("config key `webhook.secrets`: holds a development secret"),
        "{e}"
    );
    assert!(e.contains(&path), "names the file: {e}");
    assert_no_dev_value(&e);
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_same_values_are_accepted_under_the_profile() {
    let mut vars = production_with(&[(
        "KEEL_WEBHOOK__SECRETS",
        "whsec_prodCCCCCCCCCCCC whsec_devBBBBBBBBBBBB",
    )]);
    vars.push(("KEEL_PROFILE".into(), "dev".into()));
    let c: Config = keel_config::load_from(EMBEDDED, vars).unwrap();
    assert_eq!(c.webhook.secrets.len(), 2);
}

#[test]
fn an_unknown_profile_is_refused_naming_keel_profile() {
    for value in ["prod", "DEV", "devel", "dev,prod"] {
        let e = load(&[("KEEL_PROFILE", value)]).unwrap_err();
        assert!(
            matches!(e, ConfigError::UnknownProfile { .. }),
            "{value}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.starts_with("KEEL_PROFILE: unknown profile"), "{text}");
        assert!(text.contains("`dev`"), "names the one profile: {text}");
    }
    // Empty is unset (what `KEEL_PROFILE=` in a shell or compose file gives): production.
    let e = load(&[("KEEL_PROFILE", "")]).unwrap_err();
    assert!(matches!(e, ConfigError::MissingSecret { .. }), "{e:?}");
    // The last assignment wins, as a test's own variables over its harness's.
    let e = load(&[("KEEL_PROFILE", "dev"), ("KEEL_PROFILE", "")]).unwrap_err();
    assert!(matches!(e, ConfigError::MissingSecret { .. }), "{e:?}");
}

#[test]
fn a_secret_in_the_defaults_is_refused_in_every_profile() {
    const LEAKY: Embedded = Embedded::new(
        r#"
        [http]
        port = 8080
        [database]
        url = "postgres://app:app_dev@127.0.0.1:6432/keel"
        max_connections = 10
        [webhook]
        tolerance = "5m"
        [psp]
        base_url = "http://127.0.0.1:8090"
        "#,
        DEV,
    );
    for profile in ["dev", ""] {
        let e = keel_config::load_from::<Config, _>(LEAKY, env(&[("KEEL_PROFILE", profile)]))
            .unwrap_err();
        assert!(
            matches!(&e, ConfigError::SecretInDefaults { key } if key == "database.url"),
            "{profile:?}: {e:?}"
        );
        assert_no_dev_value(&e.to_string());
    }
}

#[test]
fn the_effective_listing_redacts_every_key_the_profile_holds() {
    let listing = |vars: Vec<(String, String)>| -> String {
        let (_, effective) = keel_config::load_effective_from::<Config, _>(EMBEDDED, vars).unwrap();
        effective
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect()
    };
    let dev = listing(env(&[("KEEL_PROFILE", "dev")]));
    assert_no_dev_value(&dev);
    // A name that says nothing is redacted because the profile holds it.
    assert!(dev.contains("psp.credentials = <redacted>"), "{dev}");
    assert!(dev.contains("webhook.secrets = <redacted>"), "{dev}");
    // A URL keeps what an operator checks.
    assert!(dev.contains("database.url = postgres://app:"), "{dev}");
    assert!(dev.contains("@127.0.0.1:6432/keel"), "{dev}");
    assert!(
        dev.contains("psp.base_url = http://127.0.0.1:8090"),
        "{dev}"
    );

    // Production's values under the same keys are redacted the same way.
    let prod = listing(production_with(&[]));
    for (_, value) in PRODUCTION {
        assert!(!prod.contains(value), "{value} printed: {prod}");
    }
    assert!(!prod.contains("Zq9-prod-only"), "{prod}");
    assert!(prod.contains("psp.credentials = <redacted>"), "{prod}");
    assert!(prod.contains("@db.internal:6432/keel"), "{prod}");
}
