//! Queue depths as metrics (P05): the backlog, the retry tiers and the DLQ are visible.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::Broker;
use crate::topology::{self, QueueSpec};

/// Reads the depth and consumer count of the queue, its tiers and its DLQ every `every`, into
/// `amqp_queue_depth` and `amqp_queue_consumers` (P05: the backlog and the DLQ are visible).
pub(super) async fn watch_depths(
    broker: Broker,
    queue: Arc<QueueSpec>,
    every: Duration,
    stop: CancellationToken,
) {
    let names: Vec<String> = queue.declarations().into_iter().map(|d| d.name).collect();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut channel: Option<Channel> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = broker.channel().await.ok();
        }
        let Some(ch) = channel.as_ref() else { continue };
        for name in &names {
            let Ok(q) = topology::short(name) else {
                continue;
            };
            let read = tokio::time::timeout(
                broker.operation_timeout(),
                ch.queue_declare(
                    q,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            match read {
                Ok(Ok(state)) => {
                    metrics::gauge!("amqp_queue_depth", "queue" => name.clone())
                        .set(f64::from(state.message_count()));
                    metrics::gauge!("amqp_queue_consumers", "queue" => name.clone())
                        .set(f64::from(state.consumer_count()));
                }
                // Not declared yet (a passive declare closes the channel): next tick.
                _ => {
                    channel = None;
                    break;
                }
            }
        }
    }
    if let Some(ch) = channel {
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "done".into())).await;
    }
}
