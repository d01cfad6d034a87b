//! billing's skeleton: HTTP health on its own port and `grpc.health.v1` on the gRPC port,
//! answering from one readiness state — SERVING while ready, NOT_SERVING once draining.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use billing::{App, Config};
use keel_contracts::grpc_health_v1::HealthCheckRequest;
use keel_contracts::grpc_health_v1::health_check_response::ServingStatus;
use keel_contracts::grpc_health_v1::health_client::HealthClient;
use keel_testkit::{TestDb, eventually};

#[tokio::test]
async fn grpc_health_serves_while_ready_and_stops_serving_while_draining() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = keel_testkit::TestVhost::create().await;
    let config: Config = keel_testkit::config(
        billing::DEFAULT_CONFIG,
        &[
            ("KEEL_AMQP__URL", &vhost.url()),
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_GRPC__PORT", "0"),
            ("KEEL_DATABASE__URL", &db.app_url()),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "2s"),
        ],
    );
    let app = App::build(config).await.unwrap();
    let http = format!("http://{}", app.local_addr());
    let grpc = format!("http://{}", app.grpc_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));

    let client = reqwest::Client::new();
    eventually(Duration::from_secs(10), "billing /readyz", || async {
        let r = client.get(format!("{http}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let mut health = HealthClient::connect(grpc.clone()).await.unwrap();
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    // `/readyz` said ready and handed its answer to the gRPC health reporter, which sets the
    // status in its own task: wait (bounded) until Check sees it.
    eventually(Duration::from_secs(10), "gRPC SERVING once ready", || {
        let mut h = health.clone();
        async move {
            let s = h.check(check("")).await.ok()?.into_inner().status;
            (s == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    let status = health
        .check(check("billing"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let err = health.check(check("nope")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Shutdown begins: during the drain delay gRPC still answers, but NOT_SERVING.
    stop.send(()).unwrap();
    eventually(
        Duration::from_secs(2),
        "gRPC NOT_SERVING while draining",
        || {
            let mut h = health.clone();
            async move {
                let s = h.check(check("")).await.ok()?.into_inner().status;
                (s == ServingStatus::NotServing as i32).then_some(())
            }
        },
    )
    .await;
    let drained = running.await.unwrap().unwrap();
    assert_eq!(drained, keel_service::Drained::Clean);
}

#[tokio::test]
async fn billing_binary_stops_cleanly_on_sigterm() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let vhost = keel_testkit::TestVhost::create().await;
    let mut vars = db.env();
    vars.push(("KEEL_AMQP__URL".to_owned(), vhost.url()));
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_GRPC__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
    ] {
        vars.push((k.to_owned(), v.to_owned()));
    }
    let mut p =
        keel_testkit::ServiceProcess::spawn(env!("CARGO_BIN_EXE_billing"), &[], &vars).await;
    let base = p.base_url();
    eventually(Duration::from_secs(10), "billing ready", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
}
