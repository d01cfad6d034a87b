//! The supervised broker connection (P21).
//!
//! One AMQP connection per process, owned by a supervisor task that reconnects with capped
//! exponential backoff (full jitter, `keel_resilience`) when it drops. Everything else (the relay's publisher, consumers)
//! asks [`Broker::channel`] for a fresh channel when it needs one and treats
//! [`AmqpError::NotConnected`] as "back off and try again": a service therefore starts while
//! RabbitMQ is down and recovers by itself when it returns, instead of crash-looping.
//!
//! lapin's own auto-recovery is deliberately not used: re-declaring topology and
//! re-subscribing is explicit in [`crate::consumer`], where a reader can see it.
//!
//! Frame size: unless the URL sets `frame_max` itself, the client proposes
//! [`DEFAULT_FRAME_MAX`] (16 KiB) instead of taking the broker's 128 KiB. lapin keeps a send
//! and a receive buffer of 32 frames each per connection, grown to full size (and written)
//! once connected: with 128 KiB frames that is 8 MiB resident in every process, most of an
//! idle service's memory (measured on checkout idle: 23.6 MB resident with them, 16.3 MB
//! without, its anonymous memory 9.3 → 1.9 MB; docs/benchmarks.md). A message larger than a
//! frame is sent as several frames, which costs nothing noticeable for events of a few
//! hundred bytes.
//!
//! Must not break: [`Broker::is_connected`] is the readiness check; it must stay cheap.

use std::sync::Arc;
use std::time::Duration;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use keel_resilience::backoff::BackoffPolicy;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::AmqpError;

/// `[amqp]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:5672/keel`. A secret (it carries the password).
    pub url: SecretString,
    /// Deadline of one connection attempt, and of opening a channel or declaring topology.
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "keel_config::duration")]
    pub max_backoff: Duration,
}

pub(crate) use keel_config::millis as ms;

/// The AMQP frame size the client proposes when the URL does not set `frame_max` (see the
/// module docs: it sizes lapin's per-connection buffers, 32 frames each way).
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// `url` parsed, with [`DEFAULT_FRAME_MAX`] unless it sets a `frame_max` of its own.
fn connection_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

/// Connects to `url`, proposing [`DEFAULT_FRAME_MAX`] unless the URL sets a `frame_max`.
async fn connect(url: &str, props: ConnectionProperties) -> Result<Connection, lapin::Error> {
    match connection_uri(url) {
        Ok(uri) => Connection::connect_uri(uri, props).await,
        // lapin reports an unusable URL as it always has.
        Err(_) => Connection::connect(url, props).await,
    }
}

impl Validate for AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_url("amqp.url", &self.url, &["amqp", "amqps"])?;
        ensure_range(
            "amqp.connect_timeout (ms)",
            ms(self.connect_timeout),
            1,
            60_000,
        )?;
        ensure_range("amqp.max_backoff (ms)", ms(self.max_backoff), 10, 300_000)
    }
}

/// A supervised broker connection. Cheap to clone; every clone shares the connection.
#[derive(Debug, Clone)]
pub struct Broker {
    conn: Arc<RwLock<Option<Connection>>>,
    stop: CancellationToken,
    config: Arc<AmqpConfig>,
    service: &'static str,
}

impl Broker {
    /// A broker handle that is not connected yet: nothing runs until [`Broker::supervise`]
    /// is awaited (the service runtime starts it when the service runs).
    pub fn new(config: AmqpConfig, service: &'static str) -> Self {
        Self {
            conn: Arc::new(RwLock::new(None)),
            stop: CancellationToken::new(),
            config: Arc::new(config),
            service,
        }
    }

    /// [`Broker::new`] with its supervisor spawned at once, stopping on `stop` as well as on
    /// [`Broker::close`] (tests and tools).
    pub fn spawn(config: AmqpConfig, service: &'static str, stop: CancellationToken) -> Self {
        let broker = Self::new(config, service);
        let b = broker.clone();
        let own = broker.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = b.supervise() => {}
                () = stop.cancelled() => own.cancel(),
            }
        });
        broker
    }

    /// The supervisor: connect, watch, reconnect with backoff, until [`Broker::close`].
    pub async fn supervise(self) {
        let (config, service) = (self.config.clone(), self.service);
        // Jittered (keel_resilience): after a broker restart every instance's supervisor fails
        // at the same instant, and must not all come back at the same instants too.
        let mut backoff =
            BackoffPolicy::new(Duration::from_millis(100), config.max_backoff).backoff();
        // How often a healthy connection is looked at; a dropped one is noticed within this.
        let watch_every = Duration::from_millis(500);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if self.is_connected().await {
                backoff.reset();
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(watch_every) => continue,
                }
            }
            let props = ConnectionProperties::default().with_connection_name(service.into());
            let attempt = tokio::time::timeout(
                config.connect_timeout,
                connect(config.url.expose_secret(), props),
            )
            .await;
            let pause = backoff.next_delay_without_deadline();
            match attempt {
                Ok(Ok(conn)) => {
                    let mut slot = self.conn.write().await;
                    // `close` may have run while this attempt was in flight: do not keep a
                    // connection nobody will close.
                    if self.stop.is_cancelled() {
                        drop(slot);
                        let _ = conn.close(200, "shutdown".into()).await;
                        return;
                    }
                    *slot = Some(conn);
                    drop(slot);
                    tracing::info!("connected to RabbitMQ");
                    metrics::counter!("amqp_connects_total").increment(1);
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, backoff_ms = ms(pause), "RabbitMQ connection failed")
                }
                Err(_) => tracing::warn!(
                    backoff_ms = ms(pause),
                    "RabbitMQ connection attempt timed out"
                ),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Whether a connection is open right now (the readiness check).
    pub async fn is_connected(&self) -> bool {
        self.conn
            .read()
            .await
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Opens a new channel on the current connection.
    ///
    /// Fails fast with [`AmqpError::NotConnected`] while the supervisor is reconnecting: the
    /// caller backs off and asks again, it never waits here for the broker to come back.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        if self.stop.is_cancelled() {
            return Err(AmqpError::NotConnected);
        }
        let slot = self.conn.read().await;
        let Some(conn) = slot.as_ref().filter(|c| c.status().connected()) else {
            return Err(AmqpError::NotConnected);
        };
        // Bounded: a connection that died a moment ago may never answer channel.open.
        tokio::time::timeout(self.config.connect_timeout, conn.create_channel())
            .await
            .map_err(|_| AmqpError::Timeout("channel.open"))?
            .map_err(AmqpError::from)
    }

    /// The bound of one broker operation that must answer promptly (opening a channel,
    /// declaring topology): `amqp.connect_timeout`.
    pub fn operation_timeout(&self) -> Duration {
        self.config.connect_timeout
    }

    /// Stops the supervisor and closes the connection (last step of graceful shutdown).
    pub async fn close(&self) {
        self.stop.cancel();
        let conn = self.conn.write().await.take();
        if let Some(conn) = conn
            && let Err(e) = conn.close(200, "shutdown".into()).await
        {
            tracing::warn!(error = %e, "closing RabbitMQ connection");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_client_proposes_small_frames_unless_the_url_says_otherwise() {
        let uri = connection_uri("amqp://guest:guest@127.0.0.1:5672/keel").unwrap();
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        let uri =
            connection_uri("amqp://guest:guest@127.0.0.1:5672/keel?frame_max=131072").unwrap();
        assert_eq!(uri.query.frame_max, Some(131_072));
    }
}
