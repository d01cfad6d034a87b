//! The webhook client's SSRF guard and bounds, each shown against a real socket: forbidden
//! destinations are refused before any connection (a listener on 127.0.0.1 counts the
//! connections it gets, and stays at 0), the allow-list lets them through (and the same
//! listener then counts 1, so the counter is live), a name is held to the addresses the
//! guarded resolver approved, a trickling body is cut, a silent server times out, and a
//! redirect is not followed.
//!
//! Every server here is a tokio listener on 127.0.0.1:0; nothing connects anywhere else (the
//! forbidden ranges are checked on IP literals, which need no network).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, StatusCode};
use keel_http::client::{
    Cidr, DeliveryError, DeliveryLimits, EgressError, EgressPolicy, Stage, WebhookClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use url::{Host, Url};

// ---------------------------------------------------------------------------------------------
// Harness

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn loopback_allowed() -> EgressPolicy {
    EgressPolicy::allowing(["127.0.0.0/8".parse::<Cidr>().unwrap()])
}

fn limits() -> DeliveryLimits {
    DeliveryLimits {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(10),
        body_limit_bytes: 1024,
    }
}

fn client(policy: EgressPolicy, limits: DeliveryLimits) -> WebhookClient {
    // The process's crypto provider, as keel_service installs it at start-up.
    let _ = rustls::crypto::ring::default_provider().install_default();
    WebhookClient::new(policy, limits).unwrap()
}

/// A TCP server on 127.0.0.1:0 that counts the connections it accepts and hands each to
/// `handle`. Dropping it stops the server and every connection.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start<F, Fut>(handle: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            // Owned here, so aborting the accept loop drops (aborts) every connection too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                connections.spawn(handle(stream));
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// A server answering every request with `status`, `extra_headers` and `body`.
    async fn answering(status: u16, extra_headers: &str, body: &'static str) -> Self {
        let extra = extra_headers.to_owned();
        Self::start(move |mut stream| {
            let extra = extra.clone();
            async move {
                read_request(&mut stream).await;
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            }
        })
        .await
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn url(&self, path: &str) -> Url {
        url(&format!("http://{}{path}", self.addr))
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and `content-length` body, at most 64 KiB) and returns it as
/// text.
async fn read_request(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < 64 * 1024 {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                break;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Polls `condition` until it holds or `within` has passed; waits for a condition, never for
/// a fixed time.
async fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

fn assert_forbidden(result: Result<impl std::fmt::Debug, DeliveryError>, expected: IpAddr) {
    match result {
        Err(DeliveryError::Forbidden { addr, .. }) => assert_eq!(addr, expected),
        other => panic!("expected Forbidden({expected}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Registration: check_url

/// Every forbidden range, in every spelling the `url` crate accepts for it. Each host is an IP
/// literal, so the check needs no DNS and nothing is contacted.
const FORBIDDEN: &[(&str, &str)] = &[
    // IPv4, one address per range
    ("http://0.0.0.0/", "0.0.0.0"),
    ("http://0.1.2.3/", "0.1.2.3"),
    ("http://127.0.0.1/", "127.0.0.1"),
    ("http://127.255.255.254/", "127.255.255.254"),
    ("http://10.0.0.1/", "10.0.0.1"),
    ("http://172.16.0.1/", "172.16.0.1"),
    ("http://172.31.255.255/", "172.31.255.255"),
    ("http://192.168.1.1/", "192.168.1.1"),
    (
        "http://169.254.169.254/latest/meta-data/",
        "169.254.169.254",
    ),
    ("http://169.254.0.1/", "169.254.0.1"),
    ("http://100.64.0.1/", "100.64.0.1"),
    ("http://100.127.255.255/", "100.127.255.255"),
    ("http://192.0.0.170/", "192.0.0.170"),
    ("http://192.0.2.1/", "192.0.2.1"),
    ("http://198.51.100.7/", "198.51.100.7"),
    ("http://203.0.113.9/", "203.0.113.9"),
    ("http://198.18.0.1/", "198.18.0.1"),
    ("http://192.88.99.1/", "192.88.99.1"),
    ("http://224.0.0.1/", "224.0.0.1"),
    ("http://239.255.255.250/", "239.255.255.250"),
    ("http://240.0.0.1/", "240.0.0.1"),
    ("http://255.255.255.255/", "255.255.255.255"),
    // IPv4 spelled as the WHATWG URL standard allows: decimal, hex, octal, short forms
    ("http://2130706433/", "127.0.0.1"),
    ("http://0x7f000001/", "127.0.0.1"),
    ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://2852039166/", "169.254.169.254"),
    ("http://0xA9.0xFE.0xA9.0xFE/", "169.254.169.254"),
    ("http://0/", "0.0.0.0"),
    // IPv6
    ("http://[::]/", "::"),
    ("http://[::1]/", "::1"),
    ("http://[fe80::1]/", "fe80::1"),
    ("http://[febf:ffff::1]/", "febf:ffff::1"),
    ("http://[fc00::1]/", "fc00::1"),
    ("http://[fd12:3456::1]/", "fd12:3456::1"),
    ("http://[fec0::1]/", "fec0::1"),
    ("http://[ff02::1]/", "ff02::1"),
    ("http://[2001:db8::1]/", "2001:db8::1"),
    ("http://[3fff::1]/", "3fff::1"),
    ("http://[2001::1]/", "2001::1"),
    ("http://[100::1]/", "100::1"),
    ("http://[64:ff9b:1::1]/", "64:ff9b:1::1"),
    // IPv6 forms of forbidden IPv4 addresses
    ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
    ("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1"),
    ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
    ("http://[::ffff:10.0.0.1]/", "::ffff:10.0.0.1"),
    ("http://[::ffff:0.0.0.0]/", "::ffff:0.0.0.0"),
    ("http://[::127.0.0.1]/", "::127.0.0.1"),
    ("http://[::8.8.8.8]/", "::8.8.8.8"),
    ("http://[64:ff9b::127.0.0.1]/", "64:ff9b::7f00:1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::169.254.169.254"),
    ("http://[64:ff9b::192.168.0.1]/", "64:ff9b::c0a8:1"),
    ("http://[2002:7f00:1::]/", "2002:7f00:1::"),
    ("http://[2002:a9fe:a9fe::1]/", "2002:a9fe:a9fe::1"),
];

#[tokio::test]
async fn every_forbidden_range_is_refused_at_registration() {
    let policy = EgressPolicy::default();
    for (raw, expected) in FORBIDDEN {
        match policy.check_url(&url(raw)).await {
            Err(EgressError::Forbidden { addr, range }) => {
                assert_eq!(addr, ip(expected), "{raw}");
                assert!(!range.is_empty());
            }
            other => panic!("{raw}: expected Forbidden({expected}), got {other:?}"),
        }
    }
}

#[tokio::test]
async fn public_addresses_pass_in_every_spelling() {
    let policy = EgressPolicy::default();
    for raw in [
        "https://93.184.216.34/hooks",
        "http://1.1.1.1:8080/",
        "http://172.32.0.1/",
        "http://100.128.0.1/",
        "http://134744072/",
        "http://[2606:4700:4700::1111]/",
        "http://[::ffff:8.8.8.8]/",
        "http://[64:ff9b::8.8.8.8]/",
        "http://[2002:808:808::1]/",
    ] {
        assert!(policy.check_url(&url(raw)).await.is_ok(), "{raw}");
    }
}

/// What the `url` crate makes of numeric hosts (the WHATWG URL standard's IPv4 parser): every
/// spelling becomes `Host::Ipv4`, so the guard sees the address the connection would use.
#[test]
fn the_url_crate_turns_numeric_hosts_into_ipv4_addresses() {
    for raw in [
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://127.0.1/",
    ] {
        let parsed = url(raw);
        assert_eq!(
            parsed.host(),
            Some(Host::Ipv4([127, 0, 0, 1].into())),
            "{raw}"
        );
        assert_eq!(parsed.as_str(), "http://127.0.0.1/", "{raw}");
    }
    // A number too large for IPv4 is not a name to resolve either: it does not parse.
    assert!(Url::parse("http://4294967296/").is_err());
}

#[tokio::test]
async fn only_http_and_https_urls_without_userinfo_are_accepted() {
    let policy = EgressPolicy::default();
    for (raw, expected) in [
        ("ftp://93.184.216.34/", "Scheme"),
        ("file:///etc/passwd", "Scheme"),
        ("gopher://93.184.216.34:70/", "Scheme"),
        ("redis://93.184.216.34:6379/", "Scheme"),
        ("http://user:secret@93.184.216.34/", "Userinfo"),
        ("https://token@93.184.216.34/", "Userinfo"),
    ] {
        let err = policy.check_url(&url(raw)).await.unwrap_err();
        let kind = match err {
            EgressError::Scheme(_) => "Scheme",
            EgressError::Userinfo => "Userinfo",
            other => panic!("{raw}: {other:?}"),
        };
        assert_eq!(kind, expected, "{raw}");
    }
}

#[tokio::test]
async fn the_allow_list_lets_loopback_through_and_nothing_else() {
    let policy = loopback_allowed();
    for raw in [
        "http://127.0.0.1:8082/",
        "http://2130706433/",
        "http://[::ffff:127.0.0.1]/",
    ] {
        assert!(policy.check_url(&url(raw)).await.is_ok(), "{raw}");
    }
    for raw in [
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/",
    ] {
        assert!(
            matches!(
                policy.check_url(&url(raw)).await,
                Err(EgressError::Forbidden { .. })
            ),
            "{raw}"
        );
    }
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused_at_registration() {
    let refused = EgressPolicy::default()
        .check_url(&url("http://localhost:8082/hooks"))
        .await;
    match refused {
        Err(EgressError::Forbidden { addr, .. }) => assert!(addr.is_loopback(), "{addr}"),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    // The development allow-list admits it (both loopbacks: `localhost` may resolve to ::1 too,
    // and registration refuses a name if any of its addresses is forbidden).
    let dev = EgressPolicy::allowing(["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
    assert!(
        dev.check_url(&url("http://localhost:8082/hooks"))
            .await
            .is_ok()
    );
}

#[test]
fn the_policy_reads_from_configuration() {
    #[derive(serde::Deserialize)]
    struct Section {
        egress: EgressPolicy,
        limits: DeliveryLimits,
    }
    let section: Section = serde_json::from_str(
        r#"{"egress": {"allow": ["127.0.0.0/8", "::1"], "dns_timeout": "500ms"},
            "limits": {"total_timeout": "20s", "body_limit_bytes": 100}}"#,
    )
    .unwrap();
    assert_eq!(
        section.egress.allow,
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    );
    assert_eq!(section.egress.dns_timeout, Duration::from_millis(500));
    assert_eq!(section.limits.total_timeout, Duration::from_secs(20));
    assert_eq!(
        section.limits.connect_timeout,
        DeliveryLimits::default().connect_timeout
    );
    let bad = serde_json::from_str::<EgressPolicy>(r#"{"allow": ["127.0.0.1/8"]}"#);
    assert!(bad.unwrap_err().to_string().contains("127.0.0.0/8"));
}

// ---------------------------------------------------------------------------------------------
// Delivery: the guard on the connection actually made

#[tokio::test]
async fn an_ip_literal_is_refused_at_delivery_without_connecting() {
    let server = Server::answering(200, "", "ok").await;
    let port = server.port();
    let guarded = client(EgressPolicy::default(), limits());

    // The failure: a registration-time check alone would not stop these, since a URL can be
    // stored before the policy changed or bypass registration. Every spelling is refused
    // before a byte is sent.
    for raw in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let result = guarded.post(&url(&raw), HeaderMap::new(), "{}").await;
        let expected = match url(&raw).host() {
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => ip("127.0.0.1"),
        };
        assert_forbidden(result, expected);
    }
    assert_eq!(server.accepted(), 0, "no connection was attempted");

    // The counter is live: with loopback allowed, the same URL connects.
    let allowed = client(loopback_allowed(), limits());
    let answer = allowed
        .post(&server.url("/"), HeaderMap::new(), "{}")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(server.accepted(), 1);
}

/// No custom DNS server can be run here, so rebinding is shown through what it relies on: the
/// addresses reqwest connects to are the guarded resolver's, not a second lookup's. Refused by
/// the resolver, the name never reaches the listener; allowed by it, it does.
#[tokio::test]
async fn a_name_connects_only_to_addresses_the_resolver_approved() {
    let server = Server::answering(202, "", "").await;
    let by_name = url(&format!("http://localhost:{}/hooks", server.port()));

    let guarded = client(EgressPolicy::default(), limits());
    let result = guarded.post(&by_name, HeaderMap::new(), "{}").await;
    match result {
        Err(DeliveryError::Forbidden { addr, .. }) => assert!(addr.is_loopback(), "{addr}"),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    assert_eq!(server.accepted(), 0, "the refused name reached no socket");

    // Only 127.0.0.0/8 allowed: if `localhost` also resolves to ::1, the resolver drops it and
    // the connection goes to 127.0.0.1, where the listener is.
    let allowed = client(loopback_allowed(), limits());
    let answer = allowed
        .post(&by_name, HeaderMap::new(), "{}")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn the_headers_and_body_given_are_the_ones_sent() {
    let captured = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = Arc::clone(&captured);
    let server = Server::start(move |mut stream| {
        let sink = Arc::clone(&sink);
        async move {
            let request = read_request(&mut stream).await;
            *sink.lock().unwrap() = request;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nreceived")
                .await;
        }
    })
    .await;
    let mut headers = HeaderMap::new();
    headers.insert("webhook-id", HeaderValue::from_static("msg_1"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let answer = client(loopback_allowed(), limits())
        .post(
            &server.url("/hooks"),
            headers,
            r#"{"type":"order.confirmed"}"#,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(&answer.body_prefix[..], b"received");
    assert!(!answer.truncated);
    let request = captured.lock().unwrap().clone();
    assert!(request.starts_with("POST /hooks HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("webhook-id: msg_1\r\n"), "{request}");
    assert!(
        request.ends_with(r#"{"type":"order.confirmed"}"#),
        "{request}"
    );
}

#[tokio::test]
async fn redirects_are_answers_not_followed() {
    let target = Server::answering(200, "", "inside").await;
    let location = format!("location: {}\r\n", target.url("/admin"));
    let redirector = Server::answering(302, &location, "").await;

    let answer = client(loopback_allowed(), limits())
        .post(&redirector.url("/hooks"), HeaderMap::new(), "{}")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::FOUND);
    assert_eq!(redirector.accepted(), 1);
    assert_eq!(target.accepted(), 0, "the redirect was not followed");
}

#[tokio::test]
async fn a_trickled_body_is_cut_at_the_bound_and_reading_stops() {
    const ANNOUNCED: usize = 1_000_000;
    const PIECE: usize = 100;
    let sent = Arc::new(AtomicUsize::new(0));
    let cut_off = Arc::new(AtomicBool::new(false));
    let (sent_by_server, cut_off_seen) = (Arc::clone(&sent), Arc::clone(&cut_off));
    let server = Server::start(move |mut stream| {
        let (sent, cut_off) = (Arc::clone(&sent_by_server), Arc::clone(&cut_off_seen));
        async move {
            read_request(&mut stream).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {ANNOUNCED}\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            // 100 bytes every 2 ms: 20 s for the whole body, if nobody stops reading.
            for _ in 0..ANNOUNCED / PIECE {
                if stream.write_all(&[b'x'; PIECE]).await.is_err() {
                    cut_off.store(true, Ordering::SeqCst);
                    return;
                }
                sent.fetch_add(PIECE, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
    .await;

    let started = Instant::now();
    let answer = client(loopback_allowed(), limits())
        .post(&server.url("/"), HeaderMap::new(), "{}")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body_prefix.len(), 1024);
    assert!(answer.truncated);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The client closed the connection: the server's writes start failing long before the
    // announced body is out.
    assert!(
        eventually(Duration::from_secs(5), || cut_off.load(Ordering::SeqCst)).await,
        "the server could keep writing: the client is still reading"
    );
    assert!(sent.load(Ordering::SeqCst) < ANNOUNCED / 10);
}

#[tokio::test]
async fn a_small_body_is_read_whole() {
    let server = Server::answering(500, "", "internal error").await;
    let answer = client(loopback_allowed(), limits())
        .post(&server.url("/"), HeaderMap::new(), "{}")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&answer.body_prefix[..], b"internal error");
    assert!(!answer.truncated);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_within_the_bound() {
    let server = Server::start(|mut stream| async move {
        read_request(&mut stream).await;
        // Hold the connection open, silent, until the test drops the server.
        std::future::pending::<()>().await;
        drop(stream);
    })
    .await;
    let bound = Duration::from_millis(300);
    let silent = client(
        loopback_allowed(),
        DeliveryLimits {
            response_timeout: bound,
            ..limits()
        },
    );

    let started = Instant::now();
    let result = silent.post(&server.url("/"), HeaderMap::new(), "{}").await;
    let elapsed = started.elapsed();
    assert!(
        matches!(
            result,
            Err(DeliveryError::Timeout {
                stage: Stage::Response
            })
        ),
        "{result:?}"
    );
    assert!(elapsed >= bound, "{elapsed:?}");
    assert!(elapsed < bound + Duration::from_secs(2), "{elapsed:?}");
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn a_body_that_stalls_times_out_at_the_total_bound() {
    let server = Server::start(|mut stream| async move {
        read_request(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            .await;
        std::future::pending::<()>().await;
        drop(stream);
    })
    .await;
    let total = Duration::from_millis(400);
    let started = Instant::now();
    let result = client(
        loopback_allowed(),
        DeliveryLimits {
            total_timeout: total,
            ..limits()
        },
    )
    .post(&server.url("/"), HeaderMap::new(), "{}")
    .await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(DeliveryError::Timeout { stage: Stage::Body })),
        "{result:?}"
    );
    assert!(
        elapsed >= total && elapsed < total + Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn refusals_are_permanent_and_transport_failures_are_not() {
    let guarded = client(EgressPolicy::default(), limits());
    // Loopback, so that even a broken guard could only reach this machine.
    let forbidden = guarded
        .post(&url("http://127.0.0.1:1/"), HeaderMap::new(), "{}")
        .await
        .unwrap_err();
    assert!(forbidden.is_permanent(), "{forbidden:?}");
    let bad_scheme = guarded
        .post(&url("ftp://127.0.0.1/"), HeaderMap::new(), "{}")
        .await
        .unwrap_err();
    assert!(matches!(
        bad_scheme,
        DeliveryError::InvalidUrl(EgressError::Scheme(_))
    ));
    assert!(bad_scheme.is_permanent());

    // A closed port on loopback: connection refused, worth retrying later.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let refused = client(loopback_allowed(), limits())
        .post(&url(&format!("http://{closed}/")), HeaderMap::new(), "{}")
        .await
        .unwrap_err();
    assert!(matches!(refused, DeliveryError::Connect(_)), "{refused:?}");
    assert!(!refused.is_permanent());
}
