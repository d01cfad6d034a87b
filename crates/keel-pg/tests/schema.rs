//! Proofs for the platform's own schema (`keel_pg::schema`) and its least privilege (P14).
//!
//! The platform's migrations run before a service's, in a history table of their own, and
//! grant the runtime role rows on each platform table (only reads on `customer_api_keys`) and
//! nothing more, on a new database and on one an earlier release migrated. These tests use the
//! platform-only roles (`platform_owner`, `platform_app`), as a service's database uses its
//! `<svc>_owner` / `<svc>_app`; the comparison with every real service's database is
//! `e2e/tests/schema_drift.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_pg::{DatabaseConfig, PLATFORM_MIGRATOR, PLATFORM_TABLES, schema};
use keel_testkit::privilege::{self, assert_denied};
use keel_testkit::{Stack, TestDb};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Connection, PgConnection, SqlSafeStr};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

/// How to exercise each platform table the app role writes: one row in, changed, deleted.
struct RowProbe {
    table: &'static str,
    insert: &'static str,
    update: &'static str,
}

const PROBES: &[RowProbe] = &[
    RowProbe {
        table: "outbox",
        // `seq` is an identity column: no grant on its sequence is needed, nor given.
        insert: "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
                 VALUES (gen_random_uuid(), 'probe', '1', 'probe.created', '{}')",
        update: "UPDATE outbox SET attempts = attempts + 1",
    },
    RowProbe {
        table: "inbox",
        insert: "INSERT INTO inbox (consumer, message_id) VALUES ('probe', 'm-1')",
        update: "UPDATE inbox SET received_at = now()",
    },
    RowProbe {
        table: "jobs",
        insert: "INSERT INTO jobs (id, queue, payload, max_attempts)
                 VALUES (gen_random_uuid(), 'probe', '{}', 1)",
        update: "UPDATE jobs SET attempts = attempts + 1",
    },
    RowProbe {
        table: "idempotency_keys",
        insert: "INSERT INTO idempotency_keys (scope, key, request_hash, expires_at)
                 VALUES ('probe', 'k-1', '\\x00', now())",
        update: "UPDATE idempotency_keys SET status_code = 200",
    },
];

/// A platform table the app role only reads: the owner writes `seed`, the app role reads it
/// back and is denied each of `writes`.
struct ReadProbe {
    table: &'static str,
    seed: &'static str,
    writes: &'static [&'static str],
}

const READ_ONLY: &[ReadProbe] = &[ReadProbe {
    // Keys are issued by the operator (keel_pg::api_keys::issue) and verified by the service:
    // a service that could write here could mint a key for any customer, or un-revoke one.
    table: "customer_api_keys",
    seed: "INSERT INTO customer_api_keys (id, customer_id, key_hash)
           VALUES ('0123456789ab', 'probe', decode(repeat('00', 32), 'hex'))",
    writes: &[
        "INSERT INTO customer_api_keys (id, customer_id, key_hash)
         VALUES ('00000000beef', 'anyone', decode(repeat('00', 32), 'hex'))",
        "UPDATE customer_api_keys SET revoked_at = NULL",
        "UPDATE customer_api_keys SET customer_id = 'someone-else'",
        "DELETE FROM customer_api_keys",
    ],
}];

async fn exec(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

#[tokio::test]
async fn platform_tables_are_exactly_the_declared_ones() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut owner = connect(&db.owner_url()).await;
    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&mut owner)
    .await
    .unwrap();
    tables.retain(|t| t != schema::PLATFORM_MIGRATIONS_TABLE);
    let mut declared: Vec<&str> = PLATFORM_TABLES.to_vec();
    declared.sort_unstable();
    assert_eq!(
        tables, declared,
        "PLATFORM_TABLES must list what the migrations create"
    );
    // And the probes below cover every one of them.
    let mut probed: Vec<&str> = PROBES
        .iter()
        .map(|p| p.table)
        .chain(READ_ONLY.iter().map(|p| p.table))
        .collect();
    probed.sort_unstable();
    assert_eq!(probed, declared);
}

