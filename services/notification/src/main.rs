//! notification's entry point: load config, install telemetry, run the `App` until a
//! shutdown signal — or, with `notification migrate`, apply migrations and exit.

use keel_http::shutdown_signal;
use keel_telemetry::Telemetry;
use notification::{App, Config};

const SERVICE: &str = "notification";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = keel_config::load_or_exit(SERVICE, notification::DEFAULT_CONFIG);
    // Signal handlers first: a SIGTERM during start-up is still a graceful stop.
    let signal = shutdown_signal();
    let telemetry = Telemetry::init_or_exit(SERVICE, &config.telemetry);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => App::build(config).await?.run(signal).await.map(|_| ())?,
        Some("migrate") => notification::migrate(&config).await?,
        Some(other) => {
            eprintln!("{SERVICE}: unknown command `{other}`; usage: {SERVICE} [serve|migrate]");
            std::process::exit(64); // EX_USAGE
        }
    }
    telemetry.shutdown();
    Ok(())
}
