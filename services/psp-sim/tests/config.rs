//! psp-sim's configuration: the checked-in defaults are valid, and each bound is checked with
//! the offending key named.
#![allow(clippy::unwrap_used)]

use psp_sim::Config;

/// Under the dev profile, as `make dev` and the tests run psp-sim: its development webhook
/// secret is in.
fn load(vars: &[(&str, &str)]) -> Result<Config, keel_config::ConfigError> {
    keel_config::load_from(
        psp_sim::DEFAULT_CONFIG,
        [("KEEL_PROFILE", "dev")]
            .iter()
            .chain(vars)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

fn rejected_key(vars: &[(&str, &str)]) -> String {
    load(vars).unwrap_err().to_string()
}

#[test]
fn the_checked_in_defaults_are_valid() {
    let config = load(&[]).unwrap();
    assert_eq!(config.webhook.max_attempts, 50);
    assert_eq!(config.faults.flaky_failures, 2);
    assert_eq!(config.store.max_authorizations, 100_000);
}

#[test]
fn a_webhook_secret_that_is_not_whsec_base64_is_rejected_without_printing_it() {
    let e = rejected_key(&[("KEEL_WEBHOOK__SECRET", "S2vWrImrY1hJwx70XjbtZeu65l4ixwO6")]);
    assert!(e.contains("webhook.secret"), "{e}");
    assert!(
        !e.contains("S2vWrImrY1hJwx70"),
        "the secret must not be echoed: {e}"
    );
    let e = rejected_key(&[("KEEL_WEBHOOK__SECRET", "whsec_???")]);
    assert!(e.contains("webhook.secret"), "{e}");
}

#[test]
fn waits_must_end_before_the_request_timeout() {
    let e = rejected_key(&[("KEEL_FAULTS__TIMEOUT_HOLD", "35s")]);
    assert!(e.contains("faults.timeout_hold"), "{e}");
    let e = rejected_key(&[("KEEL_FAULTS__MAX_LATENCY", "1h")]);
    assert!(e.contains("faults.max_latency"), "{e}");
}

#[test]
fn webhook_bounds_are_checked() {
    let e = rejected_key(&[
        ("KEEL_WEBHOOK__INITIAL_BACKOFF", "1s"),
        ("KEEL_WEBHOOK__MAX_BACKOFF", "500ms"),
    ]);
    assert!(e.contains("webhook.max_backoff"), "{e}");
    let e = rejected_key(&[("KEEL_WEBHOOK__MAX_ATTEMPTS", "0")]);
    assert!(e.contains("webhook.max_attempts"), "{e}");
    let e = rejected_key(&[("KEEL_WEBHOOK__QUEUE_CAPACITY", "0")]);
    assert!(e.contains("webhook.queue_capacity"), "{e}");
    let e = rejected_key(&[("KEEL_WEBHOOK__URL", "ftp://example.invalid/hook")]);
    assert!(e.contains("webhook.url"), "{e}");
    let e = rejected_key(&[("KEEL_STORE__MAX_AUTHORIZATIONS", "0")]);
    assert!(e.contains("store.max_authorizations"), "{e}");
}
