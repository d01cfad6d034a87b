//! psp-sim's skeleton: answers on its port with the Keel stack and stops cleanly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_testkit::{ServiceProcess, eventually};

#[tokio::test]
async fn psp_sim_answers_and_stops_cleanly_on_sigint() {
    let vars = vec![
        ("KEEL_HTTP__PORT".to_owned(), "0".to_owned()),
        ("KEEL_ADMIN__PORT".to_owned(), "0".to_owned()),
        ("KEEL_SHUTDOWN__DRAIN_DELAY".to_owned(), "0s".to_owned()),
    ];
    let mut p = ServiceProcess::spawn(env!("CARGO_BIN_EXE_psp-sim"), &[], &vars).await;
    let base = p.base_url();
    eventually(Duration::from_secs(10), "psp-sim ready", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("http_requests_total"), "{metrics}");
    assert!(
        metrics.contains("runtime_scheduler_lag_seconds"),
        "{metrics}"
    );
    p.signal("INT");
    assert!(p.wait(Duration::from_secs(10)).await.success());
    assert!(p.logs().iter().any(|l| l.contains("\"signal\":\"SIGINT\"")));
}
