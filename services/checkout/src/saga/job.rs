//! The saga's job on keel-pg's Postgres queue (P08): its queue and its payload, typed.
//!
//! The payload is a struct serialized with serde, the way crates.io types its background
//! jobs: the handler gets a [`SagaJob`] or a decode error, never a `serde_json::Value` to pick
//! fields out of. One job per saga, whose id is the saga's: operators find one from the other,
//! and enqueueing it twice is a no-op.
//!
//! Must not break: the payload's field names are stored in `jobs.payload` of queued jobs; a
//! rename needs the old name accepted too (`#[serde(alias)]`) until no such job is left.

use std::time::Duration;

use keel_pg::jobs::{Job, NewJob};
use serde::{Deserialize, Serialize};

use super::state::SagaId;

/// The job queue saga jobs run on.
pub const SAGA_QUEUE: &str = "saga";

/// The payload of a saga's job: which saga to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaJob {
    pub saga_id: SagaId,
}

/// A job whose payload is not a [`SagaJob`] (a bug or a hand-edited row: retrying cannot fix
/// it, so the job fails for an operator).
#[derive(Debug, thiserror::Error)]
#[error("saga job payload: {0}")]
pub struct PayloadError(#[from] serde_json::Error);

impl SagaJob {
    /// The job to enqueue (in the transaction that creates the saga), due now.
    pub fn to_new_job(&self, max_attempts: i32) -> Result<NewJob<'static>, PayloadError> {
        Ok(NewJob {
            queue: SAGA_QUEUE,
            payload: serde_json::to_value(self)?,
            max_attempts,
            delay: Duration::ZERO,
            id: Some(self.saga_id.0),
        })
    }

    /// The payload of a claimed job.
    pub fn from_job(job: &Job) -> Result<Self, PayloadError> {
        Ok(Self::deserialize(&job.payload)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use uuid::Uuid;

    #[test]
    fn the_payload_is_a_saga_id_and_nothing_else() {
        let job = SagaJob {
            saga_id: SagaId(Uuid::nil()),
        };
        let new = job.to_new_job(5).unwrap();
        assert_eq!(
            new.payload,
            serde_json::json!({"saga_id": "00000000-0000-0000-0000-000000000000"})
        );
        assert_eq!(new.id, Some(Uuid::nil()));
        assert!(SagaJob::deserialize(&serde_json::json!({"saga": "x"})).is_err());
    }
}
