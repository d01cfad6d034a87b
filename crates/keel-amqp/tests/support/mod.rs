//! What several of keel-amqp's test binaries share.

use std::time::Duration;

use keel_amqp::{AmqpConfig, Broker};
use tokio_util::sync::CancellationToken;

/// A supervised broker connection to `url`, as a service configures one but quick to retry,
/// stopping with `stop`.
pub fn broker(url: String, stop: &CancellationToken) -> Broker {
    Broker::spawn(
        AmqpConfig {
            url: url.into(),
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(200),
        },
        "keel-amqp-test",
        stop.clone(),
    )
}
