//! billing's entry point: load config, install telemetry, run the `App` until a shutdown
//! signal — or run an operator command and exit:
//! - `billing migrate`: apply migrations (owner role, direct connection);
//! - `billing rebuild-projections`: rebuild the `payments` projection from the ledger's
//!   events (P10), in one transaction; safe while billing runs (writers wait, readers don't).

use billing::{App, Config};
use keel_http::shutdown_signal;
use keel_telemetry::Telemetry;

const SERVICE: &str = "billing";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = keel_config::load_or_exit(SERVICE, billing::DEFAULT_CONFIG);
    // Signal handlers first: a SIGTERM during start-up is still a graceful stop.
    let signal = shutdown_signal();
    let telemetry = Telemetry::init_or_exit(SERVICE, &config.telemetry);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => App::build(config).await?.run(signal).await.map(|_| ())?,
        Some("migrate") => billing::migrate(&config).await?,
        Some("rebuild-projections") => billing::rebuild_projections(&config).await.map(|_| ())?,
        Some(other) => {
            eprintln!(
                "{SERVICE}: unknown command `{other}`; usage: {SERVICE} [serve|migrate|rebuild-projections]"
            );
            std::process::exit(64); // EX_USAGE
        }
    }
    telemetry.shutdown();
    Ok(())
}
