//! A direct RabbitMQ connection for tests: publish to `keel.events` as another service's
//! outbox relay would (confirmed, with the conventional properties), and read a queue's
//! counters to wait on a consumer.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::{TestVhost, eventually};

/// A queue's counters as the broker reports them on a passive declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready (not counting delivered, unacked ones).
    pub ready: u32,
    pub consumers: u32,
}

/// A connection to one test's vhost.
#[derive(Debug)]
pub struct TestBroker {
    conn: Connection,
    publish: Channel,
}

impl TestBroker {
    /// Connects to `vhost` with a confirming publish channel.
    pub async fn connect(vhost: &TestVhost) -> Self {
        let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable on the test vhost");
        let publish = conn.create_channel().await.expect("open a channel");
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self { conn, publish }
    }

    /// Publishes to `keel.events` and waits for the broker's confirm.
    pub async fn publish(&self, routing_key: &str, message_id: &str, body: &[u8]) {
        let confirm = self
            .publish
            .basic_publish(
                "keel.events".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(message_id.into())
                    .with_type(routing_key.into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker nacked {message_id}");
    }

    /// `queue`'s counters, or `None` while it does not exist.
    pub async fn queue(&self, queue: &str) -> Option<QueueCounts> {
        let channel = self.conn.create_channel().await.ok()?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "done".into()).await;
        Some(QueueCounts {
            ready: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    /// Waits until something consumes `queue`. A service subscribes only after declaring its
    /// queue and bindings, so from then on published events reach it.
    pub async fn wait_for_consumer(&self, queue: &str, deadline: Duration) {
        eventually(deadline, "the service consumes its queue", || async {
            (self.queue(queue).await?.consumers > 0).then_some(())
        })
        .await;
    }

    /// A fresh channel on this connection, for what a test does beyond publishing.
    pub async fn channel(&self) -> Channel {
        self.conn.create_channel().await.expect("open a channel")
    }
}
