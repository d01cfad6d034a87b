//! `keelctl outbox`: every registered service's outbox (P02): the unsent backlog, the rows the
//! relay parked, and returning parked rows to the relay.
//!
//! Generic over the registry like `keelctl jobs`: every service with a database and an
//! `outbox` table is covered; one without the table is skipped with a note. A growing
//! `unsent` or an old `oldest` means its relay is stuck or the broker refuses it (the P02 page
//! says how to tell which); a `parked` row is one the broker kept refusing (nacked) or that
//! is too large to send: it waits for an operator, and so do the later rows of its aggregate.
//! `outbox parked` reads (`SELECT` on `outbox`); `outbox retry` changes only `parked_at` and
//! `attempts` (`keel_pg::outbox::unpark`), so the relay tries the row again with a fresh set
//! of attempts.

use chrono::{DateTime, Utc};
use keel_config::SecretString;
use serde::Serialize;
use uuid::Uuid;

use crate::targets::Target;

/// One service's backlog.
#[derive(Debug, Clone, Serialize)]
pub struct BacklogRow {
    pub service: String,
    /// Unsent rows the relay still tries.
    pub unsent: i64,
    pub oldest_unsent_seconds: f64,
    /// Rows parked for an operator (`keelctl outbox parked`).
    pub parked: i64,
}

/// One parked row, with the service whose outbox holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedRow {
    pub service: String,
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    /// Why the relay parked it (its last refusal).
    pub reason: Option<String>,
    pub parked_at: DateTime<Utc>,
}

/// Why a command could not read or change an outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{service} database: {source}")]
    Database {
        service: String,
        source: sqlx::Error,
    },
    #[error("{service} outbox: {source}")]
    Outbox {
        service: String,
        source: keel_pg::PgError,
    },
}

/// What a listing found: rows, and the services that have no outbox.
#[derive(Debug)]
pub struct Listing<T> {
    pub rows: Vec<T>,
    pub without_outbox: Vec<String>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            without_outbox: Vec::new(),
        }
    }
}

/// A connection to `service`'s database at `url`, or `None` when it has no outbox table.
async fn outbox_of(
    url: &SecretString,
    service: &str,
) -> Result<Option<sqlx::PgConnection>, OutboxError> {
    let db = |source| OutboxError::Database {
        service: service.to_owned(),
        source,
    };
    let mut conn = crate::connect(url).await.map_err(db)?;
    if crate::has_table(&mut conn, "outbox").await.map_err(db)? {
        Ok(Some(conn))
    } else {
        Ok(None)
    }
}

fn outbox_error(service: &str) -> impl Fn(keel_pg::PgError) -> OutboxError + '_ {
    move |source| OutboxError::Outbox {
        service: service.to_owned(),
        source,
    }
}

/// The backlog of each target.
pub async fn backlogs(
    targets: &[(&Target, &SecretString)],
) -> Result<Listing<BacklogRow>, OutboxError> {
    let mut listing = Listing::default();
    for (target, url) in targets {
        let service = &target.service.name;
        let Some(mut conn) = outbox_of(url, service).await? else {
            listing.without_outbox.push(service.clone());
            continue;
        };
        let b = keel_pg::outbox::backlog(&mut conn)
            .await
            .map_err(outbox_error(service))?;
        listing.rows.push(BacklogRow {
            service: service.clone(),
            unsent: b.unsent,
            oldest_unsent_seconds: b.oldest_unsent_seconds,
            parked: b.parked,
        });
    }
    Ok(listing)
}

/// The parked rows of each target, oldest parked first, at most `limit` per service.
pub async fn parked(
    targets: &[(&Target, &SecretString)],
    limit: i64,
) -> Result<Listing<ParkedRow>, OutboxError> {
    let mut listing = Listing::default();
    for (target, url) in targets {
        let service = &target.service.name;
        let Some(mut conn) = outbox_of(url, service).await? else {
            listing.without_outbox.push(service.clone());
            continue;
        };
        let rows = keel_pg::outbox::parked(&mut conn, limit)
            .await
            .map_err(outbox_error(service))?;
        listing.rows.extend(rows.into_iter().map(|p| ParkedRow {
            service: service.clone(),
            id: p.id,
            aggregate_type: p.aggregate_type,
            aggregate_id: p.aggregate_id,
            event_type: p.event_type,
            attempts: p.attempts,
            reason: p.reason,
            parked_at: p.parked_at,
        }));
    }
    Ok(listing)
}

/// Returns parked row `id` to the relay, in whichever target holds it. Returns the service it
/// was found in, or `None` when no target has it parked.
pub async fn retry(
    targets: &[(&Target, &SecretString)],
    id: Uuid,
) -> Result<Option<String>, OutboxError> {
    for (target, url) in targets {
        let service = &target.service.name;
        let Some(mut conn) = outbox_of(url, service).await? else {
            continue;
        };
        if keel_pg::outbox::unpark(&mut conn, id)
            .await
            .map_err(outbox_error(service))?
        {
            return Ok(Some(service.clone()));
        }
    }
    Ok(None)
}

/// Returns every parked row of each target to the relay: how many, per service.
pub async fn retry_all(
    targets: &[(&Target, &SecretString)],
) -> Result<Vec<(String, u64)>, OutboxError> {
    let mut returned = Vec::new();
    for (target, url) in targets {
        let service = &target.service.name;
        let Some(mut conn) = outbox_of(url, service).await? else {
            continue;
        };
        let n = keel_pg::outbox::unpark_all(&mut conn)
            .await
            .map_err(outbox_error(service))?;
        returned.push((service.clone(), n));
    }
    Ok(returned)
}

/// The backlog as a table of 100 columns.
pub fn table(rows: &[BacklogRow]) -> comfy_table::Table {
    let mut t = crate::output::table(["service", "unsent", "oldest unsent", "parked"]);
    for r in rows {
        t.add_row([
            r.service.clone(),
            r.unsent.to_string(),
            format!("{:.1} s", r.oldest_unsent_seconds),
            r.parked.to_string(),
        ]);
    }
    t
}

/// The parked rows as a table of 100 columns. The id stays whole (it is what `outbox retry`
/// takes); the aggregate type and `parked_at`'s date are left to `--output json`, so the
/// reason has room to be read.
pub fn parked_table(rows: &[ParkedRow]) -> comfy_table::Table {
    let mut t = crate::output::table([
        "id",
        "service",
        "aggregate",
        "type",
        "tries",
        "reason",
        "parked at",
    ]);
    for r in rows {
        t.add_row([
            r.id.to_string(),
            r.service.clone(),
            r.aggregate_id.clone(),
            r.event_type.clone(),
            r.attempts.to_string(),
            r.reason.clone().unwrap_or_default(),
            r.parked_at.format("%H:%M:%S").to_string(),
        ]);
    }
    crate::output::keep_whole(&mut t, &[0, 4, 6]);
    t
}
