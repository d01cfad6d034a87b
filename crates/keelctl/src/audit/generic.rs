//! Checks every registered service owes by what its registry entry says (P02, P08, P05).
//!
//! Applied to each service automatically: a database with an `outbox` has nothing unsent past
//! the bound (its relay works), one with a `jobs` table has no job failed for good (nothing
//! waits on an operator), and each queue a service consumes exists, has a consumer and is not
//! backed up. Nothing here names a service.

use std::time::Duration;

use keel_config::ExposeSecret;
use sqlx::PgConnection;

use super::{AuditError, Check, db};
use crate::targets::Targets;
use crate::{AuditBounds, RabbitTarget};

/// The outbox and job-queue checks of one service's database (those of its tables it has).
pub async fn database_checks(
    service: &str,
    conn: &mut PgConnection,
    bounds: &AuditBounds,
) -> Result<Vec<Check>, AuditError> {
    let mut checks = Vec::new();
    if crate::has_table(conn, "outbox")
        .await
        .map_err(db(service))?
    {
        checks.push(outbox_drained(service, conn, bounds.outbox_within).await?);
    }
    if crate::has_table(conn, "jobs").await.map_err(db(service))? {
        checks.push(no_failed_jobs(service, conn).await?);
    }
    Ok(checks)
}

/// Gated: a row younger than `within` may be on its way to the broker right now.
async fn outbox_drained(
    service: &str,
    conn: &mut PgConnection,
    within: Duration,
) -> Result<Check, AuditError> {
    let (old, young): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE created_at < now() - make_interval(secs => $1)),
                count(*) FILTER (WHERE created_at >= now() - make_interval(secs => $1))
           FROM outbox",
    )
    .bind(within.as_secs_f64())
    .fetch_one(&mut *conn)
    .await
    .map_err(db(service))?;
    let late: Vec<(uuid::Uuid, String, f64, i32)> = sqlx::query_as(
        "SELECT id, event_type, extract(epoch FROM now() - created_at)::float8, attempts
           FROM outbox
          WHERE sent_at IS NULL AND created_at < now() - make_interval(secs => $1)
          ORDER BY seq",
    )
    .bind(within.as_secs_f64())
    .fetch_all(conn)
    .await
    .map_err(db(service))?;
    Ok(Check::new(
        format!("{service}.outbox_drained"),
        format!(
            "{service} outbox: nothing unsent after {}s",
            within.as_secs()
        ),
        old,
        "outbox rows",
        late.into_iter()
            .map(|(id, event, age, attempts)| {
                format!("event {id} ({event}) unsent for {age:.0}s, {attempts} attempts")
            })
            .collect(),
    )
    .gated(within, young))
}

async fn no_failed_jobs(service: &str, conn: &mut PgConnection) -> Result<Check, AuditError> {
    let failed: Vec<(uuid::Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT id, queue, last_error FROM jobs WHERE state = $1 ORDER BY created_at",
    )
    .bind(keel_pg::jobs::JobState::Failed)
    .fetch_all(&mut *conn)
    .await
    .map_err(db(service))?;
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(conn)
        .await
        .map_err(db(service))?;
    Ok(Check::new(
        format!("{service}.no_failed_jobs"),
        format!("{service} jobs: none failed for good"),
        all,
        "jobs",
        failed
            .into_iter()
            .map(|(id, q, e)| format!("job {id} ({q}): {}", e.unwrap_or_default()))
            .collect(),
    ))
}

/// Every queue a registered service consumes: it exists, is consumed, and is not backed up.
pub async fn queues(
    targets: &Targets,
    bounds: &AuditBounds,
    rabbit: &RabbitTarget,
) -> Result<Vec<Check>, AuditError> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| AuditError::Broker(e.to_string()))?;
    let mut checks = Vec::new();
    let consumed = targets
        .all
        .iter()
        .flat_map(|t| t.service.consumes.iter().map(move |q| (&t.service.name, q)));
    for (service, queue) in consumed {
        let url = format!(
            "{}/api/queues/{}/{}",
            rabbit.management_url.trim_end_matches('/'),
            super::urlencode(&rabbit.vhost),
            super::urlencode(queue)
        );
        let res = client
            .get(url)
            .basic_auth(&rabbit.username, Some(rabbit.password.expose_secret()))
            .send()
            .await
            .map_err(|e| AuditError::Broker(e.to_string()))?;
        let id = format!("queue:{queue}");
        let name = format!(
            "queue {queue} ({service}): consumed, backlog <= {}",
            bounds.max_queue_backlog
        );
        if res.status() == reqwest::StatusCode::NOT_FOUND {
            checks.push(Check::new(
                id,
                name,
                0,
                "messages",
                vec![format!("queue {queue} does not exist")],
            ));
            continue;
        }
        let body: serde_json::Value = res
            .error_for_status()
            .map_err(|e| AuditError::Broker(e.to_string()))?
            .json()
            .await
            .map_err(|e| AuditError::Broker(e.to_string()))?;
        let ready = body["messages_ready"].as_u64().unwrap_or(0);
        let consumers = body["consumers"].as_u64().unwrap_or(0);
        // What the rule judged: every message routed to the queue so far, of which at most
        // the bound may still wait. The management API samples these counters (every 5 s by
        // default), so a message published a moment ago may not be counted yet.
        let routed = body["message_stats"]["publish"].as_i64().unwrap_or(0);
        let mut broken = Vec::new();
        if consumers == 0 {
            broken.push(format!("queue {queue} has no consumer"));
        }
        if ready > bounds.max_queue_backlog {
            broken.push(format!("queue {queue} has {ready} ready messages"));
        }
        checks.push(Check::new(id, name, routed, "messages", broken));
    }
    Ok(checks)
}
