//! P28: a blocked async runtime flips readiness while the process stays "up".
//!
//! One worker thread, so a handler that blocks it (here `std::thread::sleep`, standing in for
//! a synchronous DNS lookup or a CPU loop) stalls every task on the runtime — including the
//! lag probe, which measures exactly that stall when it finally runs.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_http::Health;
use keel_telemetry::LagMonitor;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocked_runtime_shows_as_lag_and_fails_readiness() {
    let stop = CancellationToken::new();
    let lag = LagMonitor::spawn(Duration::from_millis(20), stop.clone());
    let health = Health::new(Duration::from_secs(1));
    health.watch_runtime_lag(lag.clone(), Duration::from_millis(200));

    // Healthy first: the probe wakes on time.
    keel_testkit_free_eventually(|| async { health.ready().await.ready }).await;
    assert!(
        lag.current() < Duration::from_millis(200),
        "{:?}",
        lag.current()
    );

    // Block the only worker for 600 ms, as a synchronous call inside a handler would.
    tokio::spawn(async { std::thread::sleep(Duration::from_millis(600)) })
        .await
        .unwrap();
    // The probe records the stall at its first wake-up after it.
    keel_testkit_free_eventually(|| async { !health.ready().await.ready }).await;
    let r = health.ready().await;
    assert!(!r.ready, "{r:?}");
    assert!(r.checks["runtime"].starts_with("scheduler lag"), "{r:?}");
    assert!(
        lag.recent_max() >= Duration::from_millis(400),
        "{:?}",
        lag.recent_max()
    );

    // And it recovers by itself once the stall has left the window (50 × 20 ms).
    keel_testkit_free_eventually(|| async { health.ready().await.ready }).await;
    stop.cancel();
}

/// keel-http cannot depend on keel-testkit (which depends on nothing of ours, but keeping the
/// platform crates' dev-dependencies minimal keeps their builds small): a bounded poll.
async fn keel_testkit_free_eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 4 s");
}
