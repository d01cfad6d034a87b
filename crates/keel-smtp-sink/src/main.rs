//! `keel-smtp-sink`: parses flags (or `KEEL_SMTP_SINK_*` variables), starts the sink, prints
//! where it listens, and runs until SIGTERM or SIGINT.
//!
//! The two `... listening on ADDR` lines on stdout are an interface: scripts and tests start
//! the binary on port 0 and read the bound ports from them. Logs go to stderr (`RUST_LOG`,
//! default `info`). Exit codes: 0 after a signal, 64 (EX_USAGE) for a bad flag or variable,
//! 1 when a listener cannot be bound.

// Printing the bound addresses on stdout is this binary's contract (see above).
#![allow(clippy::print_stdout)]

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keel_smtp_sink::{Error, SinkConfig, SmtpSink};
use tokio::signal::unix::{SignalKind, signal};

/// EX_USAGE from sysexits.h.
const EXIT_USAGE: u8 = 64;

/// A small SMTP sink with a subset of Mailpit's HTTP API (for tests and `make dev`).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the SMTP listener.
    #[arg(
        long,
        env = "KEEL_SMTP_SINK_SMTP",
        value_name = "ADDR",
        default_value = "127.0.0.1:1025"
    )]
    smtp: SocketAddr,
    /// Address of the HTTP API.
    #[arg(
        long,
        env = "KEEL_SMTP_SINK_HTTP",
        value_name = "ADDR",
        default_value = "127.0.0.1:8025"
    )]
    http: SocketAddr,
    /// Name used in the greeting and the EHLO reply.
    #[arg(
        long,
        env = "KEEL_SMTP_SINK_HOSTNAME",
        default_value = "keel-smtp-sink"
    )]
    hostname: String,
    /// Largest message in bytes (advertised as SIZE; larger is refused with 552).
    #[arg(long, env = "KEEL_SMTP_SINK_MAX_MESSAGE_BYTES", value_name = "BYTES",
          default_value = "10485760", value_parser = positive)]
    max_message_bytes: usize,
    /// SMTP connections served at once; more are answered 421.
    #[arg(long, env = "KEEL_SMTP_SINK_MAX_CONNECTIONS", value_name = "N",
          default_value = "64", value_parser = positive)]
    max_connections: usize,
    /// Messages kept in memory; the oldest is dropped when full.
    #[arg(long, env = "KEEL_SMTP_SINK_MAX_MESSAGES", value_name = "N",
          default_value = "1000", value_parser = positive)]
    max_messages: usize,
    /// Recipients accepted per message.
    #[arg(long, env = "KEEL_SMTP_SINK_MAX_RECIPIENTS", value_name = "N",
          default_value = "100", value_parser = positive)]
    max_recipients: usize,
    /// Seconds a connection may stay silent before it is closed with 421.
    #[arg(long, env = "KEEL_SMTP_SINK_IDLE_TIMEOUT_SECS", value_name = "SECS",
          default_value = "60", value_parser = positive)]
    idle_timeout_secs: usize,
}

fn positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be greater than zero".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl Cli {
    fn config(self) -> SinkConfig {
        SinkConfig {
            smtp_addr: self.smtp,
            http_addr: self.http,
            hostname: self.hostname,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            max_messages: self.max_messages,
            max_recipients: self.max_recipients,
            idle_timeout: Duration::from_secs(
                u64::try_from(self.idle_timeout_secs).unwrap_or(u64::MAX),
            ),
            ..SinkConfig::default()
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            if !error.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            eprintln!("(each flag can also be set by its KEEL_SMTP_SINK_* variable; see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours for a terminal, plain text for a log file or a container's log.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli.config()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel-smtp-sink: {error:#}");
            let usage = matches!(error.downcast_ref(), Some(Error::InvalidConfig { .. }));
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

async fn run(config: SinkConfig) -> anyhow::Result<()> {
    // Listen for signals before printing the addresses: a script that reads them and sends
    // SIGTERM at once must find the handler in place.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let sink = SmtpSink::start(config).await?;
    println!("smtp listening on {}", sink.smtp_addr());
    println!("http listening on {}", sink.http_addr());
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
    }
    sink.shutdown().await;
    Ok(())
}
