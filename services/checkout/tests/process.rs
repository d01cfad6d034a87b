//! Process-level proofs on the real `checkout` binary: configuration errors exit 78 naming
//! the key (without leaking secrets), and SIGTERM under load drains with zero failed requests
//! (P20), where a stop without a drain (SIGKILL) under the same load fails the request in
//! flight and every request routed to the instance after it.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_testkit::{ServiceProcess, TestDb, eventually};
use sqlx::{Connection, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_checkout");

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_bad_port_exits_78_with_one_line_naming_the_key() {
    let (status, _, stderr) =
        ServiceProcess::run_to_exit(BIN, &[], &env(&[("KEEL_HTTP__PORT", "abc")])).await;
    assert_eq!(status.code(), Some(78), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("http.port") && stderr.contains("KEEL_HTTP__PORT"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unknown_key_exits_78_naming_it() {
    let (status, _, stderr) =
        ServiceProcess::run_to_exit(BIN, &[], &env(&[("KEEL_HTTP__PROT", "9000")])).await;
    assert_eq!(status.code(), Some(78), "stderr: {stderr}");
    assert!(
        stderr.contains("http.prot") && stderr.contains("unknown key"),
        "{stderr}"
    );
}

#[tokio::test]
async fn config_errors_and_logs_never_show_secrets() {
    // An invalid setting next to a database URL with a password: the error names the key only.
    let url = "postgres://checkout_app:sup3r-secret@127.0.0.1:1/keel_checkout";
    let (status, stdout, stderr) = ServiceProcess::run_to_exit(
        BIN,
        &[],
        &env(&[
            ("KEEL_DATABASE__URL", url),
            ("KEEL_DATABASE__MAX_CONNECTIONS", "0"),
        ]),
    )
    .await;
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("database.max_connections"), "{stderr}");
    assert!(!stderr.contains("sup3r-secret") && !stdout.contains("sup3r-secret"));

    // A running service whose database is unreachable logs and answers without the password.
    let mut p = ServiceProcess::spawn(
        BIN,
        &[],
        &env(&[
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_DATABASE__URL", url),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ]),
    )
    .await;
    let body = reqwest::get(format!("{}/readyz", p.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let products = reqwest::get(format!("{}/v1/products", p.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
    let logs = p.logs().join("\n");
    for text in [&body, &products, &logs] {
        assert!(!text.contains("sup3r-secret"), "secret leaked: {text}");
    }
}

/// Outcome of one request of the load loop.
struct Sent {
    at: Instant,
    ok: bool,
    error: String,
}

/// How long the load goes on after the stop signal: the requests load balancers still route
/// to an instance while the endpoint change propagates. Half of the drain delay below, so for
/// Keel the whole window lies inside the time the listener still serves.
const WINDOW: Duration = Duration::from_millis(500);

/// The conditions both stops are measured under: the real binary on its own database, one
/// slow request provably in flight (waiting on a table lock), and 8 workers looping on
/// `GET /livez` through the whole stack.
struct UnderLoad {
    /// Held so the database outlives the process.
    _db: TestDb,
    p: ServiceProcess,
    client: reqwest::Client,
    /// The superuser connection holding `LOCK TABLE products` until `release_lock`.
    locker: PgConnection,
    /// `GET /v1/products`, in flight: its status, or the error that cut it.
    slow: tokio::task::JoinHandle<Result<u16, String>>,
    workers: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
    /// Set at the stop signal: each worker stops `WINDOW` after it.
    until: Arc<OnceLock<Instant>>,
}

impl UnderLoad {
    async fn start() -> Self {
        let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
        let mut vars = db.env();
        vars.extend(env(&[
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "1s"),
            // The slow request waits on a lock for as long as the test needs; the request
            // timeout must not cut it first on a busy machine.
            ("KEEL_HTTP__REQUEST_TIMEOUT", "60s"),
            ("KEEL_SHUTDOWN__GRACE_PERIOD", "60s"),
        ]));
        let p = ServiceProcess::spawn(BIN, &[], &vars).await;
        let base = p.base_url();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        eventually(Duration::from_secs(10), "checkout ready", || async {
            let r = client.get(format!("{base}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;

        // A slow in-flight request: hold a lock on the catalogue so GET /v1/products waits in
        // Postgres, and prove it is really waiting before any signal is sent.
        let mut locker = PgConnection::connect(&db.admin_url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
        sqlx::query("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            .execute(&mut locker)
            .await
            .unwrap();
        let slow = tokio::spawn({
            let client = client.clone();
            let url = format!("{base}/v1/products");
            async move {
                let r = client.get(url).send().await.map_err(|e| e.to_string())?;
                Ok(r.status().as_u16())
            }
        });
        let watcher = sqlx::PgPool::connect(&db.admin_url()).await.unwrap();
        eventually(Duration::from_secs(10), "the slow request waits on the lock", || {
            let w = watcher.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM products%'",
                )
                .fetch_one(&w)
                .await
                .ok()?;
                (n > 0).then_some(())
            }
        })
        .await;
        watcher.close().await;

        // Load: 8 workers loop on a cheap endpoint, bounded in count and ending `WINDOW` after
        // the signal, recording when each request was sent and whether it succeeded.
        let until: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let mut workers = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            let url = format!("{base}/livez");
            let until = until.clone();
            workers.push(tokio::spawn(async move {
                let mut sent = Vec::new();
                for _ in 0..20_000 {
                    let at = Instant::now();
                    if until.get().is_some_and(|u| at >= *u) {
                        break;
                    }
                    let r = client.get(&url).send().await;
                    let ok = matches!(&r, Ok(resp) if resp.status() == 200);
                    let error = match r {
                        Ok(resp) => resp.status().to_string(),
                        Err(e) => e.to_string(),
                    };
                    sent.push(Sent { at, ok, error });
                }
                sent
            }));
        }
        eventually(Duration::from_secs(10), "load is flowing", || async {
            let m = client
                .get(format!("{base}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            m.lines()
                .find(|l| l.starts_with("http_requests_total") && l.contains("/livez"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .filter(|n| *n > 200.0)
        })
        .await;
        Self {
            _db: db,
            p,
            client,
            locker,
            slow,
            workers,
            until,
        }
    }

    /// Sends `signal` to the process; the load goes on for `WINDOW`. Returns when it was sent.
    fn stop_with(&self, signal: &str) -> Instant {
        self.p.signal(signal);
        let at = Instant::now();
        self.until.set(at + WINDOW).unwrap();
        at
    }

    /// Ends the lock, so the slow request can finish (if its server is still there).
    async fn release_lock(&mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.locker)
            .await
            .unwrap();
    }

    /// Every request the workers sent.
    async fn sent(&mut self) -> Vec<Sent> {
        let mut all = Vec::new();
        for w in self.workers.drain(..) {
            all.extend(w.await.unwrap());
        }
        all
    }
}

/// The requests of `sent` within `[from, to)` (from the start if `from` is `None`), and the
/// errors of those that failed.
fn failed_between(sent: &[Sent], from: Option<Instant>, to: Instant) -> (usize, Vec<&str>) {
    let within: Vec<&Sent> = sent
        .iter()
        .filter(|s| from.is_none_or(|f| s.at >= f) && s.at < to)
        .collect();
    let failed = within
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.error.as_str())
        .collect();
    (within.len(), failed)
}

/// The failure side of P20, under the same load as the test below: a stop without a drain.
/// SIGKILL plays it — what a process that installs no SIGTERM handler gets from SIGTERM (the
/// default action ends it at once), or one killed when its grace period runs out.
#[tokio::test]
async fn sigkill_under_load_fails_the_in_flight_request_and_those_routed_after_it() {
    let mut load = UnderLoad::start().await;
    let killed_at = load.stop_with("KILL");
    let status = load.p.wait(Duration::from_secs(10)).await;
    assert!(!status.success(), "killed, not stopped: {status}");
    load.release_lock().await;

    let slow = (&mut load.slow).await.unwrap();
    assert!(slow.is_err(), "the in-flight request was cut: {slow:?}");
    let sent = load.sent().await;
    let (in_flight, cut) = failed_between(&sent, None, killed_at);
    let (routed, refused) = failed_between(&sent, Some(killed_at), killed_at + WINDOW);
    assert!(routed > 0, "the load went on after the kill");
    assert_eq!(
        refused.len(),
        routed,
        "every request routed during the window failed"
    );
    eprintln!(
        "SIGKILL under load: the slow request failed ({}); {} of {in_flight} requests sent \
         before the kill failed; {} of {routed} sent in the {WINDOW:?} after it failed (e.g. {:?})",
        slow.unwrap_err(),
        cut.len(),
        refused.len(),
        refused.first()
    );
}

#[tokio::test]
async fn sigterm_under_load_fails_no_request_and_finishes_in_flight_work() {
    let mut load = UnderLoad::start().await;
    let base = load.p.base_url();
    let client = load.client.clone();
    let term_at = load.stop_with("TERM");
    let not_ready_at = eventually(Duration::from_secs(5), "readiness turns false", || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 503).then(Instant::now)
    })
    .await;

    // The listener closes after the drain delay: new connections are refused from then on.
    let addr = load.p.addr;
    eventually(Duration::from_secs(10), "listener closed", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Only now release the lock: the slow request was in flight all along and must complete.
    load.release_lock().await;
    assert_eq!(
        (&mut load.slow).await.unwrap(),
        Ok(200),
        "the in-flight request completed"
    );

    let status = load.p.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "exit 0 after a clean drain, got {status}");

    let sent = load.sent().await;
    let (before, failed_before) = failed_between(&sent, None, not_ready_at);
    assert!(
        before > 200,
        "the load was real: {before} requests before draining"
    );
    assert!(
        failed_before.is_empty(),
        "{} of {before} failed: {:?}",
        failed_before.len(),
        &failed_before[..failed_before.len().min(5)]
    );
    // The same window after the signal that SIGKILL fails whole: served, all of it.
    let (routed, failed) = failed_between(&sent, Some(term_at), term_at + WINDOW);
    assert!(routed > 0, "the load went on after the signal");
    assert!(
        failed.is_empty(),
        "{} of {routed} sent in the {WINDOW:?} after SIGTERM failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "SIGTERM under load: the slow request completed; 0 of {before} requests sent before \
         readiness turned false failed; 0 of {routed} sent in the {WINDOW:?} after the signal"
    );
    let logs = load.p.logs().join("\n");
    assert!(logs.contains("draining: readiness is now false"), "{logs}");
    assert!(logs.contains("all in-flight requests finished"), "{logs}");
}
