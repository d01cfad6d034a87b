//! P07: service instances share a small, fixed server pool through pgbouncer in transaction
//! mode, with sqlx's prepared statements working (pgbouncer ≥ 1.21, `max_prepared_statements`).
//!
//! The cost first: the same client connections made directly cost one Postgres backend each,
//! and a transaction pooler that does not track prepared statements (pgbouncer < 1.21, or
//! `max_prepared_statements = 0`) breaks sqlx. Then the pattern: through Keel's pgbouncer the
//! clients never take more than `max_db_connections`, and every transaction succeeds.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keel_testkit::{Stack, TestDb};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Three "instances" of checkout, each with a pool of 15.
const INSTANCES: usize = 3;
const POOL: u32 = 15;

/// A setting of the pgbouncer actually serving the stack's port, read from its admin console
/// (`SHOW CONFIG`) — not from a config file, which may belong to another checkout's instance.
fn pgbouncer_setting(name: &str) -> i64 {
    let stack = Stack::load();
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "pgbouncer",
        ])
        .args(["-p", &stack.pgbouncer_port.to_string(), "-c", "SHOW CONFIG"])
        // The development admin password, from the generated pgbouncer auth file.
        .env("PGPASSWORD", "postgres")
        .output()
        .expect("psql is installed (the dev stack needs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SHOW CONFIG failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| {
            l.split('|')
                .collect::<Vec<_>>()
                .get(..2)
                .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
        })
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in pgbouncer's SHOW CONFIG"))
}

async fn server_connections(admin: &PgPool, db: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = 'checkout_app'",
    )
    .bind(db)
    .fetch_one(admin)
    .await
    .unwrap()
}

async fn pools(url: &str) -> Vec<PgPool> {
    let mut pools = Vec::new();
    for _ in 0..INSTANCES {
        pools.push(
            PgPoolOptions::new()
                .max_connections(POOL)
                .acquire_timeout(Duration::from_secs(30))
                .connect(url)
                .await
                .unwrap(),
        );
    }
    pools
}

/// Runs `per_conn` transactions on every client connection at once, each with a prepared,
/// parameterised statement and a short sleep so transactions overlap. Returns the errors.
async fn hammer(pools: &[PgPool], admin: &PgPool, db: &str, peak: &Arc<AtomicI64>) -> Vec<String> {
    let sampler = {
        let (admin, db, peak) = (admin.clone(), db.to_owned(), peak.clone());
        tokio::spawn(async move {
            for _ in 0..2_000 {
                let n = server_connections(&admin, &db).await;
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for pool in pools {
        for worker in 0..POOL {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                for i in 0..20_i64 {
                    let r = async {
                        let mut tx = pool.begin().await?;
                        let _: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM products WHERE price_minor > $1",
                        )
                        .bind(i + i64::from(worker))
                        .fetch_one(&mut *tx)
                        .await?;
                        sqlx::query("SELECT pg_sleep(0.005)")
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await
                    }
                    .await;
                    if let Err(e) = r {
                        errors.push(e.to_string());
                    }
                }
                errors
            }));
        }
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    sampler.abort();
    errors
}

#[tokio::test]
async fn sizing_rule_holds_for_the_configured_pools() {
    let stack = Stack::load();
    let admin = PgPool::connect(&stack.admin_url("postgres")).await.unwrap();
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&admin)
        .await
        .unwrap();
    let reserved: String = sqlx::query_scalar("SHOW superuser_reserved_connections")
        .fetch_one(&admin)
        .await
        .unwrap();
    let (max, reserved): (i64, i64) = (max.parse().unwrap(), reserved.parse().unwrap());
    let per_db = pgbouncer_setting("max_db_connections");
    let services = 3;
    let direct_reserve = 10; // migrations, session features, operators (docs/patterns/p07)
    let needed = services * per_db + direct_reserve + reserved;
    assert!(
        needed <= max,
        "sizing rule broken: {services} × {per_db} + {direct_reserve} + {reserved} = {needed} > max_connections {max}"
    );
    assert!(
        pgbouncer_setting("max_prepared_statements") > 0,
        "sqlx needs prepared statements"
    );
}

