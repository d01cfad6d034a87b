//! The one command line every Keel service has (clap): `serve` (the default), `migrate`, `probe`,
//! `check-config`, `topology`, plus the service's own commands (billing's
//! `rebuild-projections`).
//!
//! A service's `main.rs` is one line, `keel_service::cli::main::<MyService>()`, and the
//! [`ServiceMain`] impl says what is specific to it. Exit codes (BSD `sysexits.h`, so
//! supervisors and scripts can tell failures apart):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | clean stop (or `check-config` found the configuration valid) |
//! | 64 | usage: unknown command or flag |
//! | 69 | a dependency stayed unavailable past the start-up deadline (`migrate --wait`) |
//! | 78 | configuration: one line naming the key |
//! | 1 | anything else, including a background task that ended early (see [`crate::runtime`]) |
//!
//! A start-up failure after telemetry is up is one JSON log line, and spans are flushed
//! before the exit. Configuration errors come before telemetry exists (its settings are part
//! of the configuration), so they are one plain line on stderr.

use std::future::Future;
use std::time::{Duration, Instant};

use clap::{Arg, ArgMatches, Command};
use keel_config::{ConfigError, Validate};
use keel_pg::DatabaseConfig;
use keel_resilience::BackoffPolicy;
use keel_telemetry::{Telemetry, TelemetryConfig};
use serde::de::DeserializeOwned;
use sqlx::migrate::Migrator;

use crate::signal::shutdown_signal;

/// Usage error (`EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// A dependency unavailable past its start-up deadline (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Configuration error (`EX_CONFIG`).
pub const EXIT_CONFIG: i32 = keel_config::EXIT_CONFIG;
/// Anything else.
pub const EXIT_FAILURE: i32 = 1;

/// What makes a service a service, for the command line.
pub trait ServiceMain {
    /// The binary's and the service's name (`checkout`).
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// The checked-in configuration, embedded: `config/default.toml` (no secret) and the
    /// development profile `config/dev.toml`, layered only under `KEEL_PROFILE=dev`
    /// (`keel_config::embed!()` reads both).
    const DEFAULT_CONFIG: keel_config::Embedded;
    /// The typed configuration.
    type Config: DeserializeOwned + Validate + Send + 'static;

    /// Where the telemetry settings are in the configuration.
    fn telemetry(config: &Self::Config) -> &TelemetryConfig;

    /// The database and the service's own migrations (the platform's are applied before
    /// them), for `migrate`. The default is a service without a database.
    fn migrations(config: &Self::Config) -> Option<(&DatabaseConfig, &'static Migrator)> {
        let _ = config;
        None
    }

    /// The RabbitMQ queues the service consumes (with their retry tiers and DLQs), as `config`
    /// declares them: what the definitions file (`infra/rabbitmq/definitions.json`) must hold
    /// for it, and what its broker user may touch. The default is a service that consumes
    /// nothing.
    fn queues(config: &Self::Config) -> Vec<keel_amqp::topology::QueueSpec> {
        let _ = config;
        Vec::new()
    }

