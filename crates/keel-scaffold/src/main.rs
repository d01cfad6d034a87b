//! `keel-scaffold new <NAME>`: what `make new-service NAME=…` runs (see the crate docs).
//! Exit codes: 0 done, 64 a name that cannot be used (nothing written), 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_scaffold::ScaffoldError;

#[derive(Debug, Parser)]
#[command(
    name = "keel-scaffold",
    about = "Scaffold a Keel service from templates/service"
)]
struct Cli {
    /// The workspace root (the folder with the root Cargo.toml).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create services/<NAME>, register it in infra/services.toml and the workspace.
    New {
        /// Lowercase ASCII letters and digits, starting with a letter (e.g. `inventory`).
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::New { name } = cli.command;
    match keel_scaffold::new_service(&cli.root, &name) {
        Ok(made) => {
            let n = &made.name;
            let port = made.http_port;
            report(&format!(
                "created {dir} (package and binary `{n}`, HTTP port {port})\n\
                 registered in infra/services.toml (database keel_{n}, roles {n}_owner/{n}_app, \
                 queue {n}.events, routing keys {n}.item.*) and as a workspace member\n\
                 deployed by compose.yaml (services {n}-migrate and {n}, its secrets) and by \
                 k8s/ (k8s/base/{n}, and in the kind overlay its image, Secret and database)\n\
                 next:\n  \
                 1. `cargo nextest run -p {n}`: its tests\n  \
                 2. `make rabbitmq-definitions`: rewrites infra/rabbitmq/definitions.json (and \
                 the kind overlay's copy) from the code, so the broker gets {n}'s own user, \
                 permissions and queues; commit the result\n  \
                 3. `make dev`: the stack, {n} on 127.0.0.1:{port}; then\n     \
                 curl -si -X POST localhost:{port}/v1/items -H 'Idempotency-Key: k1' \
                 -H 'Content-Type: application/json' -d '{{\"name\":\"bolt\",\"quantity\":3}}'\n\
                 read docs/new-service.md for what each file is for",
                dir = made.dir.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report_error(&format!("make new-service: {e}"));
            match e {
                ScaffoldError::Name(_) | ScaffoldError::Taken { .. } => ExitCode::from(64),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

#[allow(clippy::print_stdout)]
fn report(s: &str) {
    println!("{s}");
}

#[allow(clippy::print_stderr)]
fn report_error(s: &str) {
    eprintln!("{s}");
}
