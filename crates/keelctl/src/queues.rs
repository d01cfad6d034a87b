//! `keelctl queues`: every registered consumer queue (the registry's `consumes`) and
//! `keel.unrouted`, as the broker sees them: ready messages, consumers, the DLQ's depth and
//! the retry tiers' (P01, P05).
//!
//! Over AMQP only, as `keel_operator` (no management API, no configure permission): each
//! queue is read with a passive `queue.declare`, which answers its ready messages and
//! consumers and creates nothing. A passive declare of a missing queue is an error that closes
//! its channel, so each probe has a channel of its own and a missing queue is reported as
//! missing, not as a failure: a service that never started has declared nothing yet.
//!
//! AMQP cannot list queues, so the retry tiers probed are `<queue>.retry.<tier>` for the
//! tiers in `[dlq] retry_tiers` (the consumers' default); a queue whose service runs other
//! tiers shows those as missing, and its depth sum leaves them out.
//!
//! What to read: `ready` growing with `consumers` at 0 is a consumer down; `dlq` above 0 is
//! work for `keelctl dlq`; `retry` is messages waiting out a transient failure.

use std::time::Duration;

use keel_amqp::topology::{UNROUTED_QUEUE, dead_letter_queue, retry_queue};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ErrorKind};
use serde::Serialize;

use crate::BrokerError;
use crate::registry::Registry;

/// How long closing a channel may take before keelctl stops waiting (the broker cleans up
/// either way, at the latest when the connection closes).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A queue some registered service consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerQueue {
    pub service: String,
    pub queue: String,
}

/// Every queue the registry's services consume, in registry order.
pub fn registered(registry: &Registry) -> Vec<ConsumerQueue> {
    registry
        .services
        .iter()
        .flat_map(|s| {
            s.consumes.iter().map(|q| ConsumerQueue {
                service: s.name.clone(),
                queue: q.clone(),
            })
        })
        .collect()
}

/// One queue as a passive declare saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub queue: String,
    pub exists: bool,
    /// Ready messages (not those delivered and unacked).
    pub messages: u32,
    pub consumers: u32,
}

/// One row of `keelctl queues`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub queue: String,
    /// The consuming service; `None` for `keel.unrouted`.
    pub service: Option<String>,
    pub exists: bool,
    pub ready: u32,
    pub consumers: u32,
    /// Its DLQ; `None` for `keel.unrouted`, which has none.
    pub dead_letters: Option<Probe>,
    /// Messages in the tiers that exist.
    pub retry: u32,
    pub retry_tiers: Vec<Probe>,
}

impl QueueStatus {
    /// Names of this row's queues that do not exist.
    pub fn missing(&self) -> Vec<&str> {
        let own = (!self.exists).then_some(self.queue.as_str());
        own.into_iter()
            .chain(
                self.dead_letters
                    .iter()
                    .chain(&self.retry_tiers)
                    .filter(|p| !p.exists)
                    .map(|p| p.queue.as_str()),
            )
            .collect()
    }
}

/// Reads every queue of `queues` (each with its DLQ and `tiers`), then `keel.unrouted`.
pub async fn status(
    conn: &Connection,
    queues: &[ConsumerQueue],
    tiers: &[Duration],
) -> Result<Vec<QueueStatus>, BrokerError> {
    let mut rows = Vec::with_capacity(queues.len() + 1);
    for q in queues {
        let main = probe(conn, &q.queue).await?;
        let dlq = probe(conn, &dead_letter_queue(&q.queue)).await?;
        let mut retry_tiers = Vec::with_capacity(tiers.len());
        for tier in tiers {
            retry_tiers.push(probe(conn, &retry_queue(&q.queue, *tier)).await?);
        }
        rows.push(QueueStatus {
            queue: q.queue.clone(),
            service: Some(q.service.clone()),
            exists: main.exists,
            ready: main.messages,
            consumers: main.consumers,
            dead_letters: Some(dlq),
            retry: retry_tiers.iter().map(|p| p.messages).sum(),
            retry_tiers,
        });
    }
    let unrouted = probe(conn, UNROUTED_QUEUE).await?;
    rows.push(QueueStatus {
        queue: UNROUTED_QUEUE.to_owned(),
        service: None,
        exists: unrouted.exists,
        ready: unrouted.messages,
        consumers: unrouted.consumers,
        dead_letters: None,
        retry: 0,
        retry_tiers: Vec::new(),
    });
    Ok(rows)
}

/// Reads `queue` with a passive declare on a channel of its own (see the module docs).
pub async fn probe(conn: &Connection, queue: &str) -> Result<Probe, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open a channel"))?;
    match passive_declare(&channel, queue).await {
        Ok((messages, consumers)) => {
            close(channel).await;
            Ok(Probe {
                queue: queue.to_owned(),
                exists: true,
                messages,
                consumers,
            })
        }
        // The broker closed the channel with its 404: nothing to close.
        Err(e) if is_not_found(&e) => Ok(Probe {
            queue: queue.to_owned(),
            exists: false,
            messages: 0,
            consumers: 0,
        }),
        Err(e) => Err(BrokerError::amqp(format!("read {queue}"))(e)),
    }
}

/// A passive declare of `queue` on `channel`: its (ready messages, consumers).
pub(crate) async fn passive_declare(
    channel: &Channel,
    queue: &str,
) -> Result<(u32, u32), lapin::Error> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Whether `e` is the broker's 404: the queue does not exist.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Closes `channel`, bounded.
pub(crate) async fn close(channel: Channel) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "keelctl done".into())).await;
}

/// The rows as a table of 100 columns: the tiers' sum (each tier is in `--output json`).
pub fn table(rows: &[QueueStatus]) -> comfy_table::Table {
    let mut t = crate::output::table([
        "queue",
        "service",
        "ready",
        "consumers",
        "dlq",
        "retry",
        "missing",
    ]);
    let count = |exists: bool, n: u32| {
        if exists {
            n.to_string()
        } else {
            "missing".to_owned()
        }
    };
    for r in rows {
        let missing = r.missing();
        let total = 1 + usize::from(r.dead_letters.is_some()) + r.retry_tiers.len();
        let missing = if missing.len() == total && total > 1 {
            "all: not declared yet".to_owned()
        } else {
            // The suffix only: the queue's name is in the first column.
            missing
                .iter()
                .map(|m| m.strip_prefix(r.queue.as_str()).unwrap_or(m))
                .collect::<Vec<_>>()
                .join(" ")
        };
        t.add_row([
            r.queue.clone(),
            r.service.clone().unwrap_or_else(|| "-".to_owned()),
            count(r.exists, r.ready),
            if r.exists {
                r.consumers.to_string()
            } else {
                "-".to_owned()
            },
            r.dead_letters
                .as_ref()
                .map_or_else(|| "-".to_owned(), |d| count(d.exists, d.messages)),
            if r.dead_letters.is_some() {
                r.retry.to_string()
            } else {
                "-".to_owned()
            },
            missing,
        ]);
    }
    crate::output::keep_whole(&mut t, &[0, 2, 3, 4, 5]);
    t
}
