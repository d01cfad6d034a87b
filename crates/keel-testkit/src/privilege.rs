//! P14 checks shared by every service's least-privilege test: the runtime role is confined to
//! DML on its own database, and the operator tool's roles (`keel_auditor`, `keel_operator`)
//! hold exactly their grants. Each check shows the capability first (with the owner role, or
//! the statement the role is granted), so a denial is the role's doing and not a broken
//! statement.

use std::collections::BTreeSet;

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::{Stack, TestDb};

/// The operator tool's read-only role (`keelctl` audit and listings), one per cluster
/// (`infra/postgres/init.sql`); granted SELECT by the platform's migration 0007 and the
/// services' own.
pub const AUDITOR_ROLE: &str = "keel_auditor";
/// The operator tool's role for an operator's changes (`keelctl jobs retry`, `outbox retry`,
/// `api-keys create` and `revoke`), one per cluster, granted column by column.
pub const OPERATOR_ROLE: &str = "keel_operator";

/// What the platform's migrations 0007 and 0009 grant [`OPERATOR_ROLE`] on every database, in
/// the form [`grants`] reads: the columns `keel_pg::jobs::retry_failed`,
/// `keel_pg::outbox::unpark` and `keel_pg::api_keys::revoke` set, the ones their `WHERE`
/// reads, and the columns `keel_pg::api_keys::issue` inserts.
pub const OPERATOR_PLATFORM_GRANTS: &[&str] = &[
    "customer_api_keys(id): INSERT",
    "customer_api_keys(customer_id): INSERT",
    "customer_api_keys(key_hash): INSERT",
    "customer_api_keys(id): SELECT",
    "customer_api_keys(revoked_at): SELECT",
    "customer_api_keys(revoked_at): UPDATE",
    "jobs(id): SELECT",
    "jobs(state): SELECT",
    "jobs(state): UPDATE",
    "jobs(attempts): UPDATE",
    "jobs(run_at): UPDATE",
    "jobs(finished_at): UPDATE",
    "outbox(id): SELECT",
    "outbox(parked_at): SELECT",
    "outbox(sent_at): SELECT",
    "outbox(parked_at): UPDATE",
    "outbox(attempts): UPDATE",
];

/// The platform tables [`AUDITOR_ROLE`] reads in every database (migration 0007).
pub const AUDITOR_PLATFORM_TABLES: &[&str] = &["jobs", "outbox"];

/// Asserts `result` is Postgres's `insufficient_privilege` (42501), naming `what` otherwise.
pub fn assert_denied<T: std::fmt::Debug>(what: &str, result: Result<T, sqlx::Error>) {
    let err = result.expect_err(what);
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        code, "42501",
        "{what}: insufficient_privilege expected, got {err}"
    );
}

/// Runs one statement of a test's own text (simple protocol, no parameters).
async fn run(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect for a privilege check: {e}"))
}

/// Every privilege `role` holds on the relations of `db`'s `public` schema, read from the
/// catalog as the superuser, one line per grant: `jobs: SELECT` for a whole table,
/// `jobs(state): UPDATE` for one column. Comparing this with a list pins a role's grants
/// exactly: a grant added by a later migration shows up as a difference.
pub async fn grants(db: &TestDb, role: &str) -> BTreeSet<String> {
    let mut admin = connect(&db.admin_url()).await;
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text || ': ' || a.privilege_type
           FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
          WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = $1::text::regrole
         UNION ALL
         SELECT c.relname::text || '(' || att.attname::text || '): ' || a.privilege_type
           FROM pg_class c
           JOIN pg_attribute att ON att.attrelid = c.oid AND att.attnum > 0
                                AND NOT att.attisdropped
          CROSS JOIN LATERAL aclexplode(att.attacl) a
          WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = $1::text::regrole",
    )
    .bind(role)
    .fetch_all(&mut admin)
    .await
    .unwrap_or_else(|e| panic!("read {role}'s grants: {e}"));
    let _ = admin.close().await;
    lines.into_iter().collect()
}

