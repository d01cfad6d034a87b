//! `keelctl jobs`: every registered service's job queue (P08), listed and retried.
//!
//! Generic over the registry: any service with a database and a `jobs` table (the platform's
//! job queue, `keel_pg::jobs`) is covered; one without the table is skipped with a note, not an
//! error, so `keelctl jobs` works across a fleet where only some services run jobs. `--state`
//! is an enum and `--limit` is bounded by clap, so a typo is a usage error before any query.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::targets::Target;
use keel_config::SecretString;

/// `--state`: the states of the platform's job queue as a command-line choice. Its own enum
/// because the platform's ([`keel_pg::jobs::JobState`], the one mapping to `jobs.state`)
/// carries no clap derive; clap spells these in lowercase, as the table does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl From<JobState> for keel_pg::jobs::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => Self::Queued,
            JobState::Running => Self::Running,
            JobState::Succeeded => Self::Succeeded,
            JobState::Failed => Self::Failed,
        }
    }
}

/// One job, with the service whose queue holds it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub service: String,
    pub id: Uuid,
    pub queue: String,
    pub state: keel_pg::jobs::JobState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Why a listing or a retry could not run.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("{service} database: {source}")]
    Database {
        service: String,
        source: sqlx::Error,
    },
    #[error("{service} job queue: {source}")]
    Queue {
        service: String,
        source: keel_pg::PgError,
    },
}

/// What a listing found: rows, and the services that have no job queue.
#[derive(Debug, Default)]
pub struct Listing {
    pub rows: Vec<JobRow>,
    pub without_queue: Vec<String>,
}

/// Jobs of each target in `state` (every state if `None`), newest first, at most `limit` per
/// service.
pub async fn list(
    targets: &[(&Target, &SecretString)],
    state: Option<JobState>,
    limit: i64,
) -> Result<Listing, JobsError> {
    let mut listing = Listing::default();
    for (target, url) in targets {
        let service = target.service.name.clone();
        let db = |source| JobsError::Database {
            service: service.clone(),
            source,
        };
        let mut conn = crate::connect(url).await.map_err(db)?;
        if !crate::has_table(&mut conn, "jobs").await.map_err(db)? {
            listing.without_queue.push(service.clone());
            continue;
        }
        let jobs = keel_pg::jobs::list(&mut conn, state.map(Into::into), limit)
            .await
            .map_err(|source| JobsError::Queue {
                service: service.clone(),
                source,
            })?;
        listing.rows.extend(jobs.into_iter().map(|j| JobRow {
            service: service.clone(),
            id: j.id,
            queue: j.queue,
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            run_at: j.run_at,
            last_error: j.last_error,
        }));
    }
    Ok(listing)
}

/// Puts failed job `id` back in its queue, in whichever target holds it. Returns the service
/// it was found in, or `None` when no target has it failed.
pub async fn retry(
    targets: &[(&Target, &SecretString)],
    id: Uuid,
) -> Result<Option<String>, JobsError> {
    for (target, url) in targets {
        let service = target.service.name.clone();
        let db = |source| JobsError::Database {
            service: service.clone(),
            source,
        };
        let mut conn = crate::connect(url).await.map_err(db)?;
        if !crate::has_table(&mut conn, "jobs").await.map_err(db)? {
            continue;
        }
        let retried = keel_pg::jobs::retry_failed(&mut conn, id)
            .await
            .map_err(|source| JobsError::Queue {
                service: service.clone(),
                source,
            })?;
        if retried {
            return Ok(Some(service));
        }
    }
    Ok(None)
}

/// The listing as a table of 100 columns. The id stays whole (it is what `jobs retry` takes);
/// `run_at` is left to `--output json`, so the error has room to be read.
pub fn table(rows: &[JobRow]) -> comfy_table::Table {
    let mut t = crate::output::table(["id", "service", "queue", "state", "tries", "last error"]);
    for j in rows {
        t.add_row([
            j.id.to_string(),
            j.service.clone(),
            j.queue.clone(),
            j.state.to_string(),
            format!("{}/{}", j.attempts, j.max_attempts),
            j.last_error.clone().unwrap_or_default(),
        ]);
    }
    crate::output::keep_whole(&mut t, &[0, 3, 4]);
    t
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn each_state_choice_is_spelled_as_the_state_it_selects() {
        for choice in JobState::value_variants() {
            let name = choice.to_possible_value().unwrap();
            let state = keel_pg::jobs::JobState::from(*choice);
            assert_eq!(name.get_name(), state.as_str());
        }
        assert_eq!(
            JobState::value_variants().len(),
            keel_pg::jobs::JobState::ALL.len()
        );
    }
}
