//! The gRPC server's limits (`[grpc]`, `keel_service::GrpcConfig`), on billing: an oversized
//! message is refused before it is decoded, a call without a deadline ends at
//! `grpc.max_deadline`, one connection runs at most `concurrency_limit_per_connection` calls
//! at once, and a peer that stops answering HTTP/2 pings is disconnected.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_contracts::billing_v1 as pb;
use keel_contracts::billing_v1::payment_service_client::PaymentServiceClient;
use keel_contracts::grpc_health_v1::HealthCheckRequest;
use keel_contracts::grpc_health_v1::health_client::HealthClient;
use keel_testkit::eventually;
use support::{Billing, authorize_request, key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

#[tokio::test]
async fn a_message_over_max_decoding_message_size_is_refused_out_of_range_before_it_runs() {
    let b = Billing::start_with(&[("KEEL_GRPC__MAX_DECODING_MESSAGE_SIZE", "2048")]).await;
    let mut big = authorize_request(&key("authorize"), "tok_approve");
    big.payment_token = "x".repeat(4096);
    let err = b.authorize_request(big).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(b.psp.calls("authorize").is_empty(), "nothing ran");

    // The platform's health service has the same limit.
    let mut health = HealthClient::connect(b.grpc_url.clone()).await.unwrap();
    let err = health
        .check(HealthCheckRequest {
            service: "x".repeat(4096),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // A message under the limit is served as usual.
    let p = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    assert_eq!(p.status, pb::PaymentStatus::Authorized as i32);
}

#[tokio::test]
async fn a_call_without_a_deadline_ends_at_max_deadline() {
    let b = Billing::start_with(&[("KEEL_GRPC__MAX_DEADLINE", "1s")]).await;
    let started = Instant::now();
    // tok_slow answers after 3 s; the caller sets no deadline at all.
    let err = b
        .authorize(&key("authorize"), "tok_slow")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn one_connection_runs_at_most_concurrency_limit_per_connection_calls() {
    let b = Billing::start_with(&[("KEEL_GRPC__CONCURRENCY_LIMIT_PER_CONNECTION", "1")]).await;
    // One slow call holds the connection's only slot (tok_slow: 3 s at the provider).
    let slow = {
        let mut client = b.grpc.clone();
        tokio::spawn(async move {
            client
                .authorize(authorize_request(&key("authorize"), "tok_slow"))
                .await
        })
    };
    eventually(
        Duration::from_secs(5),
        "slow call at the provider",
        || async { (!b.psp.calls("authorize").is_empty()).then_some(()) },
    )
    .await;
    let get = |mut client: PaymentServiceClient<_>| async move {
        client
            .get_payment(pb::GetPaymentRequest {
                payment_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
    };

    // The same connection: the call waits for the slot.
    let queued = tokio::spawn(get(b.grpc.clone()));
    // Another connection: answered at once.
    let other = PaymentServiceClient::connect(b.grpc_url.clone())
        .await
        .unwrap();
    let started = Instant::now();
    let err = get(other).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        !queued.is_finished(),
        "the call on the busy connection waits"
    );

    // Once the slow call is done, the queued one runs.
    slow.await.unwrap().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Opens a TCP connection to `addr`, speaks the HTTP/2 preface and an empty SETTINGS frame,
/// then never writes again (no PING is ever acknowledged); returns how long until the server
/// closed it, or `None` if it was still open after `patience`.
async fn silent_http2_peer(addr: SocketAddr, patience: Duration) -> Option<Duration> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A SETTINGS frame: length 0, type 4, no flags, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = async {
        // Reads what the server sends (its SETTINGS, pings) until it closes the connection.
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(patience, closed).await.ok()
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected_and_without_keepalive_it_is_not() {
    // Naive: a tonic server as built by default (no keepalive) keeps the silent peer forever.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let naive_addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let naive = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let b = Billing::start_with(&[
        ("KEEL_GRPC__HTTP2_KEEPALIVE_INTERVAL", "200ms"),
        ("KEEL_GRPC__HTTP2_KEEPALIVE_TIMEOUT", "200ms"),
    ])
    .await;
    let keel_addr: SocketAddr = b.grpc_url.trim_start_matches("http://").parse().unwrap();

    let (naive_closed, keel_closed) = tokio::join!(
        silent_http2_peer(naive_addr, Duration::from_secs(3)),
        silent_http2_peer(keel_addr, Duration::from_secs(3)),
    );
    assert_eq!(naive_closed, None, "without keepalive the connection stays");
    let keel_closed = keel_closed.expect("billing closes the silent peer's connection");
    assert!(
        keel_closed < Duration::from_secs(2),
        "closed after {keel_closed:?} (ping every 200 ms, 200 ms to answer)"
    );
    naive.abort();
}

#[test]
fn every_limit_has_a_default_and_a_bad_value_is_refused_naming_its_key() {
    // billing's file names every limit; a service that names none gets the platform's.
    let bare: String = billing::DEFAULT_CONFIG
        .defaults
        .lines()
        .filter(|l| {
            ![
                "concurrency_limit_per_connection",
                "max_decoding_message_size",
                "max_encoding_message_size",
                "http2_keepalive_",
                "health_interval",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bare = keel_config::Embedded::new(bare.leak(), billing::DEFAULT_CONFIG.dev);
    let config: billing::Config = keel_testkit::config(bare, &[]);
    let grpc = &config.grpc;
    assert_eq!(grpc.concurrency_limit_per_connection, 32);
    assert_eq!(grpc.max_decoding_message_size, 1024 * 1024);
    assert_eq!(grpc.max_encoding_message_size, 1024 * 1024);
    assert_eq!(grpc.http2_keepalive_interval, Duration::from_secs(30));
    assert_eq!(grpc.http2_keepalive_timeout, Duration::from_secs(10));
    assert_eq!(grpc.health_interval, Duration::from_secs(1));

    for (var, key) in [
        (
            "KEEL_GRPC__CONCURRENCY_LIMIT_PER_CONNECTION",
            "grpc.concurrency_limit_per_connection",
        ),
        (
            "KEEL_GRPC__MAX_DECODING_MESSAGE_SIZE",
            "grpc.max_decoding_message_size",
        ),
        (
            "KEEL_GRPC__MAX_ENCODING_MESSAGE_SIZE",
            "grpc.max_encoding_message_size",
        ),
    ] {
        let e = keel_config::load_from::<billing::Config, _>(
            billing::DEFAULT_CONFIG,
            [("KEEL_PROFILE", "dev"), (var, "0")].map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(key), "{var}=0: {e}");
    }
}
