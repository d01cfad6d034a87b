//! The `/admin` routes (fault knobs, webhook replay) live on a listener of their own, loopback
//! by default: whoever can reach the card API cannot make it fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::start;
use keel_testkit::{ServiceProcess, eventually};
use serde_json::{Value, json};

#[tokio::test]
async fn the_public_listener_answers_404_for_every_admin_route() {
    let sim = start(&[]).await;
    let public = |path: &str| sim.public_url(path);

    for (method, path) in [
        (reqwest::Method::GET, "/admin/faults"),
        (reqwest::Method::PUT, "/admin/faults"),
        (reqwest::Method::GET, "/admin/webhooks"),
        (reqwest::Method::POST, "/admin/webhooks/msg_x/redeliver"),
    ] {
        let r = sim
            .client
            .request(method.clone(), public(path))
            .json(&json!({"error_rate": 1.0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method} {path} on the public listener");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(
            problem["status"], 404,
            "a problem document like any unknown path"
        );
    }
    // The PUT above reached nothing: the card API still approves.
    sim.authorized("tok_approve").await;
    assert_eq!(
        sim.get_json("/admin/faults").await,
        json!({"latency_ms": 0, "error_rate": 0.0})
    );
}

#[tokio::test]
async fn the_admin_listener_serves_the_knobs_and_not_the_card_api() {
    let sim = start(&[]).await;
    assert_ne!(sim.admin, sim.base);

    let r = sim
        .client
        .put(format!("{}/admin/faults", sim.admin))
        .json(&json!({"error_rate": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = sim
        .post(
            "/v1/authorizations",
            Some("k-1"),
            Some(&common::authorize_body("tok_approve")),
        )
        .await;
    assert_eq!(r.status(), 503, "the knob set on the admin port applies");
    let r = sim
        .client
        .get(format!("{}/admin/webhooks", sim.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = sim
        .client
        .get(format!("{}/v1/authorizations/auth_x", sim.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the card API is not on the admin listener");
}

#[test]
fn the_admin_listener_binds_loopback_by_default_and_never_the_public_port() {
    let config: psp_sim::Config = keel_testkit::config(psp_sim::DEFAULT_CONFIG, &[]);
    assert!(config.admin.host.is_loopback(), "{:?}", config.admin.host);
    assert_ne!(config.admin.port, config.http.port);

    let e = keel_config::load_from::<psp_sim::Config, _>(
        psp_sim::DEFAULT_CONFIG,
        [("KEEL_PROFILE", "dev"), ("KEEL_ADMIN__PORT", "8090")]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("admin.port"), "{e}");
}

#[tokio::test]
async fn the_binary_logs_both_addresses_and_its_admin_listener_is_loopback_on_port_0() {
    let vars: Vec<(String, String)> = [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_ADMIN__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let mut p = ServiceProcess::spawn(env!("CARGO_BIN_EXE_psp-sim"), &[], &vars).await;
    let admin: SocketAddr = eventually(Duration::from_secs(10), "admin_addr logged", || {
        let logs = p.logs();
        async move {
            logs.iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "listening")
                    .then(|| v["admin_addr"].as_str()?.parse().ok())
                    .flatten()
            })
        }
    })
    .await;
    assert!(admin.ip().is_loopback(), "{admin}");
    assert_ne!(admin, p.addr);

    let r = reqwest::get(format!("http://{admin}/admin/faults"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("{}/admin/faults", p.base_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
}
