//! `<service> probe URL`: one HTTP GET of the service's own health endpoint, for container
//! health checks (P21).
//!
//! Keel's images have no shell and no curl (a smaller attack surface, P46), so compose's
//! `healthcheck` and other exec probes run the service binary itself:
//! `["CMD", "/usr/local/bin/service", "probe", "http://127.0.0.1:8080/readyz"]`. Kubernetes
//! does not need it (its `httpGet` probes come from the kubelet).
//!
//! Written by hand rather than with an HTTP client: it is one request to loopback, plain
//! HTTP/1.1 with `Connection: close`, and only the status line is read. It runs before the
//! configuration is loaded, so a probe never needs the service's secrets, and every step is
//! bounded by one timeout, so a hung service fails its check instead of hanging it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a probe failed; the message is what the health check's log shows.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe URL `{0}`: expected http://HOST:PORT/PATH")]
    BadUrl(String),
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: answered `{status_line}`")]
    NotHealthy { url: String, status_line: String },
}

/// The parts of an `http://host:port/path` URL that a probe needs.
fn parse(url: &str) -> Result<(&str, &str), ProbeError> {
    let bad = || ProbeError::BadUrl(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    // A port is required: a probe that silently went to :80 would test the wrong thing.
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(bad()),
    }
    if path.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((authority, path))
}

/// GETs `url` and succeeds on a 2xx status, all within `timeout`.
pub async fn probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let (authority, path) = parse(url)?;
    let io = |source| ProbeError::Io {
        url: url.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await.map_err(io)?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // The status line fits in the first read of any real answer; 256 bytes bound it.
        let mut head = [0u8; 256];
        let mut filled = 0;
        while filled < head.len() && !head[..filled].contains(&b'\n') {
            let n = stream.read(&mut head[filled..]).await.map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let text = String::from_utf8_lossy(&head[..filled]);
        let status_line = text.lines().next().unwrap_or("").trim().to_owned();
        let healthy = status_line
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code.len() == 3 && code.starts_with('2'));
        if healthy {
            Ok(())
        } else {
            Err(ProbeError::NotHealthy {
                url: url.to_owned(),
                status_line,
            })
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_url_needs_http_a_host_and_a_port() {
        assert_eq!(
            parse("http://127.0.0.1:8080/readyz").unwrap(),
            ("127.0.0.1:8080", "/readyz")
        );
        assert_eq!(parse("http://localhost:1").unwrap(), ("localhost:1", "/"));
        for bad in [
            "https://127.0.0.1:8080/readyz",
            "http://127.0.0.1/readyz",
            "http://:8080/readyz",
            "http://127.0.0.1:99999/",
            "127.0.0.1:8080/readyz",
            "http://127.0.0.1:8080/a b",
        ] {
            assert!(matches!(parse(bad), Err(ProbeError::BadUrl(_))), "{bad}");
        }
    }
}
