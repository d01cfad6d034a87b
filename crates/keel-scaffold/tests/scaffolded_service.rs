//! The proof that `make new-service` gives a working service: scaffold one into a scratch
//! copy of the workspace with the real Makefile target, then build it and run its own tests
//! (health, exit 78, least privilege, inbox dedupe, SIGTERM with a request in flight, the
//! idempotent resource) against the real Postgres, pgbouncer and RabbitMQ. Then the copy's
//! deployment checks, which now include the new service: `infra/k8s/check.sh` (the kind
//! overlay rendered, schema-validated, held to the policy) and the drift test
//! (`infra/deploy/test_drift.py`: the new service's own `check-config` on the environment
//! compose and the kind overlay give it, and its wiring against its registry entry).
//!
//! Kept fast by reuse, but never of this workspace's own build: the copy and its target dir
//! (`CARGO_TARGET_DIR`) live at fixed places under `target/scaffold-test/`, and files are
//! copied with their modification times, which is what cargo's freshness check of path
//! packages compares. So the first run compiles the new service's dependencies once (a few
//! minutes) and later runs only what changed, the new service itself every time (10 to
//! 30 s). Why not build into this workspace's target dir: cargo names a path package's
//! artifacts by its path *relative to the workspace root*, which the copy shares, so the two
//! trees would overwrite each other's artifacts, each with the other tree's absolute paths
//! inside (`env!("CARGO_MANIFEST_DIR")`, the dep-info cargo checks for changes) — a test of
//! this workspace would then read the copy's registry. The deployment checks reuse what
//! this workspace has: its Python tools (`.keel/venv`, linked into the copy, so check.sh
//! installs nothing) and its service binaries (the drift test looks in the copy's build for
//! the new service, then in this workspace's `target/debug` for the others, which `make
//! test` has built by then); they add a few seconds. The elapsed time of each step is printed
//! (`--no-capture` shows it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// What a build of one service needs from the workspace (not its history, docs or outputs).
const COPIED: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "Makefile",
    ".config",
    "crates",
    "services",
    "e2e",
    "templates",
    "infra",
    "compose.yaml",
    "k8s",
];

const NAME: &str = "inventory";

/// Copies `from` to `to` keeping each file's modification time, which is what cargo's
/// fingerprints of path packages compare: unchanged sources are not rebuilt.
fn copy(from: &Path, to: &Path) {
    let meta = match std::fs::symlink_metadata(from) {
        Ok(meta) => meta,
        // Gone since its folder was listed (an editor's or a build's temporary file).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("{}: {e}", from.display()),
    };
    if meta.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "target" {
                continue;
            }
            copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else if meta.is_file() {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        match std::fs::copy(from, to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from.exists() => return,
            Err(e) => panic!("copy {}: {e}", from.display()),
        }
        let file = std::fs::File::options().write(true).open(to).unwrap();
        file.set_modified(meta.modified().unwrap()).unwrap();
    }
}

/// A command with the environment cargo and make gave this test removed: the build below is
/// its own, not a step of the one running us.
fn clean(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars() {
        let inherited_build = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("__CARGO")
            || key.starts_with("NEXTEST")
            || key.starts_with("RUST_TEST")
            || matches!(key.as_str(), "MAKEFLAGS" | "MFLAGS" | "MAKELEVEL");
        if inherited_build {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn run(what: &str, mut cmd: Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the copy's deployment checks (see the module docs); returns how long they took.
fn deployment_checks(root: &Path, scratch: &Path, target: &Path) -> Duration {
    let started = Instant::now();
    // This workspace's pinned kubectl, kubernetes-validate and PyYAML: linked, not installed
    // again. check.sh would reinstall only for other pins, and the copy's are these.
    let venv = root.join(".keel/venv");
    if venv.join("bin/python").exists() {
        std::fs::create_dir_all(scratch.join(".keel")).unwrap();
        std::os::unix::fs::symlink(&venv, scratch.join(".keel/venv")).unwrap();
    }
    let check = clean(Command::new(scratch.join("infra/k8s/check.sh")));
    run("infra/k8s/check.sh in the copy", check);

    // check.sh has made sure the venv exists; its Python has PyYAML, all the drift test needs.
    let python = scratch.join(".keel/venv/bin/python");
    let mut drift = clean(Command::new(&python));
    drift
        .current_dir(scratch)
        .arg(scratch.join("infra/deploy/test_drift.py"))
        .env(
            "KEELDEV_BIN_DIRS",
            format!(
                "{}:{}",
                target.join("debug").display(),
                target_dir(root).join("debug").display()
            ),
        );
    // It checks every service of the copy's registry, the new one included; a binary missing
    // from both folders fails it by name.
    run("infra/deploy/test_drift.py in the copy", drift);
    started.elapsed()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
}

#[test]
fn a_scaffolded_service_builds_and_passes_its_own_tests() {
    let started = Instant::now();
    let root = keel_testkit::workspace_root().canonicalize().unwrap();
    let base = target_dir(&root).join("scaffold-test");
    let scratch = base.join("workspace");
    let target = base.join("target");
    let _ = std::fs::remove_dir_all(&scratch);
    for path in COPIED {
        copy(&root.join(path), &scratch.join(path));
    }
    // The ports of the running stack, resolved by `make deps`, so the copy's tests find it.
    if root.join(".keel/stack.env").exists() {
        copy(
            &root.join(".keel/stack.env"),
            &scratch.join(".keel/stack.env"),
        );
    }

    // The real front door, with the generator this test was built with.
    let mut make = clean(Command::new("make"));
    make.current_dir(&scratch).args([
        "-s",
        "new-service",
        &format!("NAME={NAME}"),
        &format!("SCAFFOLD={}", env!("CARGO_BIN_EXE_keel-scaffold")),
    ]);
    run("make new-service", make);
    assert!(
        scratch
            .join("services")
            .join(NAME)
            .join("src/lib.rs")
            .exists()
    );

    // Its roles, as `make deps` creates them from the registry (roles only: its tests make
    // their own databases, so the shared Postgres gets no keel_<name> from a test).
    let stack = keel_testkit::Stack::load();
    let mut psql = Command::new("psql");
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &stack.pg_port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .args(["-v", "services=", "-v", &format!("extra_roles={NAME}")])
        .arg("-f")
        .arg(scratch.join("infra/postgres/init.sql"));
    run("infra/postgres/init.sql (roles)", psql);
    let copied = started.elapsed();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut test = clean(Command::new(cargo));
    test.current_dir(&scratch)
        .env("CARGO_TARGET_DIR", &target)
        .args(["nextest", "run", "-p", NAME, "--no-fail-fast"]);
    let out = run(&format!("cargo nextest run -p {NAME}"), test);
    let report = String::from_utf8_lossy(&out.stderr);
    let summary = report
        .lines()
        .find(|l| l.trim_start().starts_with("Summary"))
        .unwrap_or("(no summary)");
    assert!(summary.contains("passed"), "{report}");
    let tested = started.elapsed();

    // Built for its process tests; the drift test asks it for its configuration.
    assert!(target.join("debug").join(NAME).exists());
    let checks = deployment_checks(&root, &scratch, &target);
    eprintln!(
        "scaffolded `{NAME}`, ran its tests and the deployment checks in {:.1?} (copy, \
         generate, roles {copied:.1?}; build and tests {:.1?}; k8s check and drift test \
         {checks:.1?}): {}",
        started.elapsed(),
        tested - copied,
        summary.trim()
    );
}
