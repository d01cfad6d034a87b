//! The fault proxy does what tests rely on: forwards bytes both ways, cuts open and new
//! connections, lets them through again after `restore`, and delays by `set_latency`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use keel_testkit::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on port 0; returns its address.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(buf)
}

/// A read on a cut connection ends (EOF or reset) instead of hanging.
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn forwards_cuts_restores_and_delays() {
    let proxy = FaultProxy::start(echo_server().await).await;

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut a, b"hello").await.unwrap(), b"hello");
    assert_eq!(proxy.connections(), 1);

    proxy.cut();
    assert!(is_closed(&mut a).await, "open connection closed by the cut");
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(is_closed(&mut b).await, "new connection closed while cut");
    assert!(proxy.refused() >= 1);

    proxy.restore();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut c, b"again").await.unwrap(), b"again");

    proxy.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(round_trip(&mut c, b"slow").await.unwrap(), b"slow");
    // Delayed once on the way in and once on the way out.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn proxied_url_swaps_only_the_upstream_address() {
    let proxy = FaultProxy::to_amqp().await;
    let port = keel_testkit::Stack::load().amqp_port;
    let url = proxy.proxied_url(&format!("amqp://guest:guest@127.0.0.1:{port}/v"));
    assert_eq!(url, format!("amqp://guest:guest@{}/v", proxy.addr()));
}
