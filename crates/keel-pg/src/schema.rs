//! The platform's own schema: the tables behind [`outbox`](crate::outbox) (P02),
//! [`inbox`](crate::inbox) (P03), [`jobs`](crate::jobs) (P08),
//! [`idempotency`](crate::idempotency) (P13) and [`api_keys`](crate::api_keys) (customers' API
//! keys), defined once, here, and applied to every service's database before the service's own
//! migrations (least privilege, P14).
//!
//! The SQL lives in `crates/keel-pg/migrations/`, numbered and forward-only like any service's,
//! and is embedded in the binary by `sqlx::migrate!`. A service never copies it: its `migrate`
//! command calls [`crate::migrate`] with its own migrator, which runs [`PLATFORM_MIGRATOR`]
//! first and the service's second.
//!
//! **Why a second history table rather than one composed migrator.** Platform versions are
//! recorded in `_keel_platform_migrations`, the service's in sqlx's usual `_sqlx_migrations`.
//! Composing both sources into one migrator would put them in one version space: the platform
//! would need a reserved range, every service would have to number around it, and a platform
//! migration released later would sit between versions a service already applied. With two
//! tables each history is numbered from 1 by its owner, sqlx's checks (checksums of applied
//! migrations, no applied version missing from the source) apply to each on its own, and
//! `sqlx migrate info` on a service folder still tells the truth about that folder. The cost is
//! an ordering rule, kept by [`apply`]: platform first, so a service migration may reference a
//! platform table, and the platform never references a service's.
//!
//! **Grants.** Platform migrations run before the service's first migration, which is where a
//! service sets `ALTER DEFAULT PRIVILEGES` for its runtime role, so the platform cannot rely on
//! those defaults. Instead its first migration checks that it runs as `<svc>_owner` with a
//! matching `<svc>_app` role (and fails otherwise) and sets the schema baseline (no `PUBLIC`
//! access, `USAGE` for the app role), and each table's migration grants the app role derived
//! from the owner's name what it needs on that table: `SELECT, INSERT, UPDATE, DELETE`, or
//! `SELECT` alone on `customer_api_keys` (a service verifies keys, only the operator issues
//! them). The app role gets rows, never `ALTER`, `DROP` or `TRUNCATE` (only an owner can).
//!
//! Must not break: the platform never sets default privileges (they would also cover
//! `_sqlx_migrations`, which sqlx creates after the platform ran, and let the app role rewrite
//! the service's migration history), and platform migrations never change once released: add
//! a new numbered file instead.

use std::sync::LazyLock;

use sqlx::PgConnection;
use sqlx::migrate::{MigrateError, Migrator};

/// Where a database records which platform migrations it has applied.
pub const PLATFORM_MIGRATIONS_TABLE: &str = "_keel_platform_migrations";

/// The tables the platform's migrations create, each owned by one module of this crate.
/// Every service's database has all of them, whether or not the service uses each yet.
pub const PLATFORM_TABLES: &[&str] = &[
    "outbox",
    "inbox",
    "jobs",
    "idempotency_keys",
    "customer_api_keys",
];

/// The platform's migrations (`crates/keel-pg/migrations/`), recorded in
/// [`PLATFORM_MIGRATIONS_TABLE`].
///
/// A `LazyLock` because sqlx sets a custom history table only through a `&mut` method, which a
/// `static` initialiser cannot call. It dereferences to a [`Migrator`], so a platform crate's
/// tests pass it where a service passes its own: `TestDb::create("platform",
/// &keel_pg::PLATFORM_MIGRATOR)` is a database with the platform tables only, owned by the
/// platform-only roles `platform_owner` and `platform_app`.
pub static PLATFORM_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(PLATFORM_MIGRATIONS_TABLE);
    migrator
});

/// Applies the platform's migrations, then `service`'s, on `conn` (a direct connection as the
/// service's owner role). Each run takes sqlx's migration lock on the database, so two
/// instances migrating at once apply every migration exactly once.
///
/// Passing [`PLATFORM_MIGRATOR`] itself as `service` applies the platform tables only (its
/// second run finds everything applied).
pub async fn apply(conn: &mut PgConnection, service: &Migrator) -> Result<(), MigrateError> {
    PLATFORM_MIGRATOR.run(&mut *conn).await?;
    service.run(conn).await
}

/// Every migration [`apply`] runs for `service`, platform first: what a cache of migrated
/// databases (keel-testkit's templates) must fingerprint to notice a change in either source.
pub fn migrations(service: &Migrator) -> impl Iterator<Item = &sqlx::migrate::Migration> {
    PLATFORM_MIGRATOR.iter().chain(service.iter())
}
