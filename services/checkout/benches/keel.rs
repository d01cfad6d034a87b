//! `make bench`: Keel's figures against baselines measured in the same run, written to
//! `target/bench/report.json` (`{"rows": [{name, unit, keel, baseline, ratio, goal, met}]}`).
//!
//! Rows:
//! - `products_rps`: `GET /v1/products` requests/s through the full keel-http stack ÷ a bare
//!   axum handler running the same query with the same pool settings. Both are release
//!   processes with their normal logging (checkout writes a JSON line per request; the bare
//!   server writes none) to /dev/null, so Keel pays for everything it does in production.
//!   Load from `wrk` (a separate process, on loopback, bounded in time), alternating the two
//!   servers so machine noise hits both alike. Goal ≥ 0.9: the stack, its metrics and its
//!   per-request log line may cost a tenth of the bare server's rate.
//! - `idle_rss_<service>`: resident memory of each release binary after start-up, one
//!   readiness probe and one request, against the bare axum example process measured the
//!   same way. Goal ≤ 15 MB. Each service's line in the output splits it into anonymous memory
//!   (heap, stacks) and file-backed pages (the binary's code and data as far as touched) and
//!   counts its threads: docs/benchmarks.md says where the rest goes.
//!
//! Postgres runs with production durability (`keel_testkit::bench::ProductionDurability`);
//! the report records what the bench's sessions saw.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_literal)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keel_testkit::bench::{Durability, ProductionDurability, Row, round};
use keel_testkit::{ServiceProcess, Stack, TestDb};

const WRK_SECONDS: u32 = 4;
/// Pairs of (Keel, bare) runs. On 2 cores, wrk, the server, pgbouncer and Postgres share the
/// CPUs and single runs vary by ±15 %; the ratio reported is the median of the per-pair
/// ratios, each pair run back to back, so slow phases of the machine hit both sides alike.
const ROUNDS: usize = 7;
/// Goal for each service's idle resident memory.
const IDLE_RSS_MAX_MB: f64 = 15.0;