    /// Builds the service and runs it until `signal` (and the staged shutdown after it).
    fn serve(
        config: Self::Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = anyhow::Result<()>>;

    /// The service's own subcommands, beyond serve / migrate / check-config.
    fn commands() -> Vec<Command> {
        Vec::new()
    }

    /// Runs one of [`ServiceMain::commands`].
    fn command(
        name: &str,
        matches: &ArgMatches,
        config: Self::Config,
    ) -> impl Future<Output = anyhow::Result<()>> {
        let _ = (matches, config);
        let name = name.to_owned();
        async move { anyhow::bail!("no such command: {name}") }
    }
}

fn command_line<S: ServiceMain>() -> Command {
    let mut cmd = Command::new(S::NAME)
        .about(S::ABOUT)
        .long_about(format!(
            "{}\n\nConfiguration: defaults embedded in the binary, overridden by KEEL_* \
             variables (KEEL_HTTP__PORT sets http.port; KEEL_<KEY>_FILE reads a secret from a \
             file). The defaults hold no secret: KEEL_PROFILE=dev adds the checked-in \
             development ones; without it every secret must be set, and a development secret \
             is refused. Exit codes: 0 ok, 64 usage, 69 dependency unavailable, \
             78 configuration, 1 otherwise.",
            S::ABOUT
        ))
        .subcommand(Command::new("serve").about("Run the service until SIGTERM/SIGINT (the default)"))
        .subcommand(
            Command::new("migrate")
                .about("Apply the platform's and the service's migrations as the owner role, then exit")
                .arg(
                    Arg::new("wait")
                        .long("wait")
                        .value_name("DURATION")
                        .default_value("30s")
                        .help("How long to keep retrying while Postgres is unreachable (then exit 69)"),
                ),
        )
        .subcommand(
            Command::new("probe")
                .about("GET one of this service's health URLs and exit 0 on 2xx, 1 otherwise (container health checks; needs no configuration)")
                .arg(
                    Arg::new("url")
                        .required(true)
                        .value_name("URL")
                        .help("http://HOST:PORT/PATH, e.g. http://127.0.0.1:8080/readyz"),
                )
                .arg(
                    Arg::new("timeout")
                        .long("timeout")
                        .value_name("DURATION")
                        .default_value("2s")
                        .help("Bound on connecting, sending and reading the status line"),
                ),
        )
        .subcommand(Command::new("check-config").about(
            "Load the configuration exactly as `serve` would, print the effective values \
             (secrets redacted) and exit 0, or exit 78 naming the bad key",
        ))
        .subcommand(Command::new("topology").about(
            "Print the RabbitMQ queues this service consumes, with their retry tiers and DLQs, \
             as JSON (what `make rabbitmq-definitions` writes into infra/rabbitmq/definitions.json)",
        ));
    for extra in S::commands() {
        cmd = cmd.subcommand(extra);
    }
    cmd
}

/// The whole of a service's `main`: parse the command line, load the configuration, install
/// telemetry, run the command, exit with the documented code.
pub fn main<S: ServiceMain>() -> ! {
    // Signal handlers first, before anything that takes time: a SIGTERM during start-up is
    // still a graceful stop.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", S::NAME);
            std::process::exit(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(run::<S>(std::env::args_os()));
    // Tasks still running (a stage that was cut) are dropped here, not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code)
}

/// [`main`] without the exit, for a given command line: returns the exit code.
pub async fn run<S: ServiceMain>(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    // Before telemetry: its OTLP/HTTP exporter is the first TLS-capable client built.
    crate::install_crypto_provider();
    let matches = match command_line::<S>().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let (name, sub) = matches
        .subcommand()
        .map_or(("serve", None), |(n, m)| (n, Some(m)));
    if let ("probe", Some(m)) = (name, sub) {
        // Before the configuration: a health check must not need the service's secrets.
        return probe(m).await;
    }
    // `serve` only, and before anything that takes time: a SIGTERM during start-up is still
    // a graceful stop. Installing them turns off the default "die at once", so the one-shot
    // commands (migrate, check-config, the service's own) keep it: Ctrl-C stops them.
    let signal = (name == "serve").then(shutdown_signal);
    let env = std::env::vars();
    let (config, effective) =
        match keel_config::load_effective_from::<S::Config, _>(S::DEFAULT_CONFIG, env) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("{}: invalid configuration: {e}", S::NAME);
                return EXIT_CONFIG;
            }
        };
    // The `OTEL_*` variables are configuration too: `check-config` fails on them as `serve`.
    let telemetry = match Telemetry::init(S::NAME, S::telemetry(&config)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: invalid configuration: {e}", S::NAME);
            return EXIT_CONFIG;
        }
    };
    if name == "topology" {
        // stdout on purpose: the queue specs are this command's output.
        let queues = S::queues(&config);
        let code = match serde_json::to_string_pretty(&queues) {
            Ok(json) => {
                print_stdout(&format!("{json}\n"));
                0
            }
            Err(e) => {
                eprintln!("{}: {e}", S::NAME);
                EXIT_FAILURE
            }
        };
        telemetry.shutdown();
        return code;
    }
    if name == "check-config" {
        // stdout on purpose: the effective configuration is this command's output.
        let mut out = String::new();
        for (key, value) in effective {
            out.push_str(&format!("{key} = {value}\n"));
        }
        print_stdout(&out);
        telemetry.shutdown();
        return 0;
    }
    install_panic_hook();
    let result = match (name, sub) {
        ("serve", _) => match signal {
            Some(signal) => S::serve(config, signal).await,
            None => Err(anyhow::anyhow!("serve without its signal handlers")),
        },
        ("migrate", Some(m)) => migrate::<S>(&config, m).await,
        (other, Some(m)) => S::command(other, m, config).await,
        (other, None) => Err(anyhow::anyhow!("no such command: {other}")),
    };
    let code = match &result {
        Ok(()) => 0,
        Err(e) => {
            let code = exit_code(e);
            // One line, with the whole chain of causes.
            tracing::error!(
                command = name,
                exit_code = code,
                error = causes(e),
                "{} failed",
                S::NAME
            );
            code
        }
    };
    // Inside the runtime: the exporter's flush is a task on it.
    telemetry.shutdown();
    code
}

