//! The sink's configuration: where it listens and every bound it enforces.
//!
//! Each bound has a default here and a flag (and `KEEL_SMTP_SINK_*` variable) in the binary.
//! Must not break: every field stays bounded and non-zero; [`SinkConfig::validate`] is what
//! [`crate::SmtpSink::start`] relies on, so a zero bound is an error, never "unlimited".

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::Error;

/// Mailpit's default SMTP port; the sink uses it too so clients need no change.
pub const DEFAULT_SMTP_PORT: u16 = 1025;
/// Mailpit's default HTTP port.
pub const DEFAULT_HTTP_PORT: u16 = 8025;

/// Where the sink listens and how much it accepts.
///
/// ```
/// use keel_smtp_sink::SinkConfig;
///
/// // What tests use: both listeners on an ephemeral loopback port, a short idle timeout.
/// let config = SinkConfig {
///     idle_timeout: std::time::Duration::from_secs(5),
///     ..SinkConfig::ephemeral()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// SMTP listener (default `127.0.0.1:1025`).
    pub smtp_addr: SocketAddr,
    /// HTTP API listener (default `127.0.0.1:8025`).
    pub http_addr: SocketAddr,
    /// The name in the `220` greeting and the `EHLO` reply.
    pub hostname: String,
    /// Largest message (the DATA after dot-unstuffing), advertised as `SIZE`; a larger one is
    /// refused with `552` and the connection stays usable. Default 10 MiB.
    pub max_message_bytes: usize,
    /// Longest line, CRLF included (RFC 5321 §4.5.3.1.6: 1000). Longer is refused with `500`.
    pub max_line_bytes: usize,
    /// `RCPT TO` accepted per message; the next one gets `452`. Default 100 (the minimum RFC
    /// 5321 §4.5.3.1.8 asks a server to accept).
    pub max_recipients: usize,
    /// How long the sink waits for a client's next line (and for a client to take a reply)
    /// before it says `421` and closes. Default 60 s.
    pub idle_timeout: Duration,
    /// SMTP connections served at once; one more is answered `421` and closed. Default 64.
    pub max_connections: usize,
    /// Messages kept; when full the oldest is dropped (a ring buffer). Default 1000.
    pub max_messages: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            smtp_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_SMTP_PORT)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_HTTP_PORT)),
            hostname: "keel-smtp-sink".to_owned(),
            max_message_bytes: 10 * 1024 * 1024,
            max_line_bytes: 1000,
            max_recipients: 100,
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            max_messages: 1000,
        }
    }
}

impl SinkConfig {
    /// The defaults with both listeners on `127.0.0.1:0`: the OS picks free ports, so tests
    /// run in parallel with each other and with a running `make dev` stack.
    pub fn ephemeral() -> Self {
        Self {
            smtp_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..Self::default()
        }
    }

    /// Refuses a configuration with a zero bound, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        let zero = [
            ("max_message_bytes", self.max_message_bytes == 0),
            ("max_recipients", self.max_recipients == 0),
            ("idle_timeout", self.idle_timeout.is_zero()),
            ("max_connections", self.max_connections == 0),
            ("max_messages", self.max_messages == 0),
        ];
        if let Some((field, _)) = zero.into_iter().find(|(_, is_zero)| *is_zero) {
            return Err(Error::InvalidConfig {
                field,
                reason: "must be greater than zero",
            });
        }
        // "MAIL FROM:<>" and a terminating "." must fit, with room for a real address.
        if self.max_line_bytes < 64 {
            return Err(Error::InvalidConfig {
                field: "max_line_bytes",
                reason: "must be at least 64",
            });
        }
        if self.hostname.is_empty()
            || self
                .hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidConfig {
                field: "hostname",
                reason: "must be a non-empty name without spaces",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_mailpits_ports_on_loopback() {
        let c = SinkConfig::default();
        assert_eq!(c.smtp_addr.to_string(), "127.0.0.1:1025");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8025");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_zero_bound_is_refused_by_name() {
        let c = SinkConfig {
            max_connections: 0,
            ..SinkConfig::ephemeral()
        };
        let err = c.validate().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid configuration: max_connections must be greater than zero")
        );
    }
}
