//! The process's TLS crypto provider: ring, installed by whoever owns the process.
//!
//! Keel compiles one rustls provider, ring (`deny.toml` bans aws-lc-rs, a large C build that
//! buys nothing here). sqlx and lapin pick the only provider compiled in by themselves, but
//! reqwest 0.13 without its aws-lc-rs default (`rustls-no-provider`) reads rustls's process
//! default and panics while *building* a client when none is installed, even a client that
//! only ever speaks plain `http://`. The runtime owns the process, so it installs ring before
//! anything can build a client: first thing on the command line ([`crate::cli::run`]) and in
//! [`crate::Service::new`], because tests start services in-process without the command line.
//! No pattern page of its own: it keeps every outbound client (P16) able to speak TLS.
//!
//! Must not break: call it before the first `reqwest::Client` is built, never after.

/// Installs ring as rustls's process-wide crypto provider; does nothing if one is installed.
pub fn install_crypto_provider() {
    // Err only says a provider is installed already (ours, earlier, or the embedding
    // program's): either way clients now have one, which is all this promises.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
