//! Schema drift: every service's copy of a platform table is the platform's (P02, P03, P08,
//! P13, P14).
//!
//! The platform tables (outbox, inbox, jobs, idempotency_keys) are defined once, in keel-pg's
//! migrations, and `<svc> migrate` applies them before the service's own. Nothing stops a
//! service migration from then altering one (an extra column, a dropped index, a looser
//! check), and keel-pg's code, its pinned outbox claim plan and keelctl would silently be
//! working on a different table in that service alone. So: migrate each registered service's
//! database exactly as `migrate` does, migrate a second database with the platform's
//! migrations only, read every platform table's shape from the catalog of both, and require
//! them equal.
//!
//! A shape is what the catalog says, not what the SQL files say: columns (name, position,
//! type, nullability, default, identity, generated), indexes (`pg_get_indexdef`), constraints
//! (`pg_get_constraintdef`), triggers, persistence, ownership by the database's owner role
//! and the app role's privileges. The services come from the registry (infra/services.toml),
//! their migrations from `services/<name>/migrations`, the folder each service's `MIGRATOR`
//! embeds, so a service added with `make new-service` is checked without editing this file.
//!
//! `a_drifted_copy_is_reported` proves the comparison bites: it drifts a copy in each of
//! those ways and expects each one named in the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;

use keel_pg::{PLATFORM_MIGRATOR, PLATFORM_TABLES};
use keel_testkit::{TestDb, workspace_root};
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection};

/// One column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    /// `format_type`: `bigint`, `timestamp with time zone`, `character(3)`, …
    data_type: String,
    not_null: bool,
    /// `pg_get_expr` of the default: `now()`, `'queued'::text`, …
    default: Option<String>,
    /// `a` (always), `d` (by default) or empty.
    identity: String,
    /// `s` (stored generated column) or empty.
    generated: String,
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.data_type)?;
        if self.not_null {
            write!(f, " NOT NULL")?;
        }
        if let Some(d) = &self.default {
            write!(f, " DEFAULT {d}")?;
        }
        if !self.identity.is_empty() {
            write!(f, " IDENTITY({})", self.identity)?;
        }
        if !self.generated.is_empty() {
            write!(f, " GENERATED({})", self.generated)?;
        }
        Ok(())
    }
}

/// A table's shape, with role names normalised (the owner and app roles differ per database).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableShape {
    /// `relkind` and `relpersistence`: `r/p` is an ordinary, logged table.
    kind: String,
    /// In column order (`SELECT *` and positional inserts see it).
    columns: Vec<Column>,
    indexes: BTreeSet<String>,
    /// `name: definition`.
    constraints: BTreeSet<String>,
    triggers: BTreeSet<String>,
    owned_by_owner_role: bool,
    row_security: bool,
    /// Table privileges the database's app role holds.
    app_privileges: BTreeSet<String>,
}

const TABLE_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

