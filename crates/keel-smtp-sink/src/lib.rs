#![doc = include_str!("../README.md")]
//!
//! Modules: [`config`] (addresses and bounds), [`mailbox`] (the stored messages); inside,
//! `smtp` (the server) and `http` (the API), started together by [`SmtpSink::start`].

pub mod config;
mod http;
pub mod mailbox;
mod mime;
mod smtp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::SinkConfig;
pub use mailbox::{MessageId, StoredMessage};
pub use mime::Header;

use mailbox::Mailbox;

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {field} {reason}")]
    InvalidConfig {
        field: &'static str,
        reason: &'static str,
    },
    #[error("cannot listen for {listener} on {addr}")]
    Bind {
        /// `smtp` or `http`.
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The entry point: [`SmtpSink::start`].
#[derive(Debug, Clone, Copy)]
pub struct SmtpSink;

impl SmtpSink {
    /// Validates `config`, binds both listeners and serves them on the current tokio runtime
    /// until [`RunningSink::shutdown`] (or until the [`RunningSink`] is dropped).
    ///
    /// ```
    /// # async fn demo() -> Result<(), keel_smtp_sink::Error> {
    /// use keel_smtp_sink::{SinkConfig, SmtpSink};
    ///
    /// let sink = SmtpSink::start(SinkConfig::ephemeral()).await?;
    /// let smtp = sink.smtp_addr(); // point the SMTP client here
    /// assert!(sink.messages().is_empty());
    /// sink.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(config: SinkConfig) -> Result<RunningSink, Error> {
        config.validate()?;
        let smtp = bind("smtp", config.smtp_addr).await?;
        let http = bind("http", config.http_addr).await?;
        let smtp_addr = local_addr("smtp", &smtp, config.smtp_addr)?;
        let http_addr = local_addr("http", &http, config.http_addr)?;

        let mailbox = Arc::new(Mailbox::new(config.max_messages));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let shared = Arc::new(smtp::Shared {
            config,
            mailbox: Arc::clone(&mailbox),
        });
        tasks.spawn(smtp::serve(smtp, shared, stop.clone(), tasks.clone()));
        let api = http::router(Arc::clone(&mailbox));
        let api_stop = stop.clone();
        tasks.spawn(async move {
            let served = axum::serve(http, api)
                .with_graceful_shutdown(api_stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "http server stopped");
            }
        });
        Ok(RunningSink {
            smtp_addr,
            http_addr,
            mailbox,
            stop,
            tasks,
        })
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        listener,
        addr,
        source,
    })
}

fn local_addr(
    listener: &'static str,
    bound: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, Error> {
    bound.local_addr().map_err(|source| Error::Bind {
        listener,
        addr,
        source,
    })
}

/// A started sink. Dropping it stops the servers without waiting; [`RunningSink::shutdown`]
/// stops them and waits until every connection has been told `421` and closed.
#[derive(Debug)]
pub struct RunningSink {
    smtp_addr: SocketAddr,
    http_addr: SocketAddr,
    mailbox: Arc<Mailbox>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl RunningSink {
    /// The bound SMTP address (the real port when the configuration said port 0).
    pub fn smtp_addr(&self) -> SocketAddr {
        self.smtp_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The stored messages, oldest first (the HTTP API lists newest first, as Mailpit does).
    pub fn messages(&self) -> Vec<Arc<StoredMessage>> {
        self.mailbox.snapshot()
    }

    /// Stops accepting, tells open SMTP connections `421`, lets in-flight HTTP requests
    /// finish, and returns when all of that is done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
