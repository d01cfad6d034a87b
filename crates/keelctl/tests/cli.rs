//! keelctl as an operator uses it: the real binary, against a real database per test.
//!
//! What is proven here: usage errors are caught by the command line before anything runs
//! (exit 64, the platform's EX_USAGE, rather than clap's default 2); a configuration naming a
//! service the registry does not have exits 78; listings print JSON that parses and tables
//! that fit 100 columns; `--state` and `--limit` filter; `jobs retry` requeues; and the audit's
//! generic checks cover a service keelctl has never heard of, given only its registry entry.
//!
//! Each test's database is a `TestDb` with the platform's tables only, reached as a service
//! called `fixture` that exists only in a scratch registry passed with `--registry`, read as
//! `keel_auditor` and changed as `keel_operator`, as keelctl reaches a real one (P14).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use keel_pg::jobs::{self, NewJob};
use keel_testkit::TestDb;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

/// A scratch registry with one service, `fixture`, that owns a database.
fn scratch_registry() -> PathBuf {
    let path = std::env::temp_dir().join(format!("keelctl-registry-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        "[[service]]\nname = \"fixture\"\nports = { http = 18999 }\ndatabase = true\n\
         migrate = [\"migrate\"]\nready = \"http://127.0.0.1:{fixture.http}/readyz\"\n",
    )
    .unwrap();
    path
}

/// Runs keelctl with `args` and only `env` as its KEEL_* configuration.
fn keelctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(KEELCTL);
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// A platform-only database, and keelctl's arguments and environment to reach it as `fixture`.
struct Fixture {
    db: TestDb,
    registry: PathBuf,
    url: String,
    operator_url: String,
}

impl Fixture {
    async fn new() -> Self {
        let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
        let (url, operator_url) = (db.auditor_url(), db.operator_url());
        Self {
            db,
            registry: scratch_registry(),
            url,
            operator_url,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--registry", self.registry.to_str().unwrap()];
        all.extend_from_slice(args);
        keelctl(
            &all,
            &[
                ("KEEL_FIXTURE__URL", &self.url),
                ("KEEL_FIXTURE__OPERATOR_URL", &self.operator_url),
            ],
        )
    }

    async fn conn(&self) -> PgConnection {
        PgConnection::connect(&self.db.app_url()).await.unwrap()
    }

    /// Enqueues a job and, if `failed_with` is set, marks it failed with that error.
    async fn job(&self, queue: &str, failed_with: Option<&str>) -> Uuid {
        let mut conn = self.conn().await;
        let job = NewJob {
            queue,
            payload: serde_json::json!({}),
            max_attempts: 3,
            delay: Duration::ZERO,
            id: None,
        };
        let id = jobs::enqueue(&mut conn, &job).await.unwrap().unwrap();
        if let Some(error) = failed_with {
            sqlx::query(
                "UPDATE jobs SET state = 'failed', attempts = 3, last_error = $2,
                        finished_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        id
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.registry);
    }
}

#[test]
fn a_zero_or_too_large_limit_is_a_usage_error() {
    for limit in ["0", "1001", "-5", "many"] {
        let out = keelctl(&["jobs", &format!("--limit={limit}")], &[]);
        assert_eq!(out.status.code(), Some(64), "--limit {limit}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--limit"));
    }
}

#[test]
fn an_unknown_state_is_a_usage_error_that_lists_the_states() {
    let out = keelctl(&["jobs", "--state", "bogus"], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for state in ["queued", "running", "succeeded", "failed"] {
        assert!(err.contains(state), "{err}");
    }
}

#[test]
fn an_unknown_output_format_is_a_usage_error_and_help_is_not() {
    assert_eq!(
        keelctl(&["jobs", "--output", "yaml"], &[]).status.code(),
        Some(64)
    );
    let help = keelctl(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("Exit codes"));
}

#[test]
fn a_service_name_the_registry_does_not_have_is_a_usage_error() {
    let out = keelctl(&["outbox", "--service", "nosuch"], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch") && err.contains("checkout"), "{err}");
}

#[test]
fn configuring_a_service_the_registry_does_not_have_exits_78_naming_the_key() {
    let out = keelctl(
        &["services"],
        &[("KEEL_NOSUCH__URL", "postgres://x@127.0.0.1/x")],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
}

#[test]
fn services_lists_the_registry_as_json_and_as_a_table_of_100_columns() {
    let out = keelctl(&["services", "--output", "json"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let listed: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let registered: Vec<String> = keelctl::Registry::embedded()
        .unwrap()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, registered);

    let table = stdout(&keelctl(&["services"], &[]));
    assert_fits_100_columns(&table);
    for name in &registered {
        assert!(table.contains(name.as_str()));
    }
}

#[tokio::test]
async fn jobs_lists_json_filtered_by_state_and_bounded_by_limit() {
    let f = Fixture::new().await;
    let queued = f.job("mail", None).await;
    let failed_a = f.job("mail", Some("smtp said no")).await;
    let failed_b = f.job("report", Some("timeout")).await;

    let all = json(&f.run(&["jobs", "-o", "json"]));
    assert_eq!(all.as_array().unwrap().len(), 3);

    let out = f.run(&["jobs", "--state", "failed", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let rows = json(&out);
    let mut ids: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["service"], "fixture");
            assert_eq!(r["state"], "failed");
            r["id"].as_str().unwrap()
        })
        .collect();
    ids.sort_unstable();
    let mut want = vec![failed_a.to_string(), failed_b.to_string()];
    want.sort();
    assert_eq!(ids, want);
    assert!(!ids.contains(&queued.to_string().as_str()));

    let one = json(&f.run(&["jobs", "--limit", "1", "-o", "json"]));
    assert_eq!(one.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_jobs_table_fits_100_columns_even_with_a_long_error() {
    let f = Fixture::new().await;
    let long = "upstream answered 503 Service Unavailable; ".repeat(8);
    let id = f.job("a-rather-long-queue-name", Some(&long)).await;
    let out = f.run(&["jobs"]);
    assert_eq!(out.status.code(), Some(0));
    let table = stdout(&out);
    assert_fits_100_columns(&table);
    assert!(table.contains(&id.to_string()), "the id is never wrapped");
}

#[tokio::test]
async fn jobs_retry_requeues_a_failed_job_once() {
    let f = Fixture::new().await;
    let id = f.job("mail", Some("smtp said no")).await;
    let out = f.run(&["jobs", "retry", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("fixture"));
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(state, "queued");
    // Not failed any more: nothing to retry.
    assert_eq!(
        f.run(&["jobs", "retry", &id.to_string()]).status.code(),
        Some(1)
    );
}

#[tokio::test]
async fn outbox_reports_the_unsent_backlog_as_json() {
    let f = Fixture::new().await;
    let mut conn = f.conn().await;
    for n in 0..3 {
        keel_pg::outbox::insert(
            &mut conn,
            &keel_pg::outbox::NewEvent {
                aggregate_type: "thing",
                aggregate_id: &format!("t-{n}"),
                event_type: "fixture.thing.made",
                data: serde_json::json!({ "n": n }),
            },
        )
        .await
        .unwrap();
    }
    let out = f.run(&["outbox", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let rows = json(&out);
    assert_eq!(rows[0]["service"], "fixture");
    assert_eq!(rows[0]["unsent"], 3);
    assert_fits_100_columns(&stdout(&f.run(&["outbox"])));
}

#[tokio::test]
async fn the_audit_covers_a_registered_service_it_has_no_code_for() {
    let f = Fixture::new().await;
    f.job("mail", None).await;

    let out = f.run(&["audit", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "nothing failed yet");
    let report = json(&out);
    assert_eq!(report["passed"], true);
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("fixture outbox")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("fixture jobs")),
        "{names:?}"
    );

    // A job failed for good is a failed check, with the job as its example, and exit 1.
    let id = f.job("mail", Some("smtp said no")).await;
    let out = f.run(&["audit", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(report["passed"], false);
    let jobs = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().starts_with("fixture jobs"))
        .unwrap();
    assert_eq!(jobs["violations"], 1);
    assert!(
        jobs["examples"][0]
            .as_str()
            .unwrap()
            .contains(&id.to_string())
    );

    let table = stdout(&f.run(&["audit"]));
    assert_fits_100_columns(&table);
    assert!(table.contains("audit: FAILED"));
}

fn assert_fits_100_columns(text: &str) {
    for line in text.lines() {
        assert!(
            line.chars().count() <= 100,
            "{} columns: {line}",
            line.chars().count()
        );
    }
}