fn wrk_rps(url: &str) -> f64 {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c32",
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk is installed (make bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let non_2xx = text.lines().any(|l| l.contains("Non-2xx"));
    assert!(!non_2xx, "errors during the run:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A release binary with its output discarded, killed when dropped.
struct Quiet(std::process::Child);

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn quiet_process(bin: &str, env: &[(&str, String)]) -> Quiet {
    let mut cmd = Command::new(release_bin(bin));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    // Its checked-in development secrets, as `make dev` and ServiceProcess run it.
    cmd.env("KEEL_PROFILE", "dev");
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Quiet(cmd.spawn().unwrap())
}

/// A `kB` figure of a `/proc/<pid>/{status,smaps_rollup}` file, in MB.
fn proc_mb(text: &str, field: &str) -> f64 {
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{text}"));
    kb / 1024.0
}

/// Resident memory of `pid` in MB, printed with its split: anonymous (heap, thread stacks)
/// against file-backed (the binary's pages), and the thread count.
fn rss_mb(what: &str, pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let rss = proc_mb(&status, "VmRSS:");
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map_or("?", str::trim);
    println!(
        "{what}: rss {rss:.1} MB = anonymous {:.1} + file {:.1}; {threads} threads",
        proc_mb(&rollup, "Anonymous:"),
        proc_mb(&status, "RssFile:"),
    );
    rss
}

fn release_bin(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release");
    let p = root.join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --release --bins --examples`",
        p.display()
    );
    p
}

async fn idle_rss(bin: &str, env: Vec<(String, String)>) -> f64 {
    let path = release_bin(bin);
    let mut p = ServiceProcess::spawn(path.to_str().unwrap(), &[], &env).await;
    // One readiness probe (or any request), so lazily-built state is counted.
    let _ = reqwest::get(format!("{}/readyz", p.base_url())).await;
    let _ = reqwest::get(format!("{}/v1/products", p.base_url())).await;
    let rss = rss_mb(bin, p.pid());
    p.signal("KILL");
    let _ = p.wait(Duration::from_secs(10)).await;
    rss
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _durable = ProductionDurability::ensure().await;
    let mut rows = Vec::new();
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let durability = Durability::require(&db.app_url()).await;

    // --- products_rps ------------------------------------------------------------------
    let keel_port = free_port();
    let bare_port = free_port();
    let keel_url = format!("http://127.0.0.1:{keel_port}/v1/products");
    let bare_url = format!("http://127.0.0.1:{bare_port}/v1/products");
    let _keel = quiet_process(
        "checkout",
        &[
            ("KEEL_HTTP__PORT", keel_port.to_string()),
            ("KEEL_DATABASE__URL", db.app_url()),
        ],
    );
    let _bare = quiet_process(
        "examples/bare_axum",
        &[
            ("BIND", format!("127.0.0.1:{bare_port}")),
            ("DATABASE_URL", db.app_url()),
        ],
    );
    for url in [&keel_url, &bare_url] {
        keel_testkit::eventually(Duration::from_secs(20), "bench server up", || async {
            let r = reqwest::get(url.as_str()).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    // Warm both (pool connections, prepared statements) before measuring.
    for url in [&keel_url, &bare_url] {
        for _ in 0..50 {
            assert!(
                reqwest::get(url.as_str())
                    .await
                    .unwrap()
                    .status()
                    .is_success()
            );
        }
    }
    let (mut keel, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let k = keel_url.clone();
        keel.push(
            tokio::task::spawn_blocking(move || wrk_rps(&k))
                .await
                .unwrap(),
        );
        let b = bare_url.clone();
        bare.push(
            tokio::task::spawn_blocking(move || wrk_rps(&b))
                .await
                .unwrap(),
        );
    }
    rows.push(keel_testkit::bench::paired_ratio_row(
        "products_rps",
        "requests/s",
        &keel,
        &bare,
        Some(0.9),
    ));

    // --- idle_rss_* ----------------------------------------------------------------------
    let stack = Stack::load();
    let pg = |svc: &str| {
        (
            "KEEL_DATABASE__URL".to_owned(),
            format!(
                "postgres://{svc}_app:{svc}_app_dev@127.0.0.1:{}/keel_{svc}",
                stack.pgbouncer_port
            ),
        )
    };
    // Each service as it runs by default (its own log level), on a port of its own.
    let common = |extra: Vec<(String, String)>| {
        let mut v = vec![("KEEL_HTTP__PORT".to_owned(), "0".to_owned())];
        v.extend(extra);
        v
    };
    let baseline = idle_rss(
        "examples/bare_axum",
        vec![("DATABASE_URL".to_owned(), db.app_url())],
    )
    .await;
    let services: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "checkout",
            common(vec![("KEEL_DATABASE__URL".to_owned(), db.app_url())]),
        ),
        (
            "billing",
            common(vec![
                pg("billing"),
                ("KEEL_GRPC__PORT".to_owned(), "0".to_owned()),
            ]),
        ),
        (
            "notification",
            common(vec![
                pg("notification"),
                (
                    "KEEL_AMQP__URL".to_owned(),
                    format!("amqp://guest:guest@127.0.0.1:{}/keel", stack.amqp_port),
                ),
            ]),
        ),
        (
            "psp-sim",
            common(vec![("KEEL_ADMIN__PORT".to_owned(), "0".to_owned())]),
        ),
    ];
    for (svc, env) in services {
        let rss = idle_rss(svc, env).await;
        rows.push(Row::at_most(
            &format!("idle_rss_{svc}"),
            "MB",
            round(rss, 1),
            round(baseline, 1),
            IDLE_RSS_MAX_MB,
        ));
    }

    keel_testkit::bench::record(&rows, &durability);
}
