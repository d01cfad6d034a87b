//! Process-level proofs on the real `checkout` binary: configuration errors exit 78 naming
//! the key (without leaking secrets), and SIGTERM under load drains with zero failed requests
//! (P20).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

#[tokio::test]
async fn sigterm_under_load_fails_no_request_and_finishes_in_flight_work() {
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
    let mut p = ServiceProcess::spawn(BIN, &[], &vars).await;
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
    // Postgres, and prove it is really waiting before the signal is sent.
    let mut locker = PgConnection::connect(&db.admin_url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/v1/products");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
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

    // Load: 8 workers loop on a cheap endpoint through the whole stack, bounded in count and
    // time, recording when each request was sent and whether it succeeded.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = format!("{base}/livez");
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let at = Instant::now();
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
    // Let the load run, then send SIGTERM and record when readiness turned false.
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
    p.signal("TERM");
    let not_ready_at = eventually(Duration::from_secs(5), "readiness turns false", || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 503).then(Instant::now)
    })
    .await;

    // The listener closes after the drain delay: new connections are refused from then on.
    eventually(Duration::from_secs(10), "listener closed", || async {
        tokio::net::TcpStream::connect(p.addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    // Only now release the lock: the slow request was in flight all along and must complete.
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    watcher.close().await;
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request completed"
    );

    let status = p.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "exit 0 after a clean drain, got {status}");

    let mut before = 0;
    let mut failed_before = Vec::new();
    for w in workers {
        for s in w.await.unwrap() {
            if s.at < not_ready_at {
                before += 1;
                if !s.ok {
                    failed_before.push(s.error);
                }
            }
        }
    }
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
    let logs = p.logs().join("\n");
    assert!(logs.contains("draining: readiness is now false"), "{logs}");
    assert!(logs.contains("all in-flight requests finished"), "{logs}");
}