#[tokio::test]
async fn many_client_connections_share_a_bounded_server_pool() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let admin = PgPool::connect(&db.admin_url()).await.unwrap();
    let clients = INSTANCES as i64 * i64::from(POOL);
    let cap = pgbouncer_setting("max_db_connections");
    assert!(
        clients > cap,
        "the test needs more clients ({clients}) than the cap ({cap})"
    );

    // The cost: directly, every client connection is a Postgres backend.
    let direct = pools(&db.app_direct_url()).await;
    let held: Vec<_> = futures(
        direct
            .iter()
            .flat_map(|p| (0..POOL).map(move |_| p.acquire())),
    )
    .await;
    assert_eq!(server_connections(&admin, &db.name).await, clients);
    drop(held);
    for p in direct {
        p.close().await;
    }

    // The pattern: the same clients through pgbouncer, all busy at once, never hold more
    // than `max_db_connections` server connections — and every transaction succeeds,
    // prepared statements included.
    let pooled = pools(&db.app_url()).await;
    let peak = Arc::new(AtomicI64::new(0));
    let errors = hammer(&pooled, &admin, &db.name, &peak).await;
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        errors.is_empty(),
        "{} failed, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert!(peak > 0, "the sampler saw the load");
    assert!(
        peak <= cap,
        "{peak} server connections for {clients} clients; cap is {cap}"
    );
    for p in pooled {
        p.close().await;
    }
}

async fn futures<F, T, E>(iter: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let mut out = Vec::new();
    for f in iter {
        out.push(f.await.unwrap());
    }
    out
}

/// A throw-away pgbouncer like Keel's but with `max_prepared_statements = 0` (what 1.18 and
/// earlier do), on a free loopback port. Killed on drop.
struct UntrackedPgbouncer {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl UntrackedPgbouncer {
    async fn start() -> Self {
        let stack = Stack::load();
        // The copy under the stack's runtime directory (outside the repository), which the
        // `postgres` user can reach even when the clone lives under a private home.
        let root = keel_testkit::workspace_root();
        let runtime = std::fs::read_to_string(root.join(".keel/runtime-dir"))
            .map(|d| std::path::PathBuf::from(d.trim()))
            .unwrap_or_else(|_| root.join(".keel"));
        let bin = runtime.join("bin/pgbouncer");
        assert!(
            bin.exists(),
            "{} missing (make test builds it)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("keel-pgbouncer-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("userlist.txt"), "\"checkout_app\" \"\"\n").unwrap();
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\npool_mode = transaction\n\
             max_prepared_statements = 0\nignore_startup_parameters = extra_float_digits,search_path\n\
             auth_type = trust\nauth_file = {dir}/userlist.txt\ndefault_pool_size = 5\n\
             server_tls_sslmode = disable\nlogfile = {dir}/pgbouncer.log\n",
            pg = stack.pg_port,
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        // pgbouncer refuses to run as root; as root (CI, `make test`), run it as `postgres`.
        // The ids are set on the process itself (not through `runuser`, which forks), so the
        // child we hold is pgbouncer and kill-on-drop really stops it.
        let id = |args: &[&str]| -> u32 {
            let out = std::process::Command::new("id")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let mut cmd = tokio::process::Command::new(&bin);
        if id(&["-u"]) == 0 {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
            cmd.uid(id(&["-u", "postgres"]))
                .gid(id(&["-g", "postgres"]));
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        keel_testkit::eventually(
            Duration::from_secs(10),
            "test pgbouncer listening",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Self { child, dir, port }
    }
}

impl Drop for UntrackedPgbouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn transaction_pooling_without_prepared_statement_tracking_breaks_sqlx() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let admin = PgPool::connect(&db.admin_url()).await.unwrap();
    let old = UntrackedPgbouncer::start().await;
    let url = format!("postgres://checkout_app@127.0.0.1:{}/{}", old.port, db.name);
    let pooled = pools(&url).await;
    let errors = hammer(&pooled, &admin, &db.name, &Arc::new(AtomicI64::new(0))).await;
    for p in pooled {
        p.close().await;
    }
    // The failure Keel's configuration removes (see the test above, same load, zero errors).
    assert!(
        errors.iter().any(|e| e.contains("prepared statement")),
        "expected prepared-statement errors, got {} errors: {:?}",
        errors.len(),
        errors.first()
    );
    eprintln!(
        "without max_prepared_statements: {} of {} transactions failed",
        errors.len(),
        INSTANCES * POOL as usize * 20
    );
}
