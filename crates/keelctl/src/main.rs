//! keelctl: Keel's operator command line (see the crate README).
//!
//! Thin on purpose: parse the command line, load the configuration and the registry, call the
//! library, print. Exit codes follow the platform's: 0 done (every check passed), 1 a check
//! failed or the command could not run, 64 a usage error (clap's own errors included, instead
//! of clap's default 2), 78 a configuration error naming its key.
// A CLI talks to its operator on stdout; that is what the workspace lint guards services from.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use keel_config::EXIT_CONFIG;
use keelctl::dlq::{self, DeadLetterQueue, Filter, TopicPattern};
use keelctl::jobs::JobState;
use keelctl::output::{self, Format};
use keelctl::progress::Progress;
use keelctl::{Config, Targets};

/// EX_USAGE from sysexits.h: the command line was wrong.
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "keelctl",
    about = "Keel's operator CLI: every registered service's jobs, outbox, queues and dead letters, the journey's audit and demo",
    version,
    after_help = "Exit codes: 0 ok, 1 a check failed or an error, 64 usage, 78 configuration.\n\
                  Configuration: KEEL_* variables (see crates/keelctl/config/default.toml)."
)]
struct Cli {
    /// A registry of services to use instead of the embedded infra/services.toml.
    #[arg(long, global = true, value_name = "PATH")]
    registry: Option<PathBuf>,
    /// How to print: a table that fits 100 columns, or JSON on stdout for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The registered services: ports, database, broker, queues.
    Services,
    /// Check the journey's and every service's invariants; exit 1 when one fails.
    Audit,
    /// Job queues of the registered services: list jobs, or retry a failed one.
    Jobs {
        #[command(subcommand)]
        action: Option<JobsAction>,
        #[command(flatten)]
        select: Select,
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<JobState>,
        /// At most this many jobs per service, newest first.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Unsent and parked outbox events per registered service; list or retry parked ones.
    Outbox {
        #[command(subcommand)]
        action: Option<OutboxAction>,
        #[command(flatten)]
        select: Select,
    },
    /// Every registered consumer queue and keel.unrouted: ready, consumers, DLQ, retry tiers.
    Queues,
    /// Dead letters of the consumer queues and keel.unrouted: list, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Place every kind of order against the running stack, show the outcomes, then audit.
    Demo,
    /// Customers' API keys of a service's API (checkout's orders API by default). Each
    /// service's database holds its own keys: a key is valid only on the API of the service it
    /// was issued for.
    #[command(name = "api-keys")]
    ApiKeys {
        #[command(subcommand)]
        action: ApiKeysAction,
    },
}

#[derive(Debug, Subcommand)]
enum ApiKeysAction {
    /// Issue a key for one customer and print it, once: only its hash is stored. The key is
    /// valid only on the API of the service it is issued for.
    Create {
        /// The customer every request made with the key acts for.
        #[arg(long)]
        customer: String,
        #[command(flatten)]
        service: KeyService,
    },
    /// Revoke a key: requests made with it are refused from the next one on. Exit 1 when the
    /// service has no unrevoked key of that id.
    Revoke {
        /// The key's id: the 12 hex digits after `keel_` (as `create` reports it).
        id: String,
        #[command(flatten)]
        service: KeyService,
    },
}

/// The one service an API key command acts on.
#[derive(Debug, Args)]
struct KeyService {
    /// The service whose API the key is for; its database holds the key, and no other
    /// service accepts it.
    #[arg(long, short = 's', value_name = "NAME", default_value = keelctl::api_keys::DEFAULT_SERVICE)]
    service: String,
}

#[derive(Debug, Subcommand)]
enum JobsAction {
    /// Put a failed job back in its queue with a fresh set of attempts.
    Retry {
        id: uuid::Uuid,
        #[command(flatten)]
        select: Select,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// Rows the relay parked (refused by the broker or too large), oldest first.
    Parked {
        #[command(flatten)]
        select: Select,
        /// At most this many rows per service.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Return a parked row (or, with --all, every parked row of the named services) to the
    /// relay with a fresh set of attempts.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Retry {
        /// The parked row's id (its event id, as `outbox parked` lists it).
        id: Option<uuid::Uuid>,
        /// Every parked row of the services named with --service (required with --all).
        #[arg(long, requires = "services")]
        all: bool,
        #[command(flatten)]
        select: Select,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Dead letters in queue order, without removing them (they stay in their queues).
    List {
        #[command(flatten)]
        queues: DlqQueues,
        #[command(flatten)]
        filter: DlqFilter,
        /// Look at no more than this many messages of each queue.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
    },
    /// One dead letter in full: every header (x-death included) and the body.
    Show {
        /// Its message id (as `dlq list` shows it).
        message_id: String,
        #[command(flatten)]
        queues: DlqQueues,
        /// Look at no more than this many messages of each queue.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        limit: u16,
    },
    /// Send dead letters back into the queue where they failed (through keel.retry), keeping
    /// their message ids, attempts reset; acked out of the DLQ only once the broker confirms
    /// the copy.
    #[command(group(clap::ArgGroup::new("selector").multiple(true)
        .args(["ids", "routing_key", "error", "older_than"]).conflicts_with("all")))]
    Replay {
        #[command(flatten)]
        queues: DlqQueues,
        /// This message id (repeatable).
        #[arg(long = "id", value_name = "MESSAGE_ID")]
        ids: Vec<String>,
        #[command(flatten)]
        filter: DlqFilter,
        /// Every dead letter of the selected queues (required when no other selector is given).
        #[arg(long)]
        all: bool,
        /// Deliver to this consumer queue (through keel.retry) instead of the one whose DLQ
        /// holds the message. keel.unrouted's messages need this or --to-original.
        #[arg(long, value_name = "QUEUE", conflicts_with = "to_original")]
        to_queue: Option<String>,
        /// Publish to the exchange and routing key recorded in the message's own headers
        /// (x-keel-original-*, else x-death), keel.events only: every queue bound to that key
        /// gets it again. Those headers are written by whoever dead-lettered the message, so
        /// this trusts them as much as that service. Without it, the route comes from the
        /// DLQ's name.
        #[arg(long)]
        to_original: bool,
        /// Show what would be replayed; publish and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Most messages published per second.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rate: u32,
        /// Look at no more than this many messages of each queue.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        limit: u16,
    },
    /// Delete every message of one dead-letter queue (or keel.unrouted), after confirmation.
    Purge {
        /// The queue: `<queue>.dlq` or keel.unrouted, spelt out (never a consumer queue).
        #[arg(long, value_name = "QUEUE")]
        queue: String,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
}

impl DlqAction {
    /// The refusals that need no broker: a replay without a selector, a purge of something
    /// that is not a DLQ, or without `--yes` and no terminal to confirm on.
    fn check(&self) -> Result<(), String> {
        match self {
            Self::Replay {
                ids, filter, all, ..
            } => {
                let selected = !ids.is_empty()
                    || filter.routing_key.is_some()
                    || filter.error.is_some()
                    || filter.older_than.is_some();
                if !selected && !all {
                    return Err(dlq::DlqError::NoSelector.to_string());
                }
            }
            Self::Purge { queue, yes } => {
                let queue = DeadLetterQueue::exact(queue).map_err(|e| e.to_string())?;
                if dlq::consent(*yes, std::io::stdin().is_terminal()) == dlq::Consent::Refused {
                    return Err(format!(
                        "refusing to purge {queue} without --yes: stdin is not a terminal to \
                         confirm on"
                    ));
                }
            }
            Self::List { .. } | Self::Show { .. } => {}
        }
        Ok(())
    }
}

/// Which dead-letter queues a `dlq` command reads.
#[derive(Debug, Args)]
struct DlqQueues {
    /// A consumer queue (meaning its DLQ), a DLQ, or keel.unrouted (repeatable); default:
    /// every registered consumer queue's DLQ, then keel.unrouted.
    #[arg(long = "queue", short = 'q', value_name = "QUEUE")]
    queues: Vec<String>,
}

impl DlqQueues {
    fn resolve(&self, targets: &Targets) -> Vec<DeadLetterQueue> {
        if self.queues.is_empty() {
            DeadLetterQueue::registered(&targets.registry)
        } else {
            self.queues
                .iter()
                .map(|q| DeadLetterQueue::from_arg(q))
                .collect()
        }
    }
}

/// Conditions on dead letters (all must hold).
#[derive(Debug, Args)]
struct DlqFilter {
    /// Original routing key matches this topic pattern (`checkout.order.*`, `billing.#`).
    #[arg(long, value_name = "PATTERN", value_parser = TopicPattern::parse)]
    routing_key: Option<TopicPattern>,
    /// Error text contains this (ignoring case).
    #[arg(long, value_name = "SUBSTRING")]
    error: Option<String>,
    /// First failed at least this long ago (`30m`, `2h`, `1d`).
    #[arg(long, value_name = "DURATION", value_parser = dlq::parse_age)]
    older_than: Option<std::time::Duration>,
}

impl DlqFilter {
    fn with_ids(self, ids: Vec<String>) -> Filter {
        Filter {
            ids,
            routing_key: self.routing_key,
            error: self.error,
            older_than: self.older_than,
        }
    }
}

/// Which services a generic command covers.
#[derive(Debug, Args)]
struct Select {
    /// Only this registered service (repeatable); default: every service with a database.
    #[arg(long = "service", short = 's', value_name = "NAME")]
    services: Vec<String>,
}

/// A usage error found after parsing (an unknown service name): reported like clap's own.
fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\nFor more information, try '--help'.");
    ExitCode::from(EXIT_USAGE)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; every real usage error exits 64.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Keel compiles one TLS provider, ring, and reqwest needs it installed before any client
    // is built (keel_service::install_crypto_provider says why; keelctl does not link it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config: Config = keel_config::load_or_exit("keelctl", keelctl::DEFAULT_CONFIG);
    if cli.registry.is_some() {
        config.registry.clone_from(&cli.registry);
    }
    let targets = match config.targets() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keelctl: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    match run(cli, &config, &targets).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keelctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: &Config, targets: &Targets) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    match cli.command {
        Command::Services => {
            match format {
                Format::Table => println!("{}", keelctl::services::table(&targets.registry)),
                Format::Json => output::json(&targets.registry.services)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit => {
            let report = keelctl::audit::run_on(targets, &config.audit, &config.rabbitmq).await?;
            match format {
                Format::Table => println!("{report}"),
                Format::Json => output::json(&report.json())?,
            }
            Ok(exit(report.passed()))
        }
        Command::Jobs {
            action: Some(JobsAction::Retry { id, select }),
            ..
        } => {
            // A change: the operator's connection, not the read-only one.
            let selected = match targets.select_operator(&select.services) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e)),
            };
            match keelctl::jobs::retry(&selected, id).await? {
                Some(service) => {
                    println!("job {id} of {service} queued again");
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("job {id} is not failed in any selected service: nothing to retry");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Jobs {
            action: None,
            select,
            state,
            limit,
        } => {
            let selected = match targets.select(&select.services) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e)),
            };
            let listing = keelctl::jobs::list(&selected, state, limit).await?;
            for service in &listing.without_queue {
                eprintln!("note: {service} has no job queue (no jobs table)");
            }
            match format {
                Format::Table => println!("{}", keelctl::jobs::table(&listing.rows)),
                Format::Json => output::json(&listing.rows)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox {
            action: Some(OutboxAction::Parked { select, limit }),
            ..
        } => {
            let selected = match targets.select(&select.services) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e)),
            };
            let listing = keelctl::outbox::parked(&selected, limit).await?;
            for service in &listing.without_outbox {
                eprintln!("note: {service} has no outbox table");
            }
            match format {
                Format::Table => println!("{}", keelctl::outbox::parked_table(&listing.rows)),
                Format::Json => output::json(&listing.rows)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox {
            action: Some(OutboxAction::Retry { id, all, select }),
            ..
        } => {
            // A change: the operator's connection, not the read-only one.
            let selected = match targets.select_operator(&select.services) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e)),
            };
            match id {
                Some(id) if !all => match keelctl::outbox::retry(&selected, id).await? {
                    Some(service) => {
                        println!("outbox row {id} of {service} returned to the relay");
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        eprintln!(
                            "outbox row {id} is not parked in any selected service: nothing to retry"
                        );
                        Ok(ExitCode::FAILURE)
                    }
                },
                _ => {
                    for (service, n) in keelctl::outbox::retry_all(&selected).await? {
                        println!("{n} parked outbox rows of {service} returned to the relay");
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Outbox {
            action: None,
            select,
        } => {
            let selected = match targets.select(&select.services) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e)),
            };
            let listing = keelctl::outbox::backlogs(&selected).await?;
            for service in &listing.without_outbox {
                eprintln!("note: {service} has no outbox table");
            }
            match format {
                Format::Table => println!("{}", keelctl::outbox::table(&listing.rows)),
                Format::Json => output::json(&listing.rows)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Queues => {
            let conn =
                keelctl::connect_broker(&config.amqp_url(), config.dlq.connect_timeout).await?;
            let consumed = keelctl::queues::registered(&targets.registry);
            let rows = keelctl::queues::status(&conn, &consumed, &config.dlq.retry_tiers).await;
            let _ = conn.close(200, "keelctl done".into()).await;
            let rows = rows?;
            match format {
                Format::Table => println!("{}", keelctl::queues::table(&rows)),
                Format::Json => output::json(&rows)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action } => {
            // Usage errors need no broker: refused before connecting.
            if let Err(e) = action.check() {
                return Ok(usage(&e));
            }
            let conn =
                keelctl::connect_broker(&config.amqp_url(), config.dlq.connect_timeout).await?;
            let result = run_dlq(action, format, config, targets, &conn).await;
            let _ = conn.close(200, "keelctl done".into()).await;
            result
        }
        Command::Demo => {
            let outcome = keelctl::demo::run(config, &mut Progress::stderr())
                .await
                .context("demo")?;
            match format {
                Format::Table => {
                    println!("{}", outcome.table());
                    println!("replayed webhook: {}", outcome.replayed_webhook);
                    println!("(the audit below checks it had no second effect)\n");
                    println!("{}", outcome.audit);
                }
                Format::Json => output::json(&outcome)?,
            }
            Ok(exit(outcome.passed))
        }
        Command::ApiKeys { action } => run_api_keys(action, format, targets).await,
    }
}

/// `api-keys create` and `revoke`, as the operator on the one service's database: its grants
/// there are exactly these two statements (keel_pg::api_keys).
async fn run_api_keys(
    action: ApiKeysAction,
    format: Format,
    targets: &Targets,
) -> anyhow::Result<ExitCode> {
    let service = match &action {
        ApiKeysAction::Create { customer, service } => {
            if let Err(e) = keelctl::api_keys::validate_customer(customer) {
                return Ok(usage(&format!("--customer {}", customer_reason(&e))));
            }
            service.service.clone()
        }
        ApiKeysAction::Revoke { id, service } => {
            if let Err(e) = keelctl::api_keys::validate_id(id) {
                return Ok(usage(&e.to_string()));
            }
            service.service.clone()
        }
    };
    // Usage errors need no database: refused before connecting.
    let url = match targets.select_operator(std::slice::from_ref(&service)) {
        Ok(picked) => picked.into_iter().map(|(_, url)| url.clone()).next(),
        Err(e) => return Ok(usage(&e)),
    }
    .with_context(|| format!("no database for {service}"))?;
    let mut conn = keelctl::connect(&url)
        .await
        .with_context(|| format!("connect to {service}'s database"))?;
    match action {
        ApiKeysAction::Create { customer, .. } => {
            let issued = keel_pg::api_keys::issue(&mut conn, &customer)
                .await
                .with_context(|| format!("issue an API key in {service}'s database"))?;
            let key = issued.expose();
            // The key alone on stdout (`KEY=$(keelctl api-keys create ...)`); the rest on
            // stderr, so a script capturing stdout gets nothing else.
            match format {
                Format::Table => println!("{key}"),
                Format::Json => output::json(&serde_json::json!({
                    "id": issued.id,
                    "customer_id": issued.customer_id,
                    "service": service,
                    "key": key,
                }))?,
            }
            eprintln!(
                "API key {} for customer {} created, valid on {service}'s API only. It is shown \
                 only this once ({service} stores its hash): keep it now.",
                issued.id, issued.customer_id
            );
            Ok(ExitCode::SUCCESS)
        }
        ApiKeysAction::Revoke { id, .. } => {
            let revoked = keel_pg::api_keys::revoke(&mut conn, &id)
                .await
                .with_context(|| format!("revoke an API key in {service}'s database"))?;
            match format {
                Format::Table => {}
                Format::Json => output::json(&serde_json::json!({
                    "id": id,
                    "service": service,
                    "revoked": revoked,
                }))?,
            }
            if revoked {
                eprintln!("API key {id} revoked on {service}: it is refused from now on.");
            } else {
                eprintln!("{service} has no unrevoked API key {id} (unknown, or revoked already).");
            }
            Ok(exit(revoked))
        }
    }
}

/// Why a customer id is unusable, as the `--customer` usage error says it.
fn customer_reason(e: &keelctl::api_keys::ApiKeyError) -> String {
    match e {
        keelctl::api_keys::ApiKeyError::InvalidCustomer(why) => (*why).to_owned(),
        other => other.to_string(),
    }
}

async fn run_dlq(
    action: DlqAction,
    format: Format,
    config: &Config,
    targets: &Targets,
    conn: &lapin::Connection,
) -> anyhow::Result<ExitCode> {
    let idle = config.dlq.idle_timeout;
    let note_missing = |missing: &[String]| {
        for queue in missing {
            eprintln!("note: queue {queue} does not exist");
        }
    };
    match action {
        DlqAction::List {
            queues,
            filter,
            limit,
        } => {
            let queues = queues.resolve(targets);
            let filter = filter.with_ids(Vec::new());
            let listing = dlq::list(conn, &queues, &filter, limit, idle).await?;
            note_missing(&listing.missing);
            match format {
                Format::Table => println!("{}", dlq::list_table(&listing.rows)),
                Format::Json => output::json(&listing.rows)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show {
            message_id,
            queues,
            limit,
        } => {
            let queues = queues.resolve(targets);
            match dlq::show(conn, &queues, &message_id, limit, idle).await? {
                Some(shown) => {
                    match format {
                        Format::Table => println!("{}", dlq::show_text(&shown)),
                        Format::Json => output::json(&shown)?,
                    }
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    let names: Vec<String> = queues.iter().map(ToString::to_string).collect();
                    eprintln!(
                        "message {message_id} is not among the first {limit} messages of {}",
                        names.join(", ")
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        DlqAction::Replay {
            queues,
            ids,
            filter,
            all,
            to_queue,
            to_original,
            dry_run,
            rate,
            limit,
        } => {
            let selection = match dlq::Selection::new(all, filter.with_ids(ids)) {
                Ok(s) => s,
                Err(e) => return Ok(usage(&e.to_string())),
            };
            let request = dlq::ReplayRequest {
                queues: queues.resolve(targets),
                selection,
                destination: match (to_queue, to_original) {
                    (Some(queue), _) => dlq::Destination::Queue(queue),
                    (None, true) => dlq::Destination::Original,
                    (None, false) => dlq::Destination::FailedQueue,
                },
                dry_run,
                rate,
                limit,
                idle,
            };
            let summary = dlq::replay(conn, &request).await?;
            note_missing(&summary.missing);
            match format {
                Format::Table => println!("{}", dlq::replay_table(&summary)),
                Format::Json => output::json(&summary)?,
            }
            Ok(exit(summary.failed == 0))
        }
        DlqAction::Purge { queue, yes } => {
            let queue = match DeadLetterQueue::exact(&queue) {
                Ok(q) => q,
                Err(e) => return Ok(usage(&e.to_string())),
            };
            use std::io::IsTerminal;
            match dlq::consent(yes, std::io::stdin().is_terminal()) {
                dlq::Consent::Refused => {
                    return Ok(usage(&format!(
                        "refusing to purge {queue} without --yes: stdin is not a terminal to                          confirm on"
                    )));
                }
                dlq::Consent::Ask => {
                    let messages = dlq::depth(conn, &queue).await?;
                    if !dlq::confirm(&queue, messages, std::io::stdin().lock(), std::io::stderr())?
                    {
                        eprintln!("not confirmed: nothing purged");
                        return Ok(ExitCode::FAILURE);
                    }
                }
                dlq::Consent::Given => {}
            }
            let purged = dlq::purge(conn, &queue).await?;
            match format {
                Format::Table => {
                    let s = if purged == 1 { "" } else { "s" };
                    println!("purged {purged} message{s} from {queue}");
                }
                Format::Json => output::json(&serde_json::json!({
                    "queue": queue.name(),
                    "purged": purged,
                }))?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
