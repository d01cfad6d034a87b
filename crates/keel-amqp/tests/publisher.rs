//! The confirmed, mandatory publisher: a message the broker cannot route is an error the caller
//! sees, never a silent drop; an event nobody subscribes to yet is kept in `keel.unrouted`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_amqp::AmqpError;
use keel_amqp::publisher::{Outgoing, Publisher, publish_confirmed};
use keel_amqp::topology::{self, UNROUTED_QUEUE};
use keel_testkit::{TestBroker, TestVhost, eventually};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

mod support;

const WAIT: Duration = Duration::from_secs(20);

/// The testkit's broker (queue counters) and a confirm-mode channel, the platform's
/// exchanges declared.
async fn connect(vhost: &TestVhost) -> (TestBroker, Channel) {
    let rabbit = TestBroker::connect(vhost).await;
    let channel = rabbit.channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_exchanges(&channel).await.unwrap();
    (rabbit, channel)
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
    let (rabbit, _channel) = connect(&vhost).await;
    let broker = support::broker(vhost.url(), &CancellationToken::new());
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
        (rabbit.queue(UNROUTED_QUEUE).await?.ready == 1).then_some(())
    })
    .await;
    broker.close().await;
}