#[tokio::test]
async fn app_role_can_use_rows_of_every_platform_table() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    // Through pgbouncer, as a running service connects.
    let mut app = connect(&db.app_url()).await;
    for probe in PROBES {
        assert_eq!(
            exec(&mut app, probe.insert).await.unwrap(),
            1,
            "{}",
            probe.insert
        );
        assert_eq!(
            exec(&mut app, probe.update).await.unwrap(),
            1,
            "{}",
            probe.update
        );
        let delete = format!("DELETE FROM {}", probe.table);
        assert_eq!(exec(&mut app, &delete).await.unwrap(), 1, "{delete}");
    }
}

#[tokio::test]
async fn app_role_only_reads_the_tables_it_must_not_write() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut owner = connect(&db.owner_url()).await;
    let mut app = connect(&db.app_url()).await;
    for probe in READ_ONLY {
        // The owner can write each statement below: the denials are the role's doing.
        assert_eq!(
            exec(&mut owner, probe.seed).await.unwrap(),
            1,
            "{}",
            probe.seed
        );
        let read = format!("SELECT * FROM {}", probe.table);
        assert_eq!(exec(&mut app, &read).await.unwrap(), 1, "{read}");
        for sql in probe.writes {
            assert_denied(sql, exec(&mut app, sql).await);
        }
    }
}

/// The platform's migrations released before `version`, recorded where the platform's are: a
/// database as an earlier release of the platform left it.
fn platform_before(version: i64) -> Migrator {
    let mut earlier = Migrator::with_migrations(
        PLATFORM_MIGRATOR
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect(),
    );
    earlier.dangerous_set_table_name(schema::PLATFORM_MIGRATIONS_TABLE);
    earlier
}

#[tokio::test]
async fn a_platform_table_added_later_gets_the_same_grants_on_a_database_migrated_before() {
    // A service's database migrated by an earlier release: the platform before
    // customer_api_keys (0009), then the service's own first migration, which sets default
    // privileges for its app role on every table the owner creates from then on.
    let db = TestDb::empty("platform").await;
    let mut owner = connect(&db.owner_url()).await;
    platform_before(9).run(&mut owner).await.unwrap();
    service_migrator().run(&mut owner).await.unwrap();
    // The failing side: those defaults hand any new table's rows to the app role...
    exec(&mut owner, "CREATE TABLE naive (id int)")
        .await
        .unwrap();
    let naive = privilege::grants(&db, "platform_app").await;
    assert!(naive.contains("naive: INSERT"), "{naive:?}");

    // ... and the platform's next release creates its table as that owner. Its migration
    // takes them back: the app role reads keys here exactly as on a new database.
    schema::apply(&mut owner, &service_migrator())
        .await
        .unwrap();
    let on_table = |grants: std::collections::BTreeSet<String>| -> Vec<String> {
        grants
            .into_iter()
            .filter(|g| g.starts_with("customer_api_keys"))
            .collect()
    };
    let upgraded = on_table(privilege::grants(&db, "platform_app").await);
    assert_eq!(upgraded, ["customer_api_keys: SELECT"]);
    let fresh = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    assert_eq!(
        on_table(privilege::grants(&fresh, "platform_app").await),
        upgraded
    );
}

#[tokio::test]
async fn the_operator_tools_roles_hold_exactly_their_grants_on_the_platform_tables() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    privilege::assert_auditor_reads_only(&db, &[]).await;
    privilege::assert_operator_is_narrow(&db, &[]).await;
}

#[tokio::test]
async fn app_role_cannot_alter_truncate_or_drop_platform_tables() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut app = connect(&db.app_url()).await;
    for table in PLATFORM_TABLES {
        for sql in [
            format!("ALTER TABLE {table} ADD COLUMN evil text"),
            format!("CREATE INDEX evil ON {table} ((1))"),
            format!("TRUNCATE {table}"),
            format!("DROP TABLE {table}"),
        ] {
            assert_denied(&sql, exec(&mut app, &sql).await);
        }
    }
    // Positive control: the owner may; the denials above are the role's doing.
    let mut owner = connect(&db.owner_url()).await;
    exec(&mut owner, "ALTER TABLE outbox ADD COLUMN fine text")
        .await
        .unwrap();
}

