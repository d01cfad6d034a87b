//! psp-sim's entry point: load config, install telemetry, serve until a shutdown signal.

use keel_http::shutdown_signal;
use keel_telemetry::Telemetry;
use psp_sim::{App, Config};

const SERVICE: &str = "psp-sim";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = keel_config::load_or_exit(SERVICE, psp_sim::DEFAULT_CONFIG);
    // Signal handlers first: a SIGTERM during start-up is still a graceful stop.
    let signal = shutdown_signal();
    let telemetry = Telemetry::init_or_exit(SERVICE, &config.telemetry);
    App::build(config).await?.run(signal).await?;
    telemetry.shutdown();
    Ok(())
}
