//! One TLS crypto provider, installed by whoever owns the process (see `keel_service::tls`).
//!
//! Keel compiles ring and nothing else, so reqwest (built `rustls-no-provider`) cannot even
//! build a client until a provider is installed: that is the failure this shows first. Then
//! `install_crypto_provider`, which the runtime calls from the command line and from
//! `Service::new`, makes the same call succeed. One test in its own binary, in that order:
//! the provider is process-wide and cannot be uninstalled.
#![allow(clippy::unwrap_used)]

#[test]
fn reqwest_builds_clients_only_once_the_runtime_installed_ring() {
    let without = std::panic::catch_unwind(|| reqwest::Client::builder().build());
    assert!(
        without.is_err(),
        "reqwest built a client with no provider installed: a second provider (aws-lc-rs, \
         reqwest's default) is compiled in again; deny.toml should have refused it"
    );

    keel_service::install_crypto_provider();
    // Twice is fine: the second call finds one installed and leaves it.
    keel_service::install_crypto_provider();
    reqwest::Client::builder()
        .build()
        .expect("a client once ring is installed");
    let provider = rustls::crypto::CryptoProvider::get_default().unwrap();
    assert!(
        !provider.cipher_suites.is_empty(),
        "ring's provider with its cipher suites"
    );
}