/// Asserts, for `db`'s service: the owner can create a table and a temporary table and the app
/// role can do neither; the app role cannot alter or drop the table, or read the migration
/// history; and it cannot connect to any of `other_databases`, directly or through pgbouncer.
pub async fn assert_app_role_is_confined(db: &TestDb, other_databases: &[&str]) {
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::query("CREATE TABLE p14_probe (id int)")
        .execute(&mut owner)
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE p14_owner_tmp (id int)")
        .execute(&mut owner)
        .await
        .unwrap();
    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    sqlx::query("SELECT count(*) FROM p14_probe")
        .execute(&mut app)
        .await
        .unwrap();
    for sql in [
        "CREATE TABLE p14_app (id int)",
        "CREATE TEMP TABLE p14_app_tmp (id int)",
        "ALTER TABLE p14_probe ADD COLUMN evil text",
        "DROP TABLE p14_probe",
        "SELECT * FROM _sqlx_migrations",
    ] {
        assert_denied(sql, sqlx::query(sql).execute(&mut app).await);
    }

    let stack = Stack::load();
    let role = format!("{}_app", db.service);
    for port in [stack.pg_port, stack.pgbouncer_port] {
        for other in other_databases {
            let url = format!("postgres://{role}:{role}_dev@127.0.0.1:{port}/{other}");
            let err = PgConnection::connect(&url)
                .await
                .expect_err("another service's database must refuse the app role");
            let msg = err.to_string();
            assert!(
                msg.contains("permission denied") || msg.contains("42501"),
                "{role} to {other} on port {port}: {msg}"
            );
        }
    }
}

/// Asserts [`AUDITOR_ROLE`] on `db` holds SELECT on the platform's [`AUDITOR_PLATFORM_TABLES`]
/// and on `tables` (the service's own), and no other privilege on anything; that it reads each
/// of them through pgbouncer; and that every write, DDL and temporary table is denied to it.
pub async fn assert_auditor_reads_only(db: &TestDb, tables: &[&str]) {
    let readable: Vec<&str> = AUDITOR_PLATFORM_TABLES
        .iter()
        .chain(tables)
        .copied()
        .collect();
    let expected: BTreeSet<String> = readable.iter().map(|t| format!("{t}: SELECT")).collect();
    assert_eq!(
        grants(db, AUDITOR_ROLE).await,
        expected,
        "{AUDITOR_ROLE}'s grants on {}",
        db.name
    );

    let mut admin = connect(&db.admin_url()).await;
    let mut auditor = connect(&db.auditor_url()).await;
    for table in &readable {
        // The granted read works: the denials below are about writing, not reaching the table.
        run(&mut auditor, &format!("SELECT count(*) FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("{AUDITOR_ROLE} reads {table}: {e}"));
        // A column an UPDATE may name (not an identity or generated one, which Postgres
        // refuses for another reason than privilege).
        let column: String = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                AND attidentity = '' AND attgenerated = ''
              ORDER BY attnum LIMIT 1",
        )
        .bind(table)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        for sql in [
            format!("INSERT INTO {table} DEFAULT VALUES"),
            format!("UPDATE {table} SET {column} = {column}"),
            format!("DELETE FROM {table}"),
            format!("TRUNCATE {table}"),
        ] {
            assert_denied(
                &format!("{AUDITOR_ROLE}: {sql}"),
                run(&mut auditor, &sql).await,
            );
        }
    }
    for sql in [
        "CREATE TABLE p14_auditor (id int)",
        "CREATE TEMP TABLE p14_auditor_tmp (id int)",
    ] {
        assert_denied(
            &format!("{AUDITOR_ROLE}: {sql}"),
            run(&mut auditor, sql).await,
        );
    }
    // Nor the migration histories (a platform-only database has no `_sqlx_migrations`).
    for history in [
        "_sqlx_migrations",
        keel_pg::schema::PLATFORM_MIGRATIONS_TABLE,
    ] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(history)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        if exists {
            let sql = format!("SELECT * FROM {history}");
            assert_denied(
                &format!("{AUDITOR_ROLE}: {sql}"),
                run(&mut auditor, &sql).await,
            );
        }
    }
    let _ = admin.close().await;
}

