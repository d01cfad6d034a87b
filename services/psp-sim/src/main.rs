//! psp-sim's entry point: load config, install telemetry, serve until a shutdown signal.

use keel_http::shutdown_signal;
use keel_telemetry::Telemetry;
use psp_sim::{App, Config};

const SERVICE: &str = "psp-sim";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = keel_config::load_or_exit(SERVICE, psp_sim::DEFAULT_CONFIG);
    let telemetry = Telemetry::init(SERVICE, &config.telemetry)?;
    App::build(config).await?.run(shutdown_signal()).await?;
    telemetry.shutdown();
    Ok(())
}
