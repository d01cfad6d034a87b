//! The SMTP side: the accept loop and its connection cap.
//!
//! Written by hand rather than with an SMTP server crate: the subset a sink needs (RFC 5321
//! without relaying, TLS or AUTH) is a few hundred lines, and every bound stays visible here
//! instead of behind a library's defaults. The pieces, outside in:
//! - [`serve`] accepts; past `max_connections` a connection is answered `421` and closed at
//!   once, without a task (a flood costs an accept and a write each, nothing more);
//! - [`connection`] runs one connection: bounded lines, the idle timeout, shutdown;
//! - [`session`] is the conversation (a state machine without I/O);
//! - [`data`] collects a message (dot-unstuffing, the size bound); [`line`] reads a line
//!   without ever holding more than the line bound.
//!
//! Must not break: a connection slot is held by its task for as long as the task runs, and is
//! given back when it ends, however it ends (the permit is dropped with the task).

mod connection;
mod data;
mod line;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::SinkConfig;
use crate::mailbox::Mailbox;
use session::Reply;

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SinkConfig,
    pub mailbox: Arc<Mailbox>,
}

/// Accepts connections until `stop`; each runs in a task on `tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    // `Semaphore::new` panics above MAX_PERMITS; a cap that large is no cap anyway.
    let slots = Arc::new(Semaphore::new(
        shared.config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let refusal = Reply::too_many_connections(&shared.config.hostname).to_wire();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning on the error.
                tracing::warn!(%error, "smtp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => {
                tasks.spawn(connection::run(
                    stream,
                    Arc::clone(&shared),
                    stop.clone(),
                    slot,
                ));
            }
            Err(_) => {
                tracing::warn!(
                    max_connections = shared.config.max_connections,
                    "smtp connection refused: too many connections"
                );
                // One non-blocking write on the plain socket (tokio's `try_write` would wait
                // for the reactor to report the new socket writable): a fresh socket's send
                // buffer is empty, so it succeeds; if not, the client sees the connection
                // close, which means the same.
                if let Ok(mut socket) = stream.into_std() {
                    let _ = std::io::Write::write(&mut socket, &refusal);
                }
            }
        }
    }
}
