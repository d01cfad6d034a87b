//! The email job on keel-pg's Postgres queue (P08): its queue, its typed payload, and the one
//! call the consumer makes to enqueue it.
//!
//! [`enqueue`] runs inside the consumer's transaction, next to the notification row, its inbox
//! row and its outbox event (`crate::journey_events`): "the customer is to be told" and "an
//! email is scheduled" commit together or not at all. The payload is a struct serialized with
//! serde (as crates.io types its jobs, and checkout its saga job): the worker gets an
//! [`EmailJob`] or a decode error, never a `serde_json::Value` to pick fields out of.
//!
//! One job per notification, whose id is the notification's: operators go from a row of
//! `keelctl jobs` to the notification and to the email's Message-ID, and enqueueing twice is a
//! no-op. (Another delivery of the same notification, a customer webhook, needs ids of its own.)
//!
//! Must not break: the payload's field names are stored in `jobs.payload` of queued jobs; a
//! rename needs the old name accepted too (`#[serde(alias)]`) until no such job is left.

use std::time::Duration;

use keel_pg::PgError;
use keel_pg::jobs::{self, Job, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// The job queue email jobs run on.
pub const EMAIL_QUEUE: &str = "email.send";

/// The `max_attempts` every email job is enqueued with: the queue's backstop, and the
/// largest `email.max_attempts` the configuration accepts.
///
/// The consumer that enqueues the job does not carry the email configuration, so the
/// configured bound is applied by the worker that runs it ([`super::Mailer`] fails the job once
/// `email.max_attempts` attempts have failed). That also makes a changed bound apply to jobs
/// already queued. `keelctl jobs` therefore shows this ceiling as the job's maximum; the job's
/// `last_error` says when `email.max_attempts` ended it.
pub const MAX_ATTEMPTS_CEILING: i32 = 10_000;

/// The payload of an email job: which notification to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailJob {
    pub notification_id: Uuid,
}

/// The payload of the other email on the queue: telling an endpoint's owner that Keel disabled
/// it (`crate::webhooks`). Its job id is the endpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointDisabledJob {
    pub disabled_endpoint_id: Uuid,
}

/// What an `email.send` job asks for (told apart by their one field's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AnyEmailJob {
    Notification(EmailJob),
    EndpointDisabled(EndpointDisabledJob),
}

impl AnyEmailJob {
    /// The payload of a claimed job.
    pub fn from_job(job: &Job) -> Result<Self, PayloadError> {
        Ok(Self::deserialize(&job.payload)?)
    }
}

/// A job whose payload is not an [`EmailJob`] (a bug or a hand-edited row: retrying cannot
/// fix it, so the job fails for an operator).
#[derive(Debug, thiserror::Error)]
#[error("email job payload: {0}")]
pub struct PayloadError(#[from] serde_json::Error);

impl EmailJob {
    /// The job to enqueue, due now.
    pub fn to_new_job(&self) -> Result<NewJob<'static>, PayloadError> {
        Ok(NewJob {
            queue: EMAIL_QUEUE,
            payload: serde_json::to_value(self)?,
            max_attempts: MAX_ATTEMPTS_CEILING,
            delay: Duration::ZERO,
            id: Some(self.notification_id),
        })
    }

    /// The payload of a claimed job.
    pub fn from_job(job: &Job) -> Result<Self, PayloadError> {
        Ok(Self::deserialize(&job.payload)?)
    }
}

/// Schedules the email of notification `notification_id`, inside the caller's transaction
/// (never a transaction of its own).
pub async fn enqueue(conn: &mut PgConnection, notification_id: Uuid) -> Result<(), PgError> {
    let job = EmailJob { notification_id }
        .to_new_job()
        .map_err(|e| PgError::Encode(e.to_string()))?;
    jobs::enqueue(conn, &job).await?;
    Ok(())
}

/// Schedules the email telling endpoint `endpoint_id`'s owner it was disabled, inside the
/// caller's transaction (the one that disabled it).
pub async fn enqueue_endpoint_disabled(
    conn: &mut PgConnection,
    endpoint_id: Uuid,
) -> Result<(), PgError> {
    let payload = serde_json::to_value(EndpointDisabledJob {
        disabled_endpoint_id: endpoint_id,
    })
    .map_err(|e| PgError::Encode(e.to_string()))?;
    jobs::enqueue(
        conn,
        &NewJob {
            queue: EMAIL_QUEUE,
            payload,
            max_attempts: MAX_ATTEMPTS_CEILING,
            delay: Duration::ZERO,
            id: Some(endpoint_id),
        },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_a_notification_id_and_nothing_else() {
        let new = EmailJob {
            notification_id: Uuid::nil(),
        }
        .to_new_job()
        .unwrap();
        assert_eq!(new.queue, "email.send");
        assert_eq!(
            new.payload,
            serde_json::json!({"notification_id": "00000000-0000-0000-0000-000000000000"})
        );
        assert_eq!(new.id, Some(Uuid::nil()));
        assert!(EmailJob::deserialize(&serde_json::json!({"id": "x"})).is_err());
    }

    #[test]
    fn the_two_kinds_of_email_job_are_told_apart_by_their_field() {
        let id = "00000000-0000-0000-0000-000000000000";
        assert!(matches!(
            AnyEmailJob::deserialize(&serde_json::json!({"notification_id": id})).unwrap(),
            AnyEmailJob::Notification(_)
        ));
        assert!(matches!(
            AnyEmailJob::deserialize(&serde_json::json!({"disabled_endpoint_id": id})).unwrap(),
            AnyEmailJob::EndpointDisabled(_)
        ));
        assert!(AnyEmailJob::deserialize(&serde_json::json!({"other": id})).is_err());
    }
}
