//! Shared test helpers: a sink per test on ephemeral ports, a raw SMTP client that shows every
//! reply code, a lettre transport, an HTTP client, and a poll loop with a deadline.
#![allow(dead_code, clippy::unwrap_used)] // not every test binary uses every helper

use std::net::SocketAddr;
use std::time::Duration;

use keel_smtp_sink::{RunningSink, SinkConfig, SmtpSink};
use lettre::{AsyncSmtpTransport, Tokio1Executor};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A sink on ephemeral loopback ports with `config`'s bounds.
pub async fn start(config: SinkConfig) -> RunningSink {
    SmtpSink::start(config).await.unwrap()
}

/// A sink with the default bounds.
pub async fn start_default() -> RunningSink {
    start(SinkConfig::ephemeral()).await
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`] naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// lettre's async transport, without TLS, to the sink's SMTP port.
pub fn mailer(sink: &RunningSink) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.smtp_addr().ip().to_string())
        .port(sink.smtp_addr().port())
        .timeout(Some(DEADLINE))
        .build()
}

/// A message from `noreply@keel.test` to `to` with `subject` and a plain-text `body`.
pub fn message(to: &str, subject: &str, body: &str) -> lettre::Message {
    lettre::Message::builder()
        .from("Keel <noreply@keel.test>".parse().unwrap())
        .to(to.parse().unwrap())
        .subject(subject)
        .body(body.to_owned())
        .unwrap()
}

/// An HTTP client (reqwest needs a rustls provider installed, even for plain HTTP).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `http://{sink}/{path}`.
pub fn url(sink: &RunningSink, path: &str) -> String {
    format!("http://{}{path}", sink.http_addr())
}

/// A reply as the raw client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

/// An SMTP client that sends exactly the bytes it is given and shows every reply.
#[derive(Debug)]
pub struct RawClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl RawClient {
    /// Connects without reading the greeting.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, writer) = stream.into_split();
        Self {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// Connects, reads the `220` and says `EHLO`.
    pub async fn ready(addr: SocketAddr) -> Self {
        let mut client = Self::connect(addr).await;
        assert_eq!(client.reply().await.code, 220);
        assert_eq!(client.command("EHLO client.test").await.code, 250);
        client
    }

    /// The next reply (all its lines), or `None` if the server closed the connection.
    pub async fn next_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(DEADLINE, self.reader.read_line(&mut line))
                .await
                .expect("the server answers within the deadline");
            if read.ok()? == 0 {
                return None;
            }
            let line = line.trim_end();
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .expect("a reply code");
            let last = line.get(3..4) != Some("-");
            lines.push(line.get(4..).unwrap_or_default().to_owned());
            if last {
                return Some(Reply { code, lines });
            }
        }
    }

    pub async fn reply(&mut self) -> Reply {
        self.next_reply()
            .await
            .expect("a reply, not a closed connection")
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Sends `line` + CRLF and reads the reply.
    pub async fn command(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// MAIL, RCPT, DATA, `data` as given (it must end with `\r\n.\r\n`): the final reply.
    pub async fn send_message(&mut self, data: &[u8]) -> Reply {
        assert_eq!(self.command("MAIL FROM:<a@keel.test>").await.code, 250);
        assert_eq!(self.command("RCPT TO:<b@keel.test>").await.code, 250);
        assert_eq!(self.command("DATA").await.code, 354);
        self.send_raw(data).await;
        self.reply().await
    }

    /// Reads until the server closes the connection (within the deadline); the replies seen.
    pub async fn until_closed(&mut self) -> Vec<Reply> {
        let mut replies = Vec::new();
        while let Some(reply) = self.next_reply().await {
            replies.push(reply);
        }
        replies
    }
}
