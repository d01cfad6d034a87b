//! The `table_rows{table, state}` gauges: which rows each counts, and how a count stays cheap
//! (exact up to a limit of rows read, the planner's estimate past it; see the module docs of
//! [`super`]).

use sqlx::PgPool;

use super::policy::state_is;
use crate::PgError;
use crate::jobs::JobState;

/// A `table_rows` gauge: which rows of which table it counts.
#[derive(Debug, Clone)]
pub(super) struct Count {
    pub(super) table: &'static str,
    state: &'static str,
    /// SQL the platform writes itself; `None`: every row.
    filter: Option<String>,
}

impl Count {
    pub(super) fn new(table: &'static str, state: &'static str, filter: Option<&str>) -> Self {
        Self {
            table,
            state,
            filter: filter.map(str::to_owned),
        }
    }

    pub(super) fn platform() -> Vec<Self> {
        let mut counts = vec![
            // The relay's working set: small, under outbox_unsent.
            Self::new(
                "outbox",
                "unsent",
                Some("sent_at IS NULL AND parked_at IS NULL"),
            ),
            Self::new(
                "outbox",
                "parked",
                Some("sent_at IS NULL AND parked_at IS NOT NULL"),
            ),
            // Bounded by outbox_sent_age, possibly large: under outbox_sent.
            Self::new("outbox", "sent", Some("sent_at IS NOT NULL")),
            Self::new("inbox", "all", None),
            Self::new("idempotency_keys", "all", None),
        ];
        // Queued and running under jobs_claimable, succeeded and failed under jobs_finished.
        for state in JobState::ALL {
            counts.push(Count {
                table: "jobs",
                state: state.as_str(),
                filter: Some(state_is(state)),
            });
        }
        counts
    }

    fn predicate(&self) -> String {
        self.filter
            .as_deref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default()
    }

    /// Exact up to `limit` rows read; past it, the planner's estimate (the docs of
    /// [`crate::retention`]).
    pub(super) async fn rows(&self, pool: &PgPool, limit: i64) -> Result<TableRows, PgError> {
        let (table, predicate) = (self.table, self.predicate());
        let mut conn = pool.acquire().await?;
        let exact: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM (SELECT 1 FROM {table}{predicate} LIMIT $1) s"
        )))
        .bind(limit.saturating_add(1))
        .fetch_one(&mut *conn)
        .await?;
        let mut counted = TableRows {
            table: self.table,
            state: self.state,
            rows: exact,
            estimated: false,
        };
        if exact > limit {
            let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM {table}{predicate}"
            )))
            .fetch_one(&mut *conn)
            .await?;
            let estimate = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
            // Float to integer: saturating, and the estimate is whole rows anyway.
            #[allow(clippy::cast_possible_truncation)]
            let estimate = estimate as i64;
            counted.rows = estimate.max(exact);
            counted.estimated = true;
        }
        Ok(counted)
    }
}

/// One `table_rows` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRows {
    pub table: &'static str,
    pub state: &'static str,
    pub rows: i64,
    /// The planner's estimate: the exact count would have read more than the limit.
    pub estimated: bool,
}