/// Asserts [`OPERATOR_ROLE`] on `db` holds exactly [`OPERATOR_PLATFORM_GRANTS`] plus `extra`
/// (the service's own, in [`grants`]' form); that through pgbouncer it retries a failed job,
/// returns a parked outbox row to the relay, and issues and revokes a customer's API key with
/// the platform's own functions; and that it can do nothing else with them: no insert (but a
/// key's), delete or truncate, no other column changed (an event marked sent is an event lost,
/// a key moved to another customer acts for them), no payload or key hash read, no inbox or
/// idempotency keys, no DDL, no temporary table.
pub async fn assert_operator_is_narrow(db: &TestDb, extra: &[&str]) {
    let expected: BTreeSet<String> = OPERATOR_PLATFORM_GRANTS
        .iter()
        .chain(extra)
        .map(|g| (*g).to_owned())
        .collect();
    assert_eq!(
        grants(db, OPERATOR_ROLE).await,
        expected,
        "{OPERATOR_ROLE}'s grants on {}",
        db.name
    );

    // A failed job and a parked event, as the workers and the relay leave them.
    let mut owner = connect(&db.owner_url()).await;
    let (job, event) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO jobs (id, queue, payload, max_attempts, state, attempts, finished_at)
         VALUES ($1, 'p14', '{}', 1, 'failed', 1, now())",
    )
    .bind(job)
    .execute(&mut owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, attempts,
                             last_error, parked_at)
         VALUES ($1, 'p14', '1', 'p14.parked', '{}', 5, 'nacked', now())",
    )
    .bind(event)
    .execute(&mut owner)
    .await
    .unwrap();

    let mut operator = connect(&db.operator_url()).await;
    assert!(
        keel_pg::jobs::retry_failed(&mut operator, job)
            .await
            .unwrap_or_else(|e| panic!("{OPERATOR_ROLE} retries a failed job: {e}")),
        "the failed job is queued again"
    );
    assert!(
        keel_pg::outbox::unpark(&mut operator, event)
            .await
            .unwrap_or_else(|e| panic!("{OPERATOR_ROLE} returns a parked event: {e}")),
        "the parked event goes back to the relay"
    );
    let issued = keel_pg::api_keys::issue(&mut operator, "p14-customer")
        .await
        .unwrap_or_else(|e| panic!("{OPERATOR_ROLE} issues an API key: {e}"));
    assert!(
        keel_pg::api_keys::revoke(&mut operator, &issued.id)
            .await
            .unwrap_or_else(|e| panic!("{OPERATOR_ROLE} revokes an API key: {e}")),
        "the key is revoked"
    );
    let key = &issued.id;

    for sql in [
        "INSERT INTO jobs (id, queue, payload, max_attempts)
         VALUES (gen_random_uuid(), 'p14', '{}', 1)",
        "UPDATE jobs SET max_attempts = 100",
        "UPDATE jobs SET payload = '{}'",
        "SELECT payload FROM jobs",
        "DELETE FROM jobs",
        "TRUNCATE jobs",
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES (gen_random_uuid(), 'p14', '1', 'p14.invented', '{}')",
        "UPDATE outbox SET sent_at = now()",
        "SELECT payload FROM outbox",
        "DELETE FROM outbox",
        "TRUNCATE outbox",
        "SELECT * FROM inbox",
        "SELECT * FROM idempotency_keys",
        "SELECT key_hash FROM customer_api_keys",
        "SELECT customer_id FROM customer_api_keys",
        "TRUNCATE customer_api_keys",
        "CREATE TABLE p14_operator (id int)",
        "CREATE TEMP TABLE p14_operator_tmp (id int)",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([
        format!("UPDATE customer_api_keys SET customer_id = 'someone-else' WHERE id = '{key}'"),
        format!("UPDATE customer_api_keys SET key_hash = key_hash WHERE id = '{key}'"),
        format!("DELETE FROM customer_api_keys WHERE id = '{key}'"),
    ]) {
        assert_denied(
            &format!("{OPERATOR_ROLE}: {sql}"),
            run(&mut operator, &sql).await,
        );
    }
}
