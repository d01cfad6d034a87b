//! P14 checks shared by every service's least-privilege test: the runtime role is confined to
//! DML on its own database. Each check shows the capability with the owner role first, so a
//! denial is the role's doing and not a broken statement.

use sqlx::{Connection, PgConnection};

use crate::{Stack, TestDb};

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

/// Asserts, for `db`'s service: the owner can create a table and the app role cannot; the
/// app role cannot alter it, drop it, or read the migration history; and it cannot connect
/// to any of `other_databases`, directly or through pgbouncer.
pub async fn assert_app_role_is_confined(db: &TestDb, other_databases: &[&str]) {
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::query("CREATE TABLE p14_probe (id int)")
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
