//! `keelctl outbox parked` and `keelctl outbox retry` as an operator uses them: the real
//! binary against a real database per test (P02's operator half).
//!
//! What is proven here: a parked row is listed with its service, aggregate, type, attempts,
//! reason and when it was parked (JSON that parses, a table of 100 columns), rows that are
//! merely waiting are not; `retry <id>` returns one parked row to the relay once, with a fresh
//! set of attempts, after which the relay's claim takes it again; `retry --all` needs
//! `--service` and returns every parked row of that service; and `parked` reads as the
//! read-only `keel_auditor` while `retry` changes as `keel_operator` (only `parked_at` and
//! `attempts`), as keelctl reaches a real service (P14).
//!
//! Rows are parked the way the relay parks them (`keel_pg::outbox::record_refusals`), as the
//! service's own app role, in a `TestDb` with the platform's tables only, reached as a service
//! called `fixture` that exists only in a scratch registry passed with `--registry`.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use keel_pg::outbox::{self, NewEvent, Refusal};
use keel_testkit::TestDb;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

/// A platform-only database reached by keelctl as the registered service `fixture`.
struct Fixture {
    db: TestDb,
    registry: PathBuf,
}

impl Fixture {
    async fn new() -> Self {
        let registry =
            std::env::temp_dir().join(format!("keelctl-registry-{}.toml", Uuid::new_v4()));
        std::fs::write(
            &registry,
            "[[service]]\nname = \"fixture\"\nports = { http = 18999 }\ndatabase = true\n\
             migrate = [\"migrate\"]\nready = \"http://127.0.0.1:{fixture.http}/readyz\"\n",
        )
        .unwrap();
        Self {
            db: TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await,
            registry,
        }
    }

    /// keelctl with `args`, reading as the auditor and changing as the operator; no other
    /// KEEL_* variable of the test's environment reaches it.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(KEELCTL);
        cmd.arg("--registry").arg(&self.registry).args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
            cmd.env_remove(k);
        }
        cmd.env("KEEL_FIXTURE__URL", self.db.auditor_url())
            .env("KEEL_FIXTURE__OPERATOR_URL", self.db.operator_url());
        let out = cmd.output().unwrap();
        eprintln!(
            "keelctl {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The service's own connection (its app role), as the relay has.
    async fn app(&self) -> PgConnection {
        PgConnection::connect(&self.db.app_url()).await.unwrap()
    }

    /// An outbox row of aggregate `order/<aggregate>`.
    async fn event(&self, aggregate: &str) -> Uuid {
        outbox::insert(
            &mut self.app().await,
            &NewEvent {
                aggregate_type: "order",
                aggregate_id: aggregate,
                event_type: "fixture.order.placed",
                data: serde_json::json!({}),
            },
        )
        .await
        .unwrap()
    }

    /// Refuses `id` as the relay does: parked (`retry_in: None`) or to be retried later.
    async fn refuse(&self, id: Uuid, reason: &str, retry_in: Option<Duration>) {
        let mut conn = self.app().await;
        outbox::record_refusals(
            &mut conn,
            &[Refusal {
                id,
                reason: reason.to_owned(),
                retry_in,
            }],
        )
        .await
        .unwrap();
    }

    async fn parked_and_attempts(&self, id: Uuid) -> (bool, i32) {
        sqlx::query_as("SELECT parked_at IS NOT NULL, attempts FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&mut self.app().await)
            .await
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.registry);
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn assert_fits_100_columns(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= 100, "{line}");
    }
}

