//! What a retention run deletes: one [`Policy`] per table (or per state of one), the
//! platform's own ([`Policy::platform`]) and a service's, and the batched statement each runs.
//!
//! Must not break: the platform's predicates. Sent outbox rows only (an unsent or parked row
//! is work not yet done); succeeded jobs, and failed ones only when configured; names reach
//! SQL only as plain identifiers.

use std::time::Duration;

use sqlx::PgPool;

use super::RetentionConfig;
use crate::jobs::JobState;
use crate::{PgError, millis};

/// A policy that cannot be run: its names are not plain SQL identifiers.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// Table, column and function names are put into SQL text (they cannot be parameters),
    /// so only plain lowercase identifiers are accepted: `[a-z_][a-z0-9_]*`, at most 63 bytes.
    #[error("retention policy: `{0}` is not a plain lowercase SQL identifier")]
    Identifier(String),
}

fn identifier(name: &str) -> Result<(), RetentionError> {
    let mut chars = name.chars();
    let plain = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        Ok(())
    } else {
        Err(RetentionError::Identifier(name.to_owned()))
    }
}

/// Which rows of one table a run purges, and how.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) table: &'static str,
    pub(super) state: &'static str,
    age: Duration,
    how: How,
}

#[derive(Debug, Clone)]
enum How {
    /// `DELETE` the rows whose `column` is older than the age (and match `filter`, SQL the
    /// platform writes itself), oldest first.
    Delete {
        column: &'static str,
        filter: Option<String>,
        /// Skip rows another transaction holds (`FOR UPDATE SKIP LOCKED`) rather than wait for
        /// them. Locking needs UPDATE on the table, which a service's table may not grant.
        skip_locked: bool,
    },
    /// `SELECT function(older_than interval, max_rows int)`, which deletes and returns how
    /// many: for a table the runtime role may not delete from.
    Function { function: &'static str },
}

impl Policy {
    /// Rows of `table` whose timestamp `column` is older than `age`, deleted directly. The
    /// runtime role needs `SELECT` and `DELETE` on the table, nothing more; `column` should be
    /// indexed. A row another transaction holds is waited for, then checked again (the
    /// platform's own tables skip such rows instead, which needs UPDATE).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let receipts = keel_pg::retention::Policy::older_than(
    ///     "webhook_receipts", "received_at", Duration::from_secs(90 * 86_400));
    /// ```
    pub fn older_than(table: &'static str, column: &'static str, age: Duration) -> Self {
        Self {
            table,
            state: "all",
            age,
            how: How::Delete {
                column,
                filter: None,
                skip_locked: false,
            },
        }
    }

    /// Rows of `table` purged by calling `function(older_than interval, max_rows integer)
    /// RETURNS bigint` (the rows it deleted): the way to purge a table the runtime role may
    /// not `DELETE` from. The function, `SECURITY DEFINER` and owned by the table's owner,
    /// decides what may go; billing's `purge_webhook_receipts` refuses to delete any receipt
    /// younger than a day, whatever it is asked.
    pub fn function(table: &'static str, function: &'static str, age: Duration) -> Self {
        Self {
            table,
            state: "all",
            age,
            how: How::Function { function },
        }
    }

    /// The table it purges (the `table` label of its metrics).
    pub fn table(&self) -> &'static str {
        self.table
    }

