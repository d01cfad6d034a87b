//! `keelctl outbox`: the unsent backlog of every registered service's outbox (P02).
//!
//! Generic over the registry like `keelctl jobs`: every service with a database and an
//! `outbox` table is listed; a growing `unsent` or an old `oldest` means its relay is stuck or
//! the broker refuses it (the P02 page says how to tell which).

use keel_config::SecretString;
use serde::Serialize;

use crate::targets::Target;

/// One service's backlog.
#[derive(Debug, Clone, Serialize)]
pub struct BacklogRow {
    pub service: String,
    pub unsent: i64,
    pub oldest_unsent_seconds: f64,
}

/// Why the backlog could not be read.
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
#[derive(Debug, Default)]
pub struct Listing {
    pub rows: Vec<BacklogRow>,
    pub without_outbox: Vec<String>,
}

/// The backlog of each target.
pub async fn backlogs(targets: &[(&Target, &SecretString)]) -> Result<Listing, OutboxError> {
    let mut listing = Listing::default();
    for (target, url) in targets {
        let service = target.service.name.clone();
        let db = |source| OutboxError::Database {
            service: service.clone(),
            source,
        };
        let mut conn = crate::connect(url).await.map_err(db)?;
        if !crate::has_table(&mut conn, "outbox").await.map_err(db)? {
            listing.without_outbox.push(service);
            continue;
        }
        let b = keel_pg::outbox::backlog(&mut conn)
            .await
            .map_err(|source| OutboxError::Outbox {
                service: service.clone(),
                source,
            })?;
        listing.rows.push(BacklogRow {
            service,
            unsent: b.unsent,
            oldest_unsent_seconds: b.oldest_unsent_seconds,
        });
    }
    Ok(listing)
}

/// The listing as a table of 100 columns.
pub fn table(rows: &[BacklogRow]) -> comfy_table::Table {
    let mut t = crate::output::table(["service", "unsent", "oldest unsent"]);
    for r in rows {
        t.add_row([
            r.service.clone(),
            r.unsent.to_string(),
            format!("{:.1} s", r.oldest_unsent_seconds),
        ]);
    }
    t
}
