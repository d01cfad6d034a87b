#![doc = include_str!("../README.md")]

use std::sync::Arc;
use std::time::Duration;

use keel_config::{ConfigError, ExposeSecret, SecretString, Validate, ensure_range, ensure_url};
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

/// `[amqp]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:5672/keel`. A secret (it carries the password).
    pub url: SecretString,
    /// Deadline of one connection attempt.
    #[serde(with = "keel_config::duration")]
    pub connect_timeout: Duration,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "keel_config::duration")]
    pub max_backoff: Duration,
}

impl Validate for AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_url("amqp.url", &self.url, &["amqp", "amqps"])?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ensure_range(
            "amqp.connect_timeout (ms)",
            ms(self.connect_timeout),
            1,
            60_000,
        )?;
        ensure_range("amqp.max_backoff (ms)", ms(self.max_backoff), 10, 300_000)
    }
}

/// A supervised broker connection.
#[derive(Debug, Clone)]
pub struct Broker {
    conn: Arc<RwLock<Option<Connection>>>,
    stop: CancellationToken,
}

impl Broker {
    /// Starts the supervisor task: connect, watch, reconnect with backoff, until `stop`.
    pub fn spawn(config: AmqpConfig, service: &'static str, stop: CancellationToken) -> Self {
        let broker = Self {
            conn: Arc::new(RwLock::new(None)),
            stop,
        };
        let b = broker.clone();
        tokio::spawn(async move { b.supervise(config, service).await });
        broker
    }

    async fn supervise(&self, config: AmqpConfig, service: &'static str) {
        let mut backoff = Duration::from_millis(100);
        // How often a healthy connection is looked at; a dropped one is noticed within this.
        let watch_every = Duration::from_millis(500);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if self.is_connected().await {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(watch_every) => continue,
                }
            }
            let props = ConnectionProperties::default().with_connection_name(service.into());
            let attempt = tokio::time::timeout(
                config.connect_timeout,
                Connection::connect(config.url.expose_secret(), props),
            )
            .await;
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
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "RabbitMQ connection failed")
                }
                Err(_) => tracing::warn!(
                    backoff_ms = backoff.as_millis() as u64,
                    "RabbitMQ connection attempt timed out"
                ),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(config.max_backoff);
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