    /// Which of the table's rows (the `state` label): `sent`, `succeeded`, `all`, ...
    pub fn state(&self) -> &'static str {
        self.state
    }

    /// How old a row must be to go.
    pub fn age(&self) -> Duration {
        self.age
    }

    /// Checks that its names are plain SQL identifiers ([`RetentionError::Identifier`]).
    pub fn validate(&self) -> Result<(), RetentionError> {
        identifier(self.table)?;
        match &self.how {
            How::Delete { column, .. } => identifier(column),
            How::Function { function } => identifier(function),
        }
    }

    fn delete(
        table: &'static str,
        state: &'static str,
        column: &'static str,
        filter: Option<String>,
        age: Duration,
    ) -> Self {
        Self {
            table,
            state,
            age,
            how: How::Delete {
                column,
                filter,
                skip_locked: true,
            },
        }
    }

    /// The platform tables' policies under `config`: the table in [`crate::retention`]'s docs.
    pub fn platform(config: &RetentionConfig) -> Vec<Self> {
        let mut policies = vec![
            Self::delete("outbox", "sent", "sent_at", None, config.outbox_sent_age),
            Self::delete("inbox", "all", "received_at", None, config.inbox_age),
            Self::delete(
                "jobs",
                JobState::Succeeded.as_str(),
                "finished_at",
                Some(state_is(JobState::Succeeded)),
                config.jobs_succeeded_age,
            ),
        ];
        if let Some(age) = config.jobs_failed_age {
            policies.push(Self::delete(
                "jobs",
                JobState::Failed.as_str(),
                "finished_at",
                Some(state_is(JobState::Failed)),
                age,
            ));
        }
        policies.push(Self::delete(
            "idempotency_keys",
            "expired",
            "expires_at",
            None,
            Duration::ZERO,
        ));
        policies
    }

    /// One batch: the rows it deleted.
    pub(super) async fn purge_batch(&self, pool: &PgPool, batch: i64) -> Result<u64, PgError> {
        let table = self.table;
        let mut conn = pool.acquire().await?;
        match &self.how {
            How::Delete {
                column,
                filter,
                skip_locked,
            } => {
                let and = filter
                    .as_deref()
                    .map(|f| format!(" AND {f}"))
                    .unwrap_or_default();
                let lock = if *skip_locked {
                    " FOR UPDATE SKIP LOCKED"
                } else {
                    ""
                };
                // Chosen and deleted in one statement. ORDER BY the indexed age column: oldest
                // first, a range scan. A row updated between the two parts has a new ctid and
                // is left alone (the DELETE re-checks the version it waited for).
                let sql = format!(
                    "DELETE FROM {table} WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM {table}
                          WHERE {column} < now() - make_interval(secs => $1::float8 / 1000){and}
                          ORDER BY {column}
                          LIMIT $2{lock}))"
                );
                Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(millis(self.age))
                    .bind(batch)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected())
            }
            How::Function { function } => {
                let sql = format!(
                    "SELECT {function}(make_interval(secs => $1::float8 / 1000), $2::int4)"
                );
                let deleted: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(millis(self.age))
                    .bind(i32::try_from(batch).unwrap_or(i32::MAX))
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(deleted.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
            }
        }
    }
}

/// `state = '<state>'`, the state as a constant: a bound parameter would keep a generic plan
/// from matching the partial index `jobs_finished` (see [`crate::jobs::claim`]).
pub(super) fn state_is(state: JobState) -> String {
    format!("state = '{}'", state.as_str())
}

/// What one run did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    pub table: &'static str,
    pub state: &'static str,
    /// Rows deleted.
    pub rows: u64,
    /// Statements run.
    pub batches: u32,
    /// Stopped at `max_batches` with a full last batch: more rows may be old enough.
    pub more_left: bool,
}

/// One run over every policy: what went, and which tables failed (and why).
#[derive(Debug, Default)]
pub struct RunReport {
    pub purged: Vec<Purged>,
    pub failed: Vec<(&'static str, &'static str, PgError)>,
}

impl RunReport {
    /// Rows deleted from `table` (all its states).
    pub fn rows(&self, table: &str) -> u64 {
        self.purged
            .iter()
            .filter(|p| p.table == table)
            .map(|p| p.rows)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_plain_identifiers_reach_sql() {
        for good in ["webhook_receipts", "received_at", "_t1"] {
            identifier(good).unwrap();
        }
        for bad in ["", "Receipts", "t; DROP TABLE x", "a.b", "1t", "t\"x"] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn platform_policies_never_touch_unsent_rows_or_unfinished_jobs() {
        let policies = Policy::platform(&RetentionConfig::default());
        let described: Vec<String> = policies
            .iter()
            .map(|p| match &p.how {
                How::Delete { column, filter, .. } => {
                    format!("{}.{column} {}", p.table, filter.as_deref().unwrap_or(""))
                }
                How::Function { function } => function.to_string(),
            })
            .collect();
        assert_eq!(
            described,
            [
                "outbox.sent_at ",
                "inbox.received_at ",
                "jobs.finished_at state = 'succeeded'",
                "idempotency_keys.expires_at ",
            ]
        );
    }
}