/// The error and its causes on one line, each said once: a library error that shows its
/// source in its own message (`migration failed: <cause>`) would otherwise repeat it.
fn causes(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// The exit code for an error, by what it is.
fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<ConfigError>().is_some() {
            return EXIT_CONFIG;
        }
        if cause.downcast_ref::<Unavailable>().is_some() {
            return EXIT_UNAVAILABLE;
        }
    }
    // Bind failures, a task that ended early (`ServiceError::TaskEnded`), anything else.
    EXIT_FAILURE
}

/// A dependency that stayed unreachable past its start-up deadline.
#[derive(Debug, thiserror::Error)]
#[error("{dependency} still unreachable after {waited:?}: {last_error}")]
pub struct Unavailable {
    pub dependency: &'static str,
    pub waited: Duration,
    pub last_error: String,
}

/// `migrate`: retries while Postgres is unreachable (it may be starting next to us, as in
/// compose or a Kubernetes init container), up to `--wait`; a migration that fails for any
/// other reason fails at once.
async fn migrate<S: ServiceMain>(config: &S::Config, m: &ArgMatches) -> anyhow::Result<()> {
    let Some((database, migrator)) = S::migrations(config) else {
        tracing::info!("{} has no database; nothing to migrate", S::NAME);
        return Ok(());
    };
    let wait = m
        .get_one::<String>("wait")
        .map(|s| humantime_parse(s))
        .transpose()?
        .unwrap_or(Duration::from_secs(30));
    let started = Instant::now();
    let deadline = started + wait;
    // Jittered: many instances started together (a compose `up`, a rollout) must not all
    // knock on a starting Postgres at the same instants.
    let mut backoff =
        BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(2)).backoff();
    loop {
        match keel_pg::migrate(database, &format!("{}-migrate", S::NAME), migrator).await {
            Ok(()) => return Ok(()),
            // Keel's one classification of "goes away by itself" (unreachable, starting up,
            // shutting down, a conflict): worth waiting for; anything else fails at once.
            Err(keel_pg::PgError::Sqlx(e)) if keel_pg::is_transient(&e) => {
                let Some(pause) = backoff.next_delay(Instant::now(), deadline) else {
                    return Err(Unavailable {
                        dependency: "postgres",
                        waited: started.elapsed(),
                        last_error: e.to_string(),
                    }
                    .into());
                };
                tracing::warn!(error = %e, retry_in_ms = keel_config::millis(pause), "postgres unreachable; retrying");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `probe URL [--timeout D]`: exit 0 when the URL answers 2xx, 1 otherwise, with one line
/// on stderr saying why (what compose's `docker inspect` shows for a failing check).
async fn probe(m: &ArgMatches) -> i32 {
    let url = m.get_one::<String>("url").map_or("", String::as_str);
    let timeout = match m.get_one::<String>("timeout").map(|s| humantime_parse(s)) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("probe: {e}");
            return EXIT_USAGE;
        }
        None => Duration::from_secs(2),
    };
    match crate::probe::probe(url, timeout).await {
        Ok(()) => 0,
        Err(e @ crate::probe::ProbeError::BadUrl(_)) => {
            eprintln!("probe: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("probe: {e}");
            EXIT_FAILURE
        }
    }
}

fn humantime_parse(s: &str) -> anyhow::Result<Duration> {
    keel_config::parse_duration(s).map_err(|e| {
        ConfigError::invalid("--wait", format!("expected a duration like `30s` ({e})")).into()
    })
}

/// Panics are logged once, as a JSON line with their location, instead of the default hook's
/// plain stderr text; the runtime then applies the early-end rule to the task that panicked.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %info.payload_as_str().unwrap_or("<non-string payload>"), %location, "panic");
    }));
}

#[allow(clippy::print_stdout)]
fn print_stdout(s: &str) {
    print!("{s}");
}
