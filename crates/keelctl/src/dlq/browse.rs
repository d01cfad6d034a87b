//! Reading a dead-letter queue without removing anything (`dlq list`, `dlq show`, and the walk
//! `dlq replay` makes).
//!
//! A [`Browser`] asks the queue how many messages are ready (a passive declare), sets the
//! channel's prefetch to the number it wants, consumes with manual acks, takes messages until
//! it has that many or the broker sends nothing for `idle` (another reader holds the rest),
//! and closes the channel without acking: the broker returns every message it handed over.
//! Only [`Browser::ack`] removes one, and only `replay` calls it.
//!
//! The broker returns a closed browse's messages asynchronously: a browse that starts at the
//! same moment (another operator's, or a command run in the same instant) may find fewer
//! ready and look at fewer. Nothing is lost; run it again.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_stream::StreamExt;

use super::message::{DeadLetter, Parts, Shown};
use super::{DeadLetterQueue, DlqError, Filter};
use crate::BrokerError;
use crate::queues::{close, is_not_found, passive_declare};

/// A channel consuming one dead-letter queue with manual acks (see the module docs).
#[derive(Debug)]
pub(crate) struct Browser {
    pub(crate) queue: DeadLetterQueue,
    channel: Channel,
    /// `None` when the queue was empty: nothing to consume.
    consumer: Option<Consumer>,
    remaining: u32,
    idle: Duration,
}

impl Browser {
    /// Opens a browse of at most `limit` of `queue`'s ready messages. `Ok(None)`: the queue
    /// does not exist.
    pub(crate) async fn open(
        conn: &Connection,
        queue: &DeadLetterQueue,
        limit: u16,
        idle: Duration,
    ) -> Result<Option<Self>, BrokerError> {
        let name = queue.name();
        let what = |op: &str| format!("{op} {name}");
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("open a channel"))?;
        let ready = match passive_declare(&channel, name).await {
            Ok((ready, _)) => ready,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BrokerError::amqp(what("read"))(e)),
        };
        let wanted = u16::try_from(ready).unwrap_or(u16::MAX).min(limit);
        let mut consumer = None;
        if wanted > 0 {
            // The prefetch is the bound: the broker hands over no more than we will look at
            // (a prefetch of 0 would mean no bound at all, hence no consume when empty).
            channel
                .basic_qos(wanted, BasicQosOptions::default())
                .await
                .map_err(BrokerError::amqp(what("set the prefetch of")))?;
            consumer = Some(
                channel
                    .basic_consume(
                        name.into(),
                        "keelctl-dlq".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(BrokerError::amqp(what("browse")))?,
            );
        }
        Ok(Some(Self {
            queue: queue.clone(),
            channel,
            consumer,
            remaining: u32::from(wanted),
            idle,
        }))
    }

    /// The next message, or `None` when the browse has taken what it wanted or the broker
    /// went quiet for `idle`.
    pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(self.idle, consumer.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(BrokerError::Amqp {
                what: format!("browse {}", self.queue),
                source: e,
            }),
            Ok(Some(Ok(delivery))) => {
                self.remaining -= 1;
                Ok(Some(delivery))
            }
        }
    }

    /// Removes `delivery` from the queue (`replay`, after the copy is confirmed).
    pub(crate) async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(BrokerError::amqp(format!("ack in {}", self.queue)))
    }

    /// Ends the browse: every message not acked goes back to the queue.
    pub(crate) async fn close(self) {
        close(self.channel).await;
    }
}

/// What a listing found: dead letters, and the queues that do not exist.
#[derive(Debug, Default)]
pub struct Listing {
    pub rows: Vec<DeadLetter>,
    pub missing: Vec<String>,
}

/// The dead letters of `queues` that match `filter`, looking at no more than the first `limit`
/// of each queue. Removes nothing.
pub async fn list(
    conn: &Connection,
    queues: &[DeadLetterQueue],
    filter: &Filter,
    limit: u16,
    idle: Duration,
) -> Result<Listing, DlqError> {
    let mut listing = Listing::default();
    for queue in queues {
        let Some(mut browser) = Browser::open(conn, queue, limit, idle).await? else {
            listing.missing.push(queue.to_string());
            continue;
        };
        let now = Utc::now();
        let read = async {
            while let Some(delivery) = browser.next().await? {
                let summary = Parts::of(queue.name(), &delivery).summary(now);
                if filter.matches(&summary, now) {
                    listing.rows.push(summary);
                }
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        browser.close().await;
        read?;
    }
    Ok(listing)
}

/// The first dead letter with `message_id` in `queues` (looking at no more than the first
/// `limit` of each), in full. Removes nothing. `Ok(None)`: not found.
pub async fn show(
    conn: &Connection,
    queues: &[DeadLetterQueue],
    message_id: &str,
    limit: u16,
    idle: Duration,
) -> Result<Option<Shown>, DlqError> {
    for queue in queues {
        let Some(mut browser) = Browser::open(conn, queue, limit, idle).await? else {
            continue;
        };
        let found = async {
            while let Some(delivery) = browser.next().await? {
                if delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str())
                    == Some(message_id)
                {
                    return Ok(Some(Parts::of(queue.name(), &delivery).shown(Utc::now())));
                }
            }
            Ok::<_, BrokerError>(None)
        }
        .await;
        browser.close().await;
        if let Some(shown) = found? {
            return Ok(Some(shown));
        }
    }
    Ok(None)
}
