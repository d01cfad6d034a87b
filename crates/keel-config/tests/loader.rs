//! The loader's promises: defaults, `KEEL_*` overrides with `__` nesting, secrets from
//! `*_FILE`, unknown keys rejected, validation naming the key, secrets never printed.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    http: Http,
    database: Database,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Http {
    port: u16,
    #[serde(with = "keel_config::duration")]
    timeout: std::time::Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Database {
    url: SecretString,
    max_connections: u32,
    #[serde(default)]
    password: Option<SecretString>,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "database.max_connections",
            self.database.max_connections,
            1,
            100,
        )?;
        ensure_url("database.url", &self.database.url, &["postgres"])
    }
}

const DEFAULTS: &str = r#"
[http]
port = 8080
timeout = "5s"

[database]
url = "postgres://app:s3cret-default@localhost:6432/db"
max_connections = 10
"#;

fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    keel_config::load_from(
        DEFAULTS,
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

#[test]
fn defaults_load_without_environment() {
    let c = load(&[]).unwrap();
    assert_eq!(c.http.port, 8080);
    assert_eq!(c.http.timeout, std::time::Duration::from_secs(5));
}

#[test]
fn keel_variables_override_nested_keys() {
    let c = load(&[
        ("KEEL_HTTP__PORT", "9000"),
        ("KEEL_HTTP__TIMEOUT", "250ms"),
        ("OTHER", "x"),
    ])
    .unwrap();
    assert_eq!(c.http.port, 9000);
    assert_eq!(c.http.timeout, std::time::Duration::from_millis(250));
}

#[test]
fn a_bad_value_names_the_key_and_the_variable() {
    let e = load(&[("KEEL_HTTP__PORT", "abc")]).unwrap_err().to_string();
    assert!(e.contains("`http.port`"), "{e}");
    assert!(e.contains("KEEL_HTTP__PORT"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn an_unknown_key_is_rejected_not_ignored() {
    let e = load(&[("KEEL_HTTP__PROT", "9000")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`http.prot`") && e.contains("unknown key"),
        "{e}"
    );
}

#[test]
fn out_of_range_values_are_rejected_by_validation() {
    let e = load(&[("KEEL_DATABASE__MAX_CONNECTIONS", "0")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`database.max_connections`") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn a_bad_url_is_reported_by_key_without_its_secret_value() {
    let e = load(&[("KEEL_DATABASE__URL", "mysql://app:topsecret@db/x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`database.url`"), "{e}");
    assert!(!e.contains("topsecret"), "the password leaked: {e}");
}

#[test]
fn secrets_are_read_from_file_variables() {
    let mut f = tempfile();
    writeln!(f.1, "postgres://app:from-file@db:6432/x").unwrap();
    let c = load(&[("KEEL_DATABASE__URL_FILE", f.0.to_str().unwrap())]).unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://app:from-file@db:6432/x"
    );
}

#[test]
fn a_missing_secret_file_names_the_key_and_the_variable() {
    let e = load(&[("KEEL_DATABASE__URL_FILE", "/nonexistent/secret")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`database.url`") && e.contains("KEEL_DATABASE__URL_FILE"),
        "{e}"
    );
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let c = load(&[]).unwrap();
    let printed = format!("{c:?} {c:#?}");
    assert!(!printed.contains("s3cret-default"), "{printed}");
    assert!(printed.contains("REDACTED"), "{printed}");
}

fn tempfile() -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("keel-config-test-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}

#[test]
fn a_numeric_secret_from_the_environment_stays_a_string() {
    let c = load(&[
        ("KEEL_DATABASE__PASSWORD", "123456"),
        ("KEEL_HTTP__PORT", "9001"),
    ])
    .unwrap();
    assert_eq!(c.database.password.unwrap().expose_secret(), "123456");
    assert_eq!(
        c.http.port, 9001,
        "while a numeric field still parses from text"
    );
}

#[test]
fn effective_settings_are_listed_with_secrets_redacted() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct C {
        db: Db,
        webhook: Hook,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Db {
        url: keel_config::SecretString,
        max: u32,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Hook {
        secrets: Vec<keel_config::SecretString>,
        api_key: keel_config::SecretString,
    }
    impl keel_config::Validate for C {
        fn validate(&self) -> Result<(), keel_config::ConfigError> {
            Ok(())
        }
    }
    let defaults = r#"
        [db]
        url = "postgres://app:hunter2@127.0.0.1:6432/keel"
        max = 10
        [webhook]
        secrets = ["whsec_AAAA", "whsec_BBBB"]
        api_key = "sk_live_123"
    "#;
    let env = [("KEEL_DB__MAX".to_owned(), "12".to_owned())];
    let (_, effective) = keel_config::load_effective_from::<C, _>(defaults, env).unwrap();
    let text: String = effective
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    for secret in ["hunter2", "whsec_AAAA", "sk_live_123"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert!(
        text.contains("db.url = postgres://app:%3Credacted%3E@127.0.0.1:6432/keel")
            || text.contains("db.url = postgres://app:<redacted>@127.0.0.1:6432/keel"),
        "{text}"
    );
    assert!(text.contains("db.max = 12"), "{text}");
    assert!(text.contains("webhook.secrets = <redacted>"), "{text}");
}

#[test]
fn secrets_in_a_table_or_a_query_string_are_redacted_too() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct C {
        db: Db,
        webhook: Hook,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Db {
        url: keel_config::SecretString,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Hook {
        secrets: Secrets,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Secrets {
        current: keel_config::SecretString,
        previous: keel_config::SecretString,
    }
    impl keel_config::Validate for C {
        fn validate(&self) -> Result<(), keel_config::ConfigError> {
            Ok(())
        }
    }
    let defaults = r#"
        [db]
        url = "postgres://app@127.0.0.1:6432/keel?password=hunter2&sslmode=disable"
        [webhook.secrets]
        current = "whsec_AAAA"
        previous = "whsec_BBBB"
    "#;
    let (_, effective) =
        keel_config::load_effective_from::<C, _>(defaults, std::iter::empty()).unwrap();
    let text: String = effective
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    for secret in ["hunter2", "whsec_AAAA", "whsec_BBBB"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert!(
        text.contains("sslmode=disable"),
        "the rest is shown: {text}"
    );
}