#[tokio::test]
async fn outbox_parked_lists_parked_rows_with_their_reason_and_not_waiting_ones() {
    let f = Fixture::new().await;
    let parked = f.event("o-1").await;
    let reason = "broker nacked the message";
    for _ in 0..2 {
        f.refuse(parked, reason, Some(Duration::ZERO)).await;
    }
    f.refuse(parked, reason, None).await;
    let waiting = f.event("o-2").await;
    f.refuse(waiting, reason, Some(Duration::from_secs(60)))
        .await;
    f.event("o-3").await;

    let out = f.run(&["outbox", "parked", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let rows = json(&out);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the parked row: {rows:?}");
    let r = &rows[0];
    assert_eq!(r["id"], parked.to_string());
    assert_eq!(r["service"], "fixture");
    assert_eq!(r["aggregate_type"], "order");
    assert_eq!(r["aggregate_id"], "o-1");
    assert_eq!(r["event_type"], "fixture.order.placed");
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["reason"], reason);
    assert!(r["parked_at"].as_str().is_some());

    let table = stdout(&f.run(&["outbox", "parked", "--service", "fixture"]));
    assert_fits_100_columns(&table);
    assert!(
        table.contains(&parked.to_string()),
        "the id is never wrapped"
    );
    assert!(!table.contains(&waiting.to_string()));

    // The backlog counts it apart from what the relay still tries.
    let backlog = json(&f.run(&["outbox", "-o", "json"]));
    assert_eq!(backlog[0]["parked"], 1);
    assert_eq!(backlog[0]["unsent"], 2);
    assert_fits_100_columns(&stdout(&f.run(&["outbox"])));
}

#[tokio::test]
async fn outbox_retry_returns_a_parked_row_to_the_relay_once() {
    let f = Fixture::new().await;
    let id = f.event("o-1").await;
    f.refuse(id, "too large: 2000000 bytes", None).await;
    assert_eq!(f.parked_and_attempts(id).await, (true, 1));
    {
        // Parked: the relay does not claim it.
        let mut tx = f.app().await;
        let mut tx = tx.begin().await.unwrap();
        assert!(outbox::claim(&mut tx, 10).await.unwrap().is_empty());
    }

    let out = f.run(&["outbox", "retry", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("fixture"));
    assert_eq!(
        f.parked_and_attempts(id).await,
        (false, 0),
        "a fresh set of attempts"
    );
    let mut conn = f.app().await;
    let mut tx = conn.begin().await.unwrap();
    let claimed: Vec<Uuid> = outbox::claim(&mut tx, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(claimed, [id], "the relay claims it again");
    drop(tx);

    // Not parked any more: nothing to retry. An id nobody has: the same.
    assert_eq!(
        f.run(&["outbox", "retry", &id.to_string()]).status.code(),
        Some(1)
    );
    assert_eq!(
        f.run(&["outbox", "retry", &Uuid::new_v4().to_string()])
            .status
            .code(),
        Some(1)
    );
}

#[tokio::test]
async fn outbox_retry_all_needs_a_service_and_returns_every_parked_row_of_it() {
    let f = Fixture::new().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = f.event(&format!("o-{n}")).await;
        f.refuse(id, "broker nacked the message", None).await;
        ids.push(id);
    }

    // Usage errors before anything runs: no service, no target, both targets, an unknown
    // service, a limit out of bounds.
    let first = ids[0].to_string();
    for args in [
        vec!["outbox", "retry", "--all"],
        vec!["outbox", "retry"],
        vec!["outbox", "retry", &first, "--all", "-s", "fixture"],
        vec!["outbox", "retry", "--all", "--service", "nosuch"],
        vec!["outbox", "parked", "--limit", "0"],
    ] {
        assert_eq!(f.run(&args).status.code(), Some(64), "{args:?}");
    }
    for id in &ids {
        assert!(f.parked_and_attempts(*id).await.0, "nothing changed");
    }

    let out = f.run(&["outbox", "retry", "--all", "--service", "fixture"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("3 parked outbox rows of fixture"));
    for id in &ids {
        assert_eq!(f.parked_and_attempts(*id).await, (false, 0));
    }
    let listed = json(&f.run(&["outbox", "parked", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 0);
}

/// `parked` needs only SELECT on `outbox` and `retry` only what migration 0007 grants the
/// operator: the read-only role cannot return a row.
#[tokio::test]
async fn outbox_retry_is_refused_to_the_read_only_role() {
    let f = Fixture::new().await;
    let id = f.event("o-1").await;
    f.refuse(id, "broker nacked the message", None).await;
    let mut cmd = Command::new(KEELCTL);
    cmd.arg("--registry")
        .arg(&f.registry)
        .args(["outbox", "retry", &id.to_string()]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    let auditor = f.db.auditor_url();
    let out = cmd
        .env("KEEL_FIXTURE__URL", &auditor)
        .env("KEEL_FIXTURE__OPERATOR_URL", &auditor)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(f.parked_and_attempts(id).await.0, "still parked");
}
