//! The command line's contract: usage errors exit 64, `check-config` prints the effective
//! configuration with secrets redacted, and a bad key exits 78 naming it.
#![allow(clippy::unwrap_used)]

use keel_service::cli::{self, ServiceMain};

struct Demo;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DemoConfig {
    telemetry: keel_telemetry::TelemetryConfig,
    port: u16,
}

impl keel_config::Validate for DemoConfig {
    fn validate(&self) -> Result<(), keel_config::ConfigError> {
        self.telemetry.validate()
    }
}

impl ServiceMain for Demo {
    const NAME: &'static str = "demo";
    const ABOUT: &'static str = "a service for the CLI's tests";
    // No secrets, so no dev profile: the profile rules are keel-config's tests and
    // checkout's `tests/cli.rs` (the real binary).
    const DEFAULT_CONFIG: keel_config::Embedded = keel_config::Embedded::new(
        r#"
        port = 8080
        [telemetry]
        log_level = "info"
        lag_probe_interval = "100ms"
        max_runtime_lag = "1s"
    "#,
        "",
    );
    type Config = DemoConfig;
    fn telemetry(config: &DemoConfig) -> &keel_telemetry::TelemetryConfig {
        &config.telemetry
    }
    fn migrations(
        _: &DemoConfig,
    ) -> Option<(&keel_pg::DatabaseConfig, &'static sqlx::migrate::Migrator)> {
        None
    }
    async fn serve(
        _: DemoConfig,
        _: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
    list.iter().map(Into::into).collect()
}

#[tokio::test]
async fn an_unknown_command_is_a_usage_error_64() {
    assert_eq!(cli::run::<Demo>(args(&["demo", "frobnicate"])).await, 64);
    assert_eq!(cli::run::<Demo>(args(&["demo", "--bogus-flag"])).await, 64);
}

#[tokio::test]
async fn help_is_not_an_error() {
    assert_eq!(cli::run::<Demo>(args(&["demo", "--help"])).await, 0);
}

#[tokio::test]
async fn check_config_accepts_the_defaults() {
    assert_eq!(cli::run::<Demo>(args(&["demo", "check-config"])).await, 0);
}
