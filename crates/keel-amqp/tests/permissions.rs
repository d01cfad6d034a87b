//! One RabbitMQ user per service, least privilege (P14's broker half): the permissions the
//! definitions file grants ([`keel_amqp::definitions::Permissions::for_service`]) let
//! notification declare and consume its own queue and publish its own events, and refuse it a
//! billing event or a message pushed into billing's queue. The failure first: with resource
//! permissions alone (write on `keel.events`), any routing key goes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_amqp::AmqpError;
use keel_amqp::definitions::{Permissions, ServiceAccess, dev_password, password_hash};
use keel_amqp::publisher::publish_confirmed;
use keel_amqp::topology::{self, QueueSpec};
use keel_testkit::{TestUser, TestVhost};
use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;

fn queue(name: &str, bindings: &[&str]) -> QueueSpec {
    QueueSpec {
        name: name.into(),
        bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
        delivery_limit: 20,
        max_length: 10_000,
        retry_tiers: vec![Duration::from_secs(1)],
        dead_letter_max_length: 1000,
    }
}

fn notification() -> ServiceAccess {
    ServiceAccess {
        service: "notification".into(),
        publishes: vec!["notification.notification.*".into()],
        queues: vec![queue(
            "notification.events",
            &["checkout.order.*", "billing.payment.*"],
        )],
    }
}

async fn user(vhost: &TestVhost, p: &Permissions, with_topics: bool) -> TestUser {
    let topics: Vec<_> = if with_topics {
        p.topics
            .iter()
            .map(|(exchange, write, read)| json!({"exchange": exchange, "write": write, "read": read}))
            .collect()
    } else {
        Vec::new()
    };
    let name = if with_topics { "notification" } else { "naive" };
    vhost
        .user(
            name,
            &dev_password("notification"),
            &password_hash("notification", &dev_password("notification")),
            json!({"configure": p.configure, "write": p.write, "read": p.read}),
            &topics,
        )
        .await
}

async fn channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

async fn publish(channel: &Channel, exchange: &str, key: &str) -> Result<(), AmqpError> {
    publish_confirmed(channel, exchange, key, b"{}", BasicProperties::default()).await
}

fn refused(result: Result<(), AmqpError>) -> bool {
    matches!(&result, Err(e) if e.to_string().contains("ACCESS_REFUSED"))
}

#[tokio::test]
async fn notification_may_publish_its_own_events_but_not_a_billing_event() {
    let vhost = TestVhost::create().await;
    // Billing's queue exists (declared by the platform, as at broker boot).
    let (_admin, admin) = channel(&vhost.url()).await;
    topology::declare_queue(&admin, &queue("billing.events", &["checkout.order.*"]))
        .await
        .unwrap();
    let access = notification();
    let permissions = Permissions::for_service(&access);

    // The failure: resource permissions alone let notification write anything to keel.events.
    let naive = user(&vhost, &permissions, false).await;
    let (_c, ch) = channel(&naive.url).await;
    topology::declare_own(&ch, &access.queues[0]).await.unwrap();
    publish(&ch, "keel.events", "billing.payment.captured")
        .await
        .expect("without topic permissions a forged billing event is accepted");

    // Keel's user: its own topology and events, nothing else.
    let least = user(&vhost, &permissions, true).await;
    let (conn, ch) = channel(&least.url).await;
    topology::ensure_exchanges(&conn)
        .await
        .expect("notification checks the shared exchanges without configure on them");
    topology::declare_own(&ch, &access.queues[0])
        .await
        .expect("notification declares its own queue, tiers and DLQ");
    publish(&ch, "keel.events", "notification.notification.recorded")
        .await
        .expect("its own event");
    publish(&ch, "keel.retry", "notification.events.retry.1s")
        .await
        .expect("its own retry tier");
    publish(&ch, "keel.dlx", "notification.events")
        .await
        .expect("its own DLQ");
    assert!(
        refused(publish(&ch, "keel.events", "billing.payment.captured").await),
        "a billing event is refused"
    );
    let (_c, ch) = channel(&least.url).await;
    assert!(
        refused(publish(&ch, "keel.retry", "billing.events").await),
        "pushing into billing's queue through the retry exchange is refused"
    );
    let (_c, ch) = channel(&least.url).await;
    assert!(
        refused(topology::declare_own(&ch, &queue("billing.events", &["checkout.order.*"])).await),
        "declaring (or re-binding) billing's queue is refused"
    );
    let (_c, ch) = channel(&least.url).await;
    assert!(
        refused(topology::declare_own(&ch, &queue("notification.spy", &["billing.#"])).await),
        "binding a queue of its own to every billing event is refused (topic read)"
    );
    let (_c, ch) = channel(&least.url).await;
    let deleted = ch
        .exchange_delete(
            "keel.events".into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(AmqpError::from);
    assert!(refused(deleted), "deleting the events exchange is refused");
}
