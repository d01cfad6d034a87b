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

/// A one-connection HTTP peer on loopback that answers every request with `answer` (or, with
/// `None`, reads the request and never answers). Returns its URL for `path`.
async fn peer(answer: Option<&'static str>, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await;
        match answer {
            Some(status) => {
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = socket.write_all(reply.as_bytes()).await;
            }
            // Hold the connection open, unanswered, until the test's runtime ends.
            None => std::future::pending::<()>().await,
        }
    });
    url
}

#[tokio::test]
async fn probe_exits_0_on_a_2xx_and_1_on_anything_else() {
    let ok = peer(Some("200 OK"), "/readyz").await;
    assert_eq!(cli::run::<Demo>(args(&["demo", "probe", &ok])).await, 0);
    // A draining service's readiness: the check must fail, not pass on "an answer came".
    let draining = peer(Some("503 Service Unavailable"), "/readyz").await;
    assert_eq!(
        cli::run::<Demo>(args(&["demo", "probe", &draining])).await,
        1
    );
    // Nothing listening: refused at once.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/readyz", l.local_addr().unwrap())
    };
    assert_eq!(cli::run::<Demo>(args(&["demo", "probe", &closed])).await, 1);
}

#[tokio::test]
async fn probe_of_a_hung_service_fails_within_its_timeout() {
    let hung = peer(None, "/readyz").await;
    let started = std::time::Instant::now();
    let code = cli::run::<Demo>(args(&["demo", "probe", &hung, "--timeout", "300ms"])).await;
    assert_eq!(code, 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn probe_refuses_a_bad_url_as_a_usage_error() {
    assert_eq!(
        cli::run::<Demo>(args(&["demo", "probe", "https://127.0.0.1:1/readyz"])).await,
        64
    );
    assert_eq!(
        cli::run::<Demo>(args(&["demo", "probe", "http://127.0.0.1/readyz"])).await,
        64
    );
    assert_eq!(cli::run::<Demo>(args(&["demo", "probe"])).await, 64);
}
