//! The SMTP client: lettre's async transport, bounded in time, with its errors sorted into
//! the two kinds the job worker acts on.
//!
//! One connection per email (lettre's pool is not compiled in): notification sends one email
//! per final order, few enough that a pool's idle connections would cost more than they save,
//! and a fresh connection never meets a server that closed an idle one.
//!
//! Time: lettre's `timeout` bounds the TCP connect only (on tokio); a server that accepts and
//! then never answers would hold the worker slot forever. [`Smtp::send`] therefore bounds the
//! whole exchange, greeting to `250` after DATA, with the same `email.timeout`.
//!
//! Which failures are worth another attempt (RFC 5321 §4.2.1 decides for replies):
//! - transient: the server cannot be reached (connection refused, timeout, reset), the
//!   connection broke, an unreadable reply, or a `4xx` reply ("try again later");
//! - permanent: a `5xx` reply, the server refusing this email for good (unknown mailbox,
//!   policy, size).
//!
//! Must not break: `Ok` means the server answered `250` to the end of DATA, and only then.

use std::time::{Duration, Instant};

use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Why an email was not accepted, by what the worker should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth another attempt after a backoff.
    #[error("{0}")]
    Transient(String),
    /// Retrying sends the same email to the same answer: fail the job.
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    /// The `kind` label of `email_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
        }
    }

    fn from_smtp(error: &lettre::transport::smtp::Error, server: &str) -> Self {
        let reason = format!("SMTP {server}: {error}");
        // Only a 5xx reply is the server's final word; everything else (4xx, no connection,
        // a broken one) may go away.
        if error.is_permanent() {
            Self::Permanent(reason)
        } else {
            Self::Transient(reason)
        }
    }
}

/// An SMTP server to send through (no TLS, no authentication: a local relay or a sink).
#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for error messages.
    server: String,
    timeout: Duration,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("server", &self.server)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Smtp {
    /// A client of `host:port`. Connects to nothing until [`Smtp::send`]: the service starts
    /// whether or not the server is up.
    pub fn new(host: &str, port: u16, timeout: Duration) -> Self {
        // `builder_dangerous`: plain SMTP, no STARTTLS, which is what a sink or a relay on the
        // same host speaks. A deployment sending to the internet's servers uses a relay with
        // TLS (`AsyncSmtpTransport::relay`) and credentials from a secret file instead.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build();
        Self {
            transport,
            server: format!("{host}:{port}"),
            timeout,
        }
    }

    /// Sends `email`; `Ok` once the server accepted it (`250` after DATA). Bounded by the
    /// timeout as a whole; records `email_send_duration_seconds`.
    pub async fn send(&self, email: Message) -> Result<(), SendError> {
        let started = Instant::now();
        let sent = tokio::time::timeout(self.timeout, self.transport.send(email)).await;
        metrics::histogram!("email_send_duration_seconds").record(started.elapsed().as_secs_f64());
        match sent {
            Ok(Ok(_accepted)) => Ok(()),
            Ok(Err(e)) => Err(SendError::from_smtp(&e, &self.server)),
            Err(_elapsed) => Err(SendError::Transient(format!(
                "SMTP {}: no answer within {:?}",
                self.server, self.timeout
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_a_transient_failure() {
        // Bound then closed: nothing listens there now.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let smtp = Smtp::new("127.0.0.1", port, Duration::from_secs(2));
        let email = Message::builder()
            .from("a@keel.test".parse().unwrap())
            .to("b@keel.test".parse().unwrap())
            .body(String::from("hi"))
            .unwrap();
        let err = smtp.send(email).await.unwrap_err();
        assert_eq!(err.kind(), "transient", "{err}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_cut_off_at_the_timeout() {
        // Accepts (the kernel's backlog does) and never sends a greeting.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let smtp = Smtp::new("127.0.0.1", port, Duration::from_millis(200));
        let email = Message::builder()
            .from("a@keel.test".parse().unwrap())
            .to("b@keel.test".parse().unwrap())
            .body(String::from("hi"))
            .unwrap();
        let started = Instant::now();
        let err = smtp.send(email).await.unwrap_err();
        assert_eq!(err.kind(), "transient", "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded");
        drop(listener);
    }
}
