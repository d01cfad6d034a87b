//! What skeleton's tests share: a database and a vhost per test, the service started
//! in-process on port 0 (or as the real binary), and a direct broker connection to publish as
//! another service's relay would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_testkit::{TestDb, TestVhost};
use skeleton::{App, Config};
use sqlx::{Connection as _, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any condition in these tests may take to become true.
pub const WAIT: Duration = Duration::from_secs(20);

/// The service's queue, as in `config/default.toml`.
pub const QUEUE: &str = "skeleton.events";

/// A fresh database with the platform's tables and skeleton's, owned by skeleton's roles.
pub async fn database() -> TestDb {
    TestDb::create(skeleton::NAME, &skeleton::MIGRATOR).await
}

/// `KEEL_*` settings pointing the service at this test's database and vhost, on port 0, with
/// short backoffs so recoveries happen within a test's patience.
pub fn env(db: &TestDb, vhost: &TestVhost) -> Vec<(String, String)> {
    let mut vars = db.env();
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0".to_owned()),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s".to_owned()),
        ("KEEL_AMQP__URL", vhost.url()),
        ("KEEL_AMQP__MAX_BACKOFF", "200ms".to_owned()),
        ("KEEL_CONSUMER__RETRY_MAX_BACKOFF", "200ms".to_owned()),
        ("KEEL_RELAY__POLL_INTERVAL", "20ms".to_owned()),
        ("KEEL_RELAY__MAX_BACKOFF", "200ms".to_owned()),
    ] {
        vars.push((k.to_owned(), v));
    }
    vars
}

/// The service, running in this test's runtime until [`Running::stop`].
pub struct Running {
    pub base: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Builds the `App` from the defaults and `vars`, exactly as the binary would from its
    /// environment, and runs it.
    pub async fn start(vars: &[(String, String)]) -> Self {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let config: Config = keel_testkit::config(skeleton::DEFAULT_CONFIG, &vars);
        let app = App::build(config).await.unwrap();
        let base = format!("http://{}", app.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            base,
            shutdown: Some(tx),
            task,
        }
    }

    /// Graceful shutdown, waited for.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("service stops in time")
            .unwrap();
    }
}

/// One number from the test's database, read as the superuser (assertions only).
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut conn = PgConnection::connect(&db.admin_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    n
}

/// Messages of `queue` this process settled with `outcome` (the consumer's P06 counter).
pub fn settled(queue: &str, outcome: &str) -> u64 {
    let prefix = format!("amqp_messages_total{{queue=\"{queue}\",outcome=\"{outcome}\"}} ");
    keel_telemetry::metrics_handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}
