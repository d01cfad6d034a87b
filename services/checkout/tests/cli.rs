//! The shared command line (keel_service::cli) on the real `checkout` binary: the exit codes a
//! supervisor or a script relies on, `check-config` as compose and Kubernetes will run it, and
//! a start-up failure as one JSON line.
#![allow(clippy::unwrap_used)]

use keel_testkit::ServiceProcess;

const BIN: &str = env!("CARGO_BIN_EXE_checkout");

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn an_unknown_command_or_flag_exits_64() {
    for args in [
        &["frobnicate"][..],
        &["--bogus"][..],
        &["migrate", "--wait"][..],
    ] {
        let (status, _, stderr) = ServiceProcess::run_to_exit(BIN, args, &[]).await;
        assert_eq!(status.code(), Some(64), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn check_config_prints_the_effective_values_with_secrets_redacted_and_exits_0() {
    let url = "postgres://checkout_app:sup3r-secret@db.example:6432/keel_checkout";
    let (status, stdout, stderr) = ServiceProcess::run_to_exit(
        BIN,
        &["check-config"],
        &env(&[("KEEL_DATABASE__URL", url), ("KEEL_HTTP__PORT", "9123")]),
    )
    .await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("http.port = 9123"), "{stdout}");
    assert!(
        stdout.contains("database.url = postgres://checkout_app:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("@db.example:6432/keel_checkout"),
        "{stdout}"
    );
    for secret in ["sup3r-secret", "checkout_owner_dev", "guest:guest"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
}

#[tokio::test]
async fn check_config_exits_78_naming_a_bad_key_exactly_as_serve_would() {
    let vars = env(&[("KEEL_SAGA__CONCURRENCY", "many")]);
    let (check, _, check_err) = ServiceProcess::run_to_exit(BIN, &["check-config"], &vars).await;
    let (serve, _, serve_err) = ServiceProcess::run_to_exit(BIN, &["serve"], &vars).await;
    assert_eq!(check.code(), Some(78), "{check_err}");
    assert_eq!(serve.code(), Some(78), "{serve_err}");
    assert!(check_err.contains("saga.concurrency"), "{check_err}");
    assert_eq!(check_err, serve_err, "the same loading, the same message");
}

#[tokio::test]
async fn migrate_exits_69_when_postgres_stays_unreachable_past_its_wait() {
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let url = "postgres://checkout_owner:checkout_owner_dev@127.0.0.1:1/keel_checkout";
    let started = std::time::Instant::now();
    let (status, stdout, stderr) = ServiceProcess::run_to_exit(
        BIN,
        &["migrate", "--wait", "1s"],
        &env(&[("KEEL_DATABASE__MIGRATE_URL", url)]),
    )
    .await;
    assert_eq!(status.code(), Some(69), "{stdout}{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // One JSON error line says why, naming the dependency.
    let errors: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{stdout}");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("postgres"),
        "{stdout}"
    );
    assert_eq!(errors[0]["exit_code"], 69);
}

#[tokio::test]
async fn a_start_up_failure_is_one_json_line_and_exit_1() {
    // Take the port first: binding it is the start-up step that fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (status, stdout, stderr) =
        ServiceProcess::run_to_exit(BIN, &["serve"], &env(&[("KEEL_HTTP__PORT", &port)])).await;
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let errors: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{stdout}");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("cannot bind"),
        "{stdout}"
    );
    assert!(stderr.trim().is_empty(), "nothing unstructured: {stderr}");
}
