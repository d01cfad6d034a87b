//! P14 for the operator tool: keelctl reads every service database as `keel_auditor` and makes
//! its few changes as `keel_operator`, never as a service's own roles.
//!
//! The failing side is what keelctl could do when it connected as the service's app role (its
//! default until the operator roles existed): erase the very outbox and job queue it audits.
//! The passing side runs the real binary as both roles on a per-test database: listings read,
//! `jobs retry` changes, and the read-only connection, handed a change, is refused by
//! Postgres (42501) rather than by keelctl's good manners.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use keel_config::ExposeSecret;
use keel_pg::jobs::{self, NewJob};
use keel_testkit::TestDb;
use keel_testkit::privilege::assert_denied;
use keelctl::targets::{AUDITOR_ROLE, OPERATOR_ROLE};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn run(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

/// A failed job and an unsent outbox row in a platform-only database, as a service leaves them.
async fn seeded() -> (TestDb, Uuid) {
    let db = TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    let id = jobs::enqueue(
        &mut app,
        &NewJob {
            queue: "p14",
            payload: serde_json::json!({}),
            max_attempts: 1,
            delay: Duration::ZERO,
            id: None,
        },
    )
    .await
    .unwrap()
    .unwrap();
    run(
        &mut app,
        &format!(
            "UPDATE jobs SET state = 'failed', attempts = 1, finished_at = now() WHERE id = '{id}'"
        ),
    )
    .await
    .unwrap();
    run(
        &mut app,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES (gen_random_uuid(), 'p14', '1', 'p14.created', '{}')",
    )
    .await
    .unwrap();
    (db, id)
}

/// What an audit's credentials must not be able to do to what it audits.
const ERASE: &[&str] = &[
    "UPDATE jobs SET payload = '{}'",
    "UPDATE outbox SET sent_at = now()",
    "DELETE FROM outbox",
    "DELETE FROM jobs",
];

#[tokio::test]
async fn with_the_app_roles_credentials_keelctl_could_erase_what_it_audits() {
    // The failing side: every statement succeeds and changes a row.
    let (db, _) = seeded().await;
    let mut app = connect(&db.app_url()).await;
    for sql in ERASE {
        assert_eq!(run(&mut app, sql).await.unwrap(), 1, "{sql}");
    }
}

#[tokio::test]
async fn keelctls_roles_cannot_erase_what_it_audits() {
    // The passing side: the same statements, as each of keelctl's roles.
    let (db, _) = seeded().await;
    for (role, url) in [
        (AUDITOR_ROLE, db.auditor_url()),
        (OPERATOR_ROLE, db.operator_url()),
    ] {
        let mut conn = connect(&url).await;
        for sql in ERASE {
            assert_denied(&format!("{role}: {sql}"), run(&mut conn, sql).await);
        }
    }
}

/// A scratch registry with one service, `fixture`, that owns a database.
fn scratch_registry() -> PathBuf {
    let path = std::env::temp_dir().join(format!("keelctl-roles-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        "[[service]]\nname = \"fixture\"\nports = { http = 18998 }\ndatabase = true\n\
         migrate = [\"migrate\"]\nready = \"http://127.0.0.1:{fixture.http}/readyz\"\n",
    )
    .unwrap();
    path
}

/// The real binary against `fixture`, with only these database URLs as configuration.
fn keelctl(registry: &PathBuf, args: &[&str], url: &str, operator_url: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keelctl"));
    cmd.arg("--registry").arg(registry).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.env("KEEL_FIXTURE__URL", url)
        .env("KEEL_FIXTURE__OPERATOR_URL", operator_url);
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn keelctl_reads_as_the_auditor_and_retries_as_the_operator() {
    let (db, id) = seeded().await;
    let registry = scratch_registry();
    let (auditor, operator) = (db.auditor_url(), db.operator_url());
    let id_text = id.to_string();

    // Reads work on the read-only connection.
    for args in [&["jobs", "-o", "json"][..], &["outbox", "-o", "json"][..]] {
        let out = keelctl(&registry, args, &auditor, &operator);
        assert!(out.status.success(), "{args:?}");
    }

    // A change handed the read-only connection is refused by Postgres: the role, not keelctl,
    // is what keeps the audit's credentials from changing anything.
    let out = keelctl(&registry, &["jobs", "retry", &id_text], &auditor, &auditor);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");

    // On the operator's connection the same command requeues the job.
    let out = keelctl(&registry, &["jobs", "retry", &id_text], &auditor, &operator);
    assert!(out.status.success());
    let mut admin = connect(&db.admin_url()).await;
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(state, "queued");
    let _ = std::fs::remove_file(registry);
}

#[test]
fn by_default_every_database_is_read_as_the_auditor_and_changed_as_the_operator() {
    let config: keelctl::Config = keel_testkit::config(keelctl::DEFAULT_CONFIG, &[]);
    let targets = config.targets().unwrap();
    let mut databases = 0;
    for t in &targets.all {
        let Some(db) = t.service.database_name() else {
            assert!(t.database_url.is_none() && t.operator_url.is_none());
            continue;
        };
        databases += 1;
        for (url, role) in [
            (&t.database_url, AUDITOR_ROLE),
            (&t.operator_url, OPERATOR_ROLE),
        ] {
            let url = url.as_ref().unwrap().expose_secret().to_owned();
            assert_eq!(
                url,
                format!("postgres://{role}:{role}_dev@127.0.0.1:6432/{db}"),
                "{}",
                t.service.name
            );
            assert!(!url.contains(&t.service.app_role()));
        }
    }
    assert!(databases > 0);
    // The selections hand each kind of command its connection.
    let reads = targets.select(&[]).unwrap();
    let changes = targets.select_operator(&[]).unwrap();
    assert_eq!(reads.len(), databases);
    assert_eq!(changes.len(), databases);
    assert!(
        reads
            .iter()
            .all(|(_, u)| u.expose_secret().contains(AUDITOR_ROLE))
    );
    assert!(
        changes
            .iter()
            .all(|(_, u)| u.expose_secret().contains(OPERATOR_ROLE))
    );
}