/// Reads `table`'s shape in `db` from the catalog, or `None` if there is no such table.
async fn shape(db: &TestDb, table: &str) -> Option<TableShape> {
    let mut conn = PgConnection::connect(&db.admin_url()).await.unwrap();
    let owner = format!("{}_owner", db.service);
    let app = format!("{}_app", db.service);
    let oid: Option<sqlx::postgres::types::Oid> =
        sqlx::query_scalar("SELECT to_regclass('public.' || quote_ident($1))::oid")
            .bind(table)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let oid = oid?;

    let (kind, owned_by_owner_role, row_security): (String, bool, bool) = sqlx::query_as(
        "SELECT relkind::text || '/' || relpersistence::text,
                pg_get_userbyid(relowner) = $2,
                relrowsecurity
           FROM pg_class WHERE oid = $1",
    )
    .bind(oid)
    .bind(&owner)
    .fetch_one(&mut conn)
    .await
    .unwrap();

    let columns = sqlx::query_as::<_, (String, String, bool, Option<String>, String, String)>(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
           FROM pg_attribute a
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(
        |(name, data_type, not_null, default, identity, generated)| Column {
            name,
            data_type,
            not_null,
            default,
            identity,
            generated,
        },
    )
    .collect();

    let indexes = sqlx::query_scalar::<_, String>(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1",
    )
    .bind(oid)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();

    let constraints = sqlx::query_scalar::<_, String>(
        "SELECT conname::text || ': ' || pg_get_constraintdef(oid)
           FROM pg_constraint WHERE conrelid = $1",
    )
    .bind(oid)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();

    let triggers = sqlx::query_scalar::<_, String>(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal",
    )
    .bind(oid)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();

    let app_privileges = sqlx::query_scalar::<_, String>(
        "SELECT p FROM unnest($3::text[]) AS p WHERE has_table_privilege($2, $1, p)",
    )
    .bind(oid)
    .bind(&app)
    .bind(TABLE_PRIVILEGES)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();

    let _ = conn.close().await;
    Some(TableShape {
        kind,
        columns,
        indexes,
        constraints,
        triggers,
        owned_by_owner_role,
        row_security,
        app_privileges,
    })
}

/// What differs between the platform's `expected` shape of `table` and `actual`, one line per
/// difference, each naming the table and the thing: empty when they are equal.
fn drift(table: &str, expected: Option<&TableShape>, actual: Option<&TableShape>) -> Vec<String> {
    let (expected, actual) = match (expected, actual) {
        (Some(e), Some(a)) => (e, a),
        (Some(_), None) => return vec![format!("{table}: table is missing")],
        (None, Some(_)) => return vec![format!("{table}: table is not in the platform schema")],
        (None, None) => return vec![format!("{table}: table is missing on both sides")],
    };
    let mut out = Vec::new();
    if expected.kind != actual.kind {
        out.push(format!(
            "{table}: relkind/persistence {} instead of {}",
            actual.kind, expected.kind
        ));
    }

    for e in &expected.columns {
        match actual.columns.iter().find(|a| a.name == e.name) {
            None => out.push(format!("{table}: column `{e}` is missing")),
            Some(a) if a != e => out.push(format!("{table}: column `{a}` instead of `{e}`")),
            Some(_) => {}
        }
    }
    for a in &actual.columns {
        if !expected.columns.iter().any(|e| e.name == a.name) {
            out.push(format!("{table}: column `{a}` is extra"));
        }
    }
    let names = |cols: &[Column]| cols.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let (en, an) = (names(&expected.columns), names(&actual.columns));
    if en.len() == an.len() && en != an {
        out.push(format!("{table}: column order {an:?} instead of {en:?}"));
    }

    let sets = [
        ("index", &expected.indexes, &actual.indexes),
        ("constraint", &expected.constraints, &actual.constraints),
        ("trigger", &expected.triggers, &actual.triggers),
        (
            "app role privilege",
            &expected.app_privileges,
            &actual.app_privileges,
        ),
    ];
    for (what, e, a) in sets {
        for missing in e.difference(a) {
            out.push(format!("{table}: {what} `{missing}` is missing"));
        }
        for extra in a.difference(e) {
            out.push(format!("{table}: {what} `{extra}` is extra"));
        }
    }

    if expected.owned_by_owner_role != actual.owned_by_owner_role {
        out.push(format!(
            "{table}: owned by the owner role: {} instead of {}",
            actual.owned_by_owner_role, expected.owned_by_owner_role
        ));
    }
    if expected.row_security != actual.row_security {
        out.push(format!(
            "{table}: row security {} instead of {}",
            actual.row_security, expected.row_security
        ));
    }
    out
}

/// Every platform table of `db` against `reference`'s.
async fn platform_drift(reference: &TestDb, db: &TestDb) -> Vec<String> {
    let mut out = Vec::new();
    for table in PLATFORM_TABLES {
        let expected = shape(reference, table).await;
        let actual = shape(db, table).await;
        out.extend(drift(table, expected.as_ref(), actual.as_ref()));
    }
    out
}

/// The services that own a database, from the registry, each with the migrations its
/// `MIGRATOR` embeds (`sqlx::migrate!("./migrations")` in `services/<name>`), read the same way
/// at run time.
async fn registered_services() -> Vec<(String, Migrator)> {
    let root = workspace_root();
    let registry = keelctl::Registry::load(&root.join("infra/services.toml")).unwrap();
    let mut services = Vec::new();
    for service in registry.with_database() {
        let dir = root.join("services").join(&service.name).join("migrations");
        let migrator = if dir.exists() {
            Migrator::new(dir.as_path()).await.unwrap()
        } else {
            // A service with no table of its own still gets the platform's.
            Migrator::with_migrations(Vec::new())
        };
        services.push((service.name.clone(), migrator));
    }
    services
}

#[tokio::test]
async fn every_services_platform_tables_match_the_platform_schema() {
    let reference = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let services = registered_services().await;
    assert!(
        services.iter().any(|(name, _)| name == "checkout"),
        "the registry lists the journey's services"
    );

    let mut report = String::new();
    for (name, migrator) in &services {
        // Exactly what `<name> migrate` does: the platform's migrations, then the service's.
        let db = TestDb::create(name, migrator).await;
        for line in platform_drift(&reference, &db).await {
            writeln!(report, "{name}: {line}").unwrap();
        }
    }
    assert!(
        report.is_empty(),
        "platform tables differ from keel-pg's migrations (change them there, in a new \
         platform migration, never in a service's):\n{report}"
    );
}

#[tokio::test]
async fn a_drifted_copy_is_reported() {
    let reference = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    let copy = TestDb::create("platform", &PLATFORM_MIGRATOR).await;
    // Control: two databases with the same migrations compare equal.
    assert_eq!(
        platform_drift(&reference, &copy).await,
        Vec::<String>::new()
    );

    // Drift the copy as a service migration might, as its owner.
    let mut owner = PgConnection::connect(&copy.owner_url()).await.unwrap();
    sqlx::raw_sql(
        "ALTER TABLE outbox ADD COLUMN note text;
         DROP INDEX outbox_unsent_aggregate;
         ALTER TABLE inbox ALTER COLUMN received_at DROP DEFAULT;
         ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
         ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
             CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'paused'));
         ALTER TABLE jobs ALTER COLUMN locked_by SET NOT NULL;
         ALTER TABLE idempotency_keys ALTER COLUMN status_code TYPE bigint;
         REVOKE DELETE ON idempotency_keys FROM platform_app;",
    )
    .execute(&mut owner)
    .await
    .unwrap();
    let _ = owner.close().await;

    let report = platform_drift(&reference, &copy).await;
    let expected = [
        "outbox: column `note text` is extra",
        "outbox: index `CREATE INDEX outbox_unsent_aggregate ON public.outbox USING btree \
         (aggregate_type, aggregate_id, seq) WHERE (sent_at IS NULL)` is missing",
        "inbox: column `received_at timestamp with time zone NOT NULL` instead of \
         `received_at timestamp with time zone NOT NULL DEFAULT now()`",
        "jobs: constraint `jobs_state_check: CHECK ((state = ANY (ARRAY['queued'::text, \
         'running'::text, 'succeeded'::text, 'failed'::text, 'paused'::text])))` is extra",
        "jobs: column `locked_by text NOT NULL` instead of `locked_by text`",
        "idempotency_keys: column `status_code bigint` instead of `status_code integer`",
        "idempotency_keys: app role privilege `DELETE` is missing",
    ];
    for line in expected {
        assert!(
            report.iter().any(|r| r == line),
            "expected `{line}` in the report:\n{}",
            report.join("\n")
        );
    }
    // The replaced check constraint is also reported as missing in its original form, and
    // nothing else is reported: every difference above is named once.
    assert_eq!(report.len(), expected.len() + 1, "{}", report.join("\n"));
}
