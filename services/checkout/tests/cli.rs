//! The shared command line (keel_service::cli) on the real `checkout` binary: the exit codes a
//! supervisor or a script relies on, `check-config` as compose and Kubernetes will run it, a
//! start-up failure as one JSON line, and the profile rules: the development secrets come only
//! with `KEEL_PROFILE=dev` (which `ServiceProcess` sets, as `make dev` does); without it a
//! missing secret or a development one exits 78 naming its key.
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
    for secret in [
        "sup3r-secret",
        "checkout_owner_dev",
        "checkout:checkout_dev",
    ] {
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

/// No `KEEL_PROFILE`: how a production deployment runs the binary. (`ServiceProcess` sets
/// `KEEL_PROFILE=dev` before a test's own variables; an empty value unsets it.)
const PRODUCTION: (&str, &str) = ("KEEL_PROFILE", "");

/// Runs `check-config` and `serve` with `vars`: both must exit 78 with the same one line on
/// stderr (the same loading), which is returned.
async fn both_exit_78(vars: &[(&str, &str)]) -> String {
    let vars = env(vars);
    let (check, check_out, check_err) =
        ServiceProcess::run_to_exit(BIN, &["check-config"], &vars).await;
    let (serve, _, serve_err) = ServiceProcess::run_to_exit(BIN, &["serve"], &vars).await;
    assert_eq!(check.code(), Some(78), "{check_out}{check_err}");
    assert_eq!(serve.code(), Some(78), "{serve_err}");
    assert_eq!(check_err, serve_err, "the same loading, the same message");
    assert!(
        check_out.is_empty(),
        "nothing listed on failure: {check_out}"
    );
    assert_eq!(check_err.trim().lines().count(), 1, "one line: {check_err}");
    check_err
}

#[tokio::test]
async fn the_dev_profile_gives_a_complete_configuration_whose_secrets_check_config_redacts() {
    // No variable but the profile: the embedded defaults and the embedded dev profile.
    let (status, stdout, stderr) =
        ServiceProcess::run_to_exit(BIN, &["check-config"], &env(&[("KEEL_PROFILE", "dev")])).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Every secret the dev profile holds is listed, none of them readable.
    for line in [
        "database.url = postgres://checkout_app:%3Credacted%3E@127.0.0.1:6432/keel_checkout",
        "database.migrate_url = postgres://checkout_owner:%3Credacted%3E@127.0.0.1:5432/keel_checkout",
        "amqp.url = amqp://checkout:%3Credacted%3E@127.0.0.1:5672/keel",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} not in:\n{stdout}"
        );
    }
    for secret in [
        "checkout_app_dev",
        "checkout_owner_dev",
        "checkout:checkout_dev",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
}

#[tokio::test]
async fn without_the_dev_profile_a_missing_secret_exits_78_naming_the_key() {
    let line = both_exit_78(&[PRODUCTION]).await;
    // The first missing key leads (`config key `…`: secret not set`), the others follow.
    assert!(
        line.contains("invalid configuration: config key `") && line.contains("secret not set"),
        "{line}"
    );
    for key in ["`database.url`", "`database.migrate_url`", "`amqp.url`"] {
        assert!(line.contains(key), "{key} not named: {line}");
    }
    assert!(line.contains("_FILE"), "how to mount it: {line}");
    assert!(
        line.contains("KEEL_PROFILE=dev"),
        "how to get dev's: {line}"
    );

    // Set one, and it is no longer named; the rest still are.
    let line = both_exit_78(&[
        PRODUCTION,
        (
            "KEEL_DATABASE__URL",
            "postgres://checkout_app:Prod-9f2c@db.internal:6432/keel_checkout",
        ),
    ])
    .await;
    assert!(!line.contains("`database.url`"), "{line}");
    assert!(line.contains("`database.migrate_url`"), "{line}");
    assert!(!line.contains("Prod-9f2c"), "printed: {line}");
}

#[tokio::test]
async fn outside_the_dev_profile_a_development_secret_exits_78_naming_the_key() {
    // The dev profile's broker URL, from a variable.
    let line = both_exit_78(&[
        PRODUCTION,
        (
            "KEEL_AMQP__URL",
            "amqp://checkout:checkout_dev@127.0.0.1:5672/keel",
        ),
    ])
    .await;
    assert!(
        line.contains("config key `amqp.url`: holds a development secret (from KEEL_AMQP__URL)"),
        "{line}"
    );
    assert!(!line.contains("checkout_dev"), "printed: {line}");

    // The dev database password on another host, from a mounted secret file.
    let file = std::env::temp_dir().join(format!("checkout-cli-dev-secret-{}", std::process::id()));
    std::fs::write(
        &file,
        "postgres://checkout_app:checkout_app_dev@db.internal:6432/keel_checkout\n",
    )
    .unwrap();
    let line = both_exit_78(&[
        PRODUCTION,
        ("KEEL_DATABASE__URL_FILE", file.to_str().unwrap()),
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    assert!(
        line.contains(
            "config key `database.url`: holds a development secret (from KEEL_DATABASE__URL_FILE)"
        ),
        "{line}"
    );
    assert!(!line.contains("checkout_app_dev"), "printed: {line}");
}

#[tokio::test]
async fn an_unknown_profile_exits_78_naming_keel_profile() {
    let line = both_exit_78(&[("KEEL_PROFILE", "production")]).await;
    assert!(
        line.contains("KEEL_PROFILE: unknown profile `production`"),
        "{line}"
    );
}
