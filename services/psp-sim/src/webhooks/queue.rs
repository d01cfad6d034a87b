//! The webhook queue and the records behind it (the provider's side of P32).
//!
//! A capture first reserves a place on the bounded queue ([`Webhooks::reserve`]), then changes
//! the authorization's state, then sends through the reservation: so a capture is either
//! refused (503, nothing changed) or certain to have its webhook queued — never a capture
//! without its webhook, never an unbounded backlog. Each webhook is recorded with the exact
//! bytes that are signed and sent on every attempt and redelivery.
//!
//! Must not break: the body is serialized once, in [`Reservation::send_captured`]; a
//! redelivery queues those same bytes under the same id.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use chrono::Utc;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dispatch::{self, Dispatcher};
use super::{AttemptRecord, DeliveryStatus, WebhookConfig, WebhookError, WebhookRecord};
use crate::error::ApiError;
use crate::store::{BoundedMap, StoreConfig, lock};

/// The event type of the only webhook the simulator sends.
const CAPTURED: &str = "payment.captured";

/// The event a capture announces.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedEvent<'a> {
    pub authorization_id: &'a str,
    pub reference: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    #[serde(rename = "type")]
    event_type: &'a str,
    data: T,
}

/// A delivery waiting for a sender.
pub(super) struct Job {
    pub(super) id: String,
    pub(super) body: Bytes,
    pub(super) delivery: u32,
    /// Runs when the sender picks the job up (the simulated settlement of a capture).
    pub(super) on_dispatch: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// The sent webhooks (`store.max_webhooks`, oldest forgotten), shared by the queue, the
/// sender and the admin routes.
#[derive(Debug)]
pub(super) struct Records {
    map: Mutex<BoundedMap<String, WebhookRecord>>,
    /// Attempts kept per record: redeliveries must not grow a record forever.
    keep_attempts: usize,
}

impl Records {
    fn new(capacity: usize, keep_attempts: usize) -> Self {
        Self {
            map: Mutex::new(BoundedMap::new("webhooks", capacity)),
            keep_attempts,
        }
    }

    pub(super) fn set_status(&self, id: &str, status: DeliveryStatus) {
        if let Some(r) = lock(&self.map).get_mut(id) {
            r.status = status;
        }
    }

    pub(super) fn record_attempt(&self, id: &str, attempt: AttemptRecord) {
        if let Some(r) = lock(&self.map).get_mut(id) {
            if r.attempts.len() >= self.keep_attempts {
                r.attempts.remove(0);
            }
            r.attempts.push(attempt);
        }
    }
}

/// The task that delivers queued webhooks.
#[derive(Debug)]
pub struct Sender {
    dispatcher: Dispatcher,
    rx: mpsc::Receiver<Job>,
    max_concurrent: usize,
}

impl Sender {
    /// Delivers until `stop` is cancelled; what is still queued then is abandoned.
    pub async fn run(self, stop: CancellationToken) {
        dispatch::run(self.dispatcher, self.rx, self.max_concurrent, stop).await;
    }
}

/// The webhook side of the simulator: records and the queue in front of the sender.
#[derive(Debug)]
pub struct Webhooks {
    queue: mpsc::Sender<Job>,
    records: Arc<Records>,
}

impl Webhooks {
    /// The queue and its sender; the sender does nothing until [`Sender::run`] is awaited
    /// (the service runtime starts it when the service runs).
    pub fn new(
        config: &WebhookConfig,
        store: &StoreConfig,
    ) -> Result<(Arc<Self>, Sender), WebhookError> {
        let keep_attempts = usize::try_from(config.max_attempts).unwrap_or(usize::MAX);
        let records = Arc::new(Records::new(store.max_webhooks, keep_attempts));
        let dispatcher = Dispatcher::new(config, Arc::clone(&records))?;
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let sender = Sender {
            dispatcher,
            rx,
            max_concurrent: config.max_concurrent,
        };
        Ok((Arc::new(Self { queue, records }), sender))
    }

    /// Reserves a place on the queue, so a capture changes state only if its webhook can
    /// be sent: 503 when the queue is full or the sender has stopped.
    pub fn reserve(&self) -> Result<Reservation<'_>, ApiError> {
        match self.queue.try_reserve() {
            Ok(permit) => Ok(Reservation {
                permit,
                queue: &self.queue,
                records: &self.records,
            }),
            Err(mpsc::error::TrySendError::Full(())) => {
                metrics::counter!("psp_webhook_queue_full_total").increment(1);
                Err(ApiError::Busy)
            }
            Err(mpsc::error::TrySendError::Closed(())) => Err(ApiError::ShuttingDown),
        }
    }

    /// The newest `limit` webhooks, newest first, optionally only those of one authorization.
    pub fn list(&self, authorization_id: Option<&str>, limit: usize) -> Vec<WebhookRecord> {
        lock(&self.records.map)
            .values()
            .rev()
            .filter(|r| authorization_id.is_none_or(|a| r.authorization_id == a))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Sends webhook `id` again: same id and body, new timestamp and signature.
    pub fn redeliver(&self, id: &str) -> Result<WebhookRecord, ApiError> {
        let reservation = self.reserve()?;
        let (body, delivery, record) = {
            let mut records = lock(&self.records.map);
            let record = records.get_mut(id).ok_or(ApiError::NotFound)?;
            record.deliveries += 1;
            record.status = DeliveryStatus::Pending;
            (record.raw.clone(), record.deliveries, record.clone())
        };
        reservation.send(Job {
            id: id.to_owned(),
            body,
            delivery,
            on_dispatch: None,
        });
        Ok(record)
    }
}

/// A place on the webhook queue, held while the caller changes state.
#[derive(Debug)]
pub struct Reservation<'a> {
    permit: mpsc::Permit<'a, Job>,
    queue: &'a mpsc::Sender<Job>,
    records: &'a Records,
}

impl Reservation<'_> {
    /// Records and queues a `payment.captured` webhook; `on_dispatch` runs when a sender
    /// picks it up. Returns the webhook id.
    pub fn send_captured(
        self,
        event: &CapturedEvent<'_>,
        on_dispatch: impl FnOnce() + Send + 'static,
    ) -> String {
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let envelope = Envelope {
            event_type: CAPTURED,
            data: event,
        };
        // Serialized once: these exact bytes are signed and sent on every attempt.
        let raw = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
        let record = WebhookRecord {
            id: id.clone(),
            event_type: CAPTURED,
            authorization_id: event.authorization_id.to_owned(),
            created_at: Utc::now(),
            status: DeliveryStatus::Pending,
            deliveries: 1,
            attempts: Vec::new(),
            body: serde_json::from_slice(&raw).unwrap_or_default(),
            raw: raw.clone(),
        };
        lock(&self.records.map).insert(id.clone(), record);
        self.send(Job {
            id: id.clone(),
            body: raw,
            delivery: 1,
            on_dispatch: Some(Box::new(on_dispatch)),
        });
        id
    }

    fn send(self, job: Job) {
        let queue = self.queue;
        self.permit.send(job);
        metrics::gauge!("psp_webhook_queue_depth")
            .set((queue.max_capacity() - queue.capacity()) as f64);
    }
}
