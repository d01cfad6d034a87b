//! The confirmed, mandatory publisher: a message the broker cannot route is an error the caller
//! sees, never a silent drop; an event nobody subscribes to yet is kept in `keel.unrouted`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_amqp::publisher::{Outgoing, Publisher, publish_confirmed};
use keel_amqp::topology::{self, UNROUTED_QUEUE};
use keel_amqp::{AmqpConfig, AmqpError, Broker};
use keel_testkit::{TestVhost, eventually};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn connect(vhost: &TestVhost) -> (Connection, Channel) {
    let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_exchanges(&channel).await.unwrap();
    (conn, channel)
}

async fn depth(conn: &Connection, queue: &str) -> Option<u32> {
    let channel = conn.create_channel().await.ok()?;
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
    Some(q.message_count())
}

/// The failure first: without `mandatory` the broker confirms (acks) a message it routed
/// nowhere, so the publisher believes it was delivered. With it, the broker returns the
/// message and the caller gets `Unroutable`.
#[tokio::test]
async fn an_unroutable_message_is_an_error_the_caller_sees_not_a_silent_drop() {
    let vhost = TestVhost::create().await;
    let (_conn, channel) = connect(&vhost).await;

    let naive = channel
        .basic_publish(
            "keel.dlx".into(),
            "nobody.is.bound.here".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        naive.is_ack() && naive.take_message().is_none(),
        "without mandatory: acked, and gone"
    );

    let err = publish_confirmed(
        &channel,
        "keel.dlx",
        "nobody.is.bound.here",
        b"{}",
        BasicProperties::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, AmqpError::Unroutable { exchange, routing_key }
            if exchange == "keel.dlx" && routing_key == "nobody.is.bound.here"),
        "{err:?}"
    );
}

/// `keel.events`' alternate exchange: an event type no queue is bound to is confirmed *and
/// kept* in `keel.unrouted`, where `keelctl dlq` can list and replay it once a consumer exists.
#[tokio::test]
async fn an_event_nobody_subscribes_to_yet_is_kept_in_keel_unrouted() {
    let vhost = TestVhost::create().await;
    let (conn, _channel) = connect(&vhost).await;
    let broker = Broker::spawn(
        AmqpConfig {
            url: vhost.url().into(),
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(200),
        },
        "keel-amqp-test",
        CancellationToken::new(),
    );
    eventually(WAIT, "connected", || async {
        broker.is_connected().await.then_some(())
    })
    .await;
    let mut publisher = Publisher::new(broker.clone(), Duration::from_secs(5));
    let results = publisher
        .publish_batch(&[Outgoing {
            id: uuid::Uuid::new_v4(),
            event_type: "inventory.item.created".into(),
            body: b"{}".to_vec(),
            traceparent: None,
            timestamp: 0,
        }])
        .await
        .unwrap();
    assert!(results[0].is_ok(), "{results:?}");
    eventually(WAIT, "the event in keel.unrouted", || async {
        (depth(&conn, UNROUTED_QUEUE).await? == 1).then_some(())
    })
    .await;
    broker.close().await;
}
