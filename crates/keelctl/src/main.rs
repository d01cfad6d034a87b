//! keelctl: Keel's operator command line (see the crate README).
// A CLI talks to its operator on stdout; that is what the workspace lint guards services from.
#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};
use keelctl::Config;

#[derive(Debug, Parser)]
#[command(name = "keelctl", about = "Keel's operator CLI", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the journey's invariants across the databases and the broker; exit 1 on failure.
    Audit,
    /// checkout's job queue: list jobs, or retry a failed one.
    Jobs {
        #[command(subcommand)]
        action: Option<JobsAction>,
        /// Only jobs in this state (queued, running, succeeded, failed).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Unsent outbox events per service.
    Outbox,
    /// Place every kind of order against the running stack, show the outcomes, then audit.
    Demo,
}

#[derive(Debug, Subcommand)]
enum JobsAction {
    /// Put a failed job back in the queue with a fresh set of attempts.
    Retry { id: uuid::Uuid },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = keel_config::load_or_exit("keelctl", keelctl::DEFAULT_CONFIG);
    let code = match cli.command {
        Command::Audit => {
            let report = keelctl::audit::run(&config).await?;
            println!("{report}");
            i32::from(!report.passed())
        }
        Command::Jobs {
            action: Some(JobsAction::Retry { id }),
            ..
        } => {
            let mut conn = keelctl::connect(&config.checkout).await?;
            if keel_pg::jobs::retry_failed(&mut conn, id).await? {
                println!("job {id} queued again");
                0
            } else {
                eprintln!("job {id} is not failed (or does not exist): nothing to retry");
                1
            }
        }
        Command::Jobs {
            action: None,
            state,
            limit,
        } => {
            let mut conn = keelctl::connect(&config.checkout).await?;
            let jobs = keel_pg::jobs::list(&mut conn, state.as_deref(), limit).await?;
            println!(
                "{:<36}  {:<22} {:<9} {:>8}  {:<25} last error",
                "id", "queue", "state", "attempts", "run at"
            );
            for j in jobs {
                println!(
                    "{:<36}  {:<22} {:<9} {:>4}/{:<3}  {:<25} {}",
                    j.id,
                    j.queue,
                    j.state,
                    j.attempts,
                    j.max_attempts,
                    j.run_at.to_rfc3339(),
                    j.last_error.unwrap_or_default()
                );
            }
            0
        }
        Command::Demo => i32::from(!keelctl::demo::run(&config).await?),
        Command::Outbox => {
            for (service, target) in [
                ("checkout", &config.checkout),
                ("billing", &config.billing),
                ("notification", &config.notification),
            ] {
                let mut conn = keelctl::connect(target).await?;
                let b = keel_pg::outbox::backlog(&mut conn).await?;
                println!(
                    "{service:<13} unsent {:>6}  oldest {:>8.1}s",
                    b.unsent, b.oldest_unsent_seconds
                );
            }
            0
        }
    };
    std::process::exit(code);
}