#[tokio::test]
async fn app_role_cannot_read_the_platform_migration_history() {
    let db = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let mut owner = connect(&db.owner_url()).await;
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        schema::PLATFORM_MIGRATIONS_TABLE
    )))
    .fetch_one(&mut owner)
    .await
    .unwrap();
    assert_eq!(
        applied,
        i64::try_from(PLATFORM_MIGRATOR.iter().count()).unwrap()
    );

    let mut app = connect(&db.app_url()).await;
    let sql = format!("SELECT * FROM {}", schema::PLATFORM_MIGRATIONS_TABLE);
    assert_denied(&sql, exec(&mut app, &sql).await);
}

/// A service's own migrations, as `sqlx::migrate!` would embed them: numbered from 1, like
/// the platform's, which is the point of keeping the two histories apart.
fn service_migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            "grants".into(),
            MigrationType::Simple,
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO platform_app"
                .into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "widgets".into(),
            MigrationType::Simple,
            // A service table may reference a platform table: the platform's ran first.
            "CREATE TABLE widgets (
                 id uuid PRIMARY KEY,
                 job_id uuid REFERENCES jobs (id)
             )"
            .into_sql_str(),
            false,
        ),
    ])
}

#[tokio::test]
async fn migrate_applies_platform_then_service_in_separate_histories() {
    // A database with nothing in it but the roles' grants: what `<svc> migrate` meets first.
    let db = TestDb::empty("platform").await;
    let config = DatabaseConfig {
        url: db.app_direct_url().into(),
        migrate_url: db.owner_url().into(),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        retention: Default::default(),
    };
    let service = service_migrator();
    keel_pg::migrate(&config, "keel-pg-test", &service)
        .await
        .unwrap();
    // Running again finds everything applied: a no-op, not an error.
    keel_pg::migrate(&config, "keel-pg-test", &service)
        .await
        .unwrap();

    let mut owner = connect(&db.owner_url()).await;
    let platform: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {} ORDER BY version",
        schema::PLATFORM_MIGRATIONS_TABLE
    )))
    .fetch_all(&mut owner)
    .await
    .unwrap();
    let expected: Vec<i64> = PLATFORM_MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(platform, expected);
    let own: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY 1")
        .fetch_all(&mut owner)
        .await
        .unwrap();
    assert_eq!(
        own,
        vec![1, 2],
        "the service's history holds only its own versions"
    );

    // The app role uses both kinds of table, and neither history.
    let mut app = connect(&db.app_direct_url()).await;
    exec(
        &mut app,
        "INSERT INTO jobs (id, queue, payload, max_attempts)
         VALUES ('00000000-0000-0000-0000-000000000001', 'q', '{}', 1);
         INSERT INTO widgets VALUES (gen_random_uuid(), '00000000-0000-0000-0000-000000000001')",
    )
    .await
    .unwrap();
    for history in ["_sqlx_migrations", schema::PLATFORM_MIGRATIONS_TABLE] {
        let sql = format!("SELECT * FROM {history}");
        assert_denied(&sql, exec(&mut app, &sql).await);
    }
}

#[tokio::test]
async fn platform_migrations_refuse_a_role_that_is_not_a_service_owner() {
    // Migrating as the superuser would create the tables but grant them to nobody useful
    // (there is no `postgres_app`): the first platform migration stops it, by name.
    let db = TestDb::empty("platform").await;
    let mut superuser = connect(&Stack::load().admin_url(&db.name)).await;
    let err = PLATFORM_MIGRATOR.run(&mut superuser).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("<service>_owner"), "{msg}");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'outbox'",
    )
    .fetch_one(&mut superuser)
    .await
    .unwrap();
    assert_eq!(tables, 0, "the failed migration left nothing behind");
}
