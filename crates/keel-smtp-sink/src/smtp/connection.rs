//! One SMTP connection: bytes in and out, the idle timeout, and shutdown.
//!
//! The conversation itself is [`super::session::Session`]; this loop reads bounded lines
//! ([`super::line`]), feeds them to it and writes its replies. Every read and every write is
//! bounded by the idle timeout, so a client that stops sending (or stops reading our replies)
//! is told `421` and loses its connection slot; shutdown tells open connections `421` too.
//!
//! Must not break: a message is stored before its `250` is written (a client holding a `250`
//! finds the message over HTTP), and an I/O error ends only this connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::data::DataCollector;
use super::line::{self, Read};
use super::session::{Limits, Reply, Session, Step};
use crate::mailbox::StoredMessage;

/// Serves one accepted connection until it ends; holds its connection slot (`_permit`) as
/// long.
pub(super) async fn run(
    stream: TcpStream,
    shared: Arc<Shared>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().ok();
    tracing::debug!(?peer, "smtp connection opened");
    match serve(stream, &shared, &stop).await {
        Ok(()) => tracing::debug!(?peer, "smtp connection closed"),
        // A client that vanishes mid-conversation is routine for a sink; not a warning.
        Err(error) => tracing::debug!(?peer, %error, "smtp connection ended by an I/O error"),
    }
}

/// What waiting for the next line gave.
enum Next {
    Line,
    TooLong,
    /// The client closed the connection.
    Closed,
    /// No line within the idle timeout.
    Idle,
    /// The sink is shutting down.
    Stopped,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    max_line: usize,
    idle: Duration,
}

impl Conn {
    async fn next(&mut self, stop: &CancellationToken) -> io::Result<Next> {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(Next::Stopped),
            read = tokio::time::timeout(
                self.idle,
                line::read_line(&mut self.reader, &mut self.line, self.max_line),
            ) => read,
        };
        Ok(match read {
            Err(_elapsed) => Next::Idle,
            Ok(read) => match read? {
                Read::Line => Next::Line,
                Read::TooLong => Next::TooLong,
                Read::Eof => Next::Closed,
            },
        })
    }

    async fn send(&mut self, reply: &Reply) -> io::Result<()> {
        tokio::time::timeout(self.idle, self.writer.write_all(&reply.to_wire()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read replies"))?
    }
}

async fn serve(stream: TcpStream, shared: &Shared, stop: &CancellationToken) -> io::Result<()> {
    let config = &shared.config;
    let host = config.hostname.as_str();
    let (read, writer) = stream.into_split();
    let mut conn = Conn {
        reader: BufReader::new(read),
        writer,
        line: Vec::new(),
        max_line: config.max_line_bytes,
        idle: config.idle_timeout,
    };
    let mut session = Session::new(Limits {
        hostname: config.hostname.clone(),
        max_message_bytes: config.max_message_bytes,
        max_recipients: config.max_recipients,
    });
    conn.send(&Reply::greeting(host)).await?;
    loop {
        let step = match conn.next(stop).await? {
            Next::Line => session.command(&conn.line),
            Next::TooLong => Step::Reply(Reply::line_too_long()),
            Next::Closed => return Ok(()),
            Next::Idle => return conn.send(&Reply::idle_timeout(host)).await,
            Next::Stopped => return conn.send(&Reply::shutting_down(host)).await,
        };
        match step {
            Step::Reply(reply) => conn.send(&reply).await?,
            Step::Close(reply) => return conn.send(&reply).await,
            Step::Data(go_ahead) => {
                conn.send(&go_ahead).await?;
                let mut collector = DataCollector::new(config.max_message_bytes);
                loop {
                    match conn.next(stop).await? {
                        Next::Line => {
                            if collector.line(&conn.line) {
                                break;
                            }
                        }
                        Next::TooLong => collector.line_too_long(),
                        Next::Closed => return Ok(()),
                        Next::Idle => return conn.send(&Reply::idle_timeout(host)).await,
                        Next::Stopped => return conn.send(&Reply::shutting_down(host)).await,
                    }
                }
                let reply = match session.end_data(collector.finish()) {
                    Ok((envelope, data)) => {
                        let bytes = data.len();
                        let message = StoredMessage::new(envelope.from, envelope.to, data);
                        let id = shared.mailbox.push(message);
                        tracing::info!(%id, bytes, "message received");
                        Reply::new(250, format!("OK queued as {id}"))
                    }
                    Err(refusal) => {
                        tracing::info!(reply = ?refusal, "message refused");
                        refusal
                    }
                };
                conn.send(&reply).await?;
            }
        }
    }
}
