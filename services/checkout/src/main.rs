//! checkout's entry point: load config, install telemetry, run the `App` until a shutdown
//! signal — or, with `checkout migrate`, apply migrations as the owner role and exit.

use checkout::{App, Config};
use keel_http::shutdown_signal;
use keel_telemetry::Telemetry;

const SERVICE: &str = "checkout";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = keel_config::load_or_exit(SERVICE, checkout::DEFAULT_CONFIG);
    // Signal handlers first: a SIGTERM during start-up is still a graceful stop.
    let signal = shutdown_signal();
    let telemetry = Telemetry::init_or_exit(SERVICE, &config.telemetry);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            let app = App::build(config).await?;
            app.run(signal).await?;
        }
        Some("migrate") => checkout::migrate(&config).await?,
        Some(other) => {
            eprintln!("{SERVICE}: unknown command `{other}`; usage: {SERVICE} [serve|migrate]");
            std::process::exit(64); // EX_USAGE
        }
    }
    telemetry.shutdown();
    Ok(())
}
