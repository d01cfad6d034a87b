//! The `payments` projection: one row per payment, the fold of its events (P10 read model).
//!
//! Live, the row is written by [`upsert`] in the transaction that appends the events, so a
//! reader never sees an event without its projection or the other way round. The upsert only
//! moves a row forward (`WHERE payments.version < EXCLUDED.version`), so the result does not
//! depend on the order in which concurrent writers or a rebuild reach it.
//!
//! [`rebuild`] (`billing rebuild-projections`) recomputes every row from `payment_events`
//! with the same [`apply`](super::model::apply) the live path uses. It runs as **one
//! transaction: lock, delete, replay, commit** — chosen over "build a fresh table, then swap":
//! - readers (`GetPayment`) keep seeing the old rows until the commit (MVCC), then the new
//!   ones, never an empty or half-built table;
//! - writers wait: the rebuild takes `LOCK TABLE payments IN EXCLUSIVE MODE`, which blocks
//!   every projection write (they take ROW EXCLUSIVE) but not plain reads. A writer's event
//!   appended meanwhile is either seen by the replay or applied by the writer's own upsert
//!   after the commit — the forward-only upsert makes both orders correct;
//! - it needs only DML: the runtime role `billing_app` can run it (P14). A table swap needs
//!   DDL (`ALTER TABLE … RENAME`), i.e. the owner role and an ACCESS EXCLUSIVE lock that
//!   blocks readers too.
//!
//! The cost: writers stall for the rebuild's duration, and a large DELETE leaves dead rows
//! for autovacuum. At billing's size (one row per payment, a replay of a few events each)
//! that is seconds; a ledger of hundreds of millions of rows would build a shadow table in
//! batches and swap, as an owner-run migration. Must not break: the lock is taken first,
//! before the events are read.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::model::{Currency, Money, OrderId, Payment, PaymentId, PaymentStatus, apply};
use super::store::{EventRow, LedgerError};

/// Writes `p` unless the stored row is already at or past `p.version`.
pub async fn upsert(conn: &mut PgConnection, p: &Payment) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO payments (payment_id, order_id, amount_minor, currency, status,
                               psp_authorization_id, decline_reason, version, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (payment_id) DO UPDATE SET
             status = EXCLUDED.status,
             psp_authorization_id = EXCLUDED.psp_authorization_id,
             decline_reason = EXCLUDED.decline_reason,
             version = EXCLUDED.version,
             updated_at = EXCLUDED.updated_at
         WHERE payments.version < EXCLUDED.version",
    )
    .bind(p.payment_id.0)
    .bind(p.order_id.0)
    .bind(p.amount.minor)
    .bind(p.amount.currency.as_str())
    .bind(p.status)
    .bind(&p.psp_authorization_id)
    .bind(&p.decline_reason)
    .bind(p.version)
    .bind(p.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    payment_id: Uuid,
    order_id: Uuid,
    amount_minor: i64,
    currency: String,
    status: PaymentStatus,
    psp_authorization_id: Option<String>,
    decline_reason: Option<String>,
    version: i64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl Row {
    fn into_payment(self) -> Result<Payment, LedgerError> {
        let corrupt = |what: String| {
            LedgerError::Db(sqlx::Error::Decode(
                format!("payments row {}: {what}", self.payment_id).into(),
            ))
        };
        Ok(Payment {
            payment_id: PaymentId(self.payment_id),
            order_id: OrderId(self.order_id),
            amount: Money {
                minor: self.amount_minor,
                currency: Currency::parse(&self.currency).map_err(|e| corrupt(e.to_string()))?,
            },
            status: self.status,
            psp_authorization_id: self.psp_authorization_id.clone(),
            decline_reason: self.decline_reason.clone(),
            version: self.version,
            updated_at: self.updated_at,
        })
    }
}

const SELECT: &str = "SELECT payment_id, order_id, amount_minor, currency, status,
                             psp_authorization_id, decline_reason, version, updated_at
                        FROM payments";

/// The projected payment, if any.
pub async fn get(conn: &mut PgConnection, id: PaymentId) -> Result<Option<Payment>, LedgerError> {
    sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE payment_id = $1"
    )))
    .bind(id.0)
    .fetch_optional(conn)
    .await?
    .map(Row::into_payment)
    .transpose()
}

/// Every projected payment, ordered by id (tests compare live and rebuilt projections).
pub async fn all(conn: &mut PgConnection) -> Result<Vec<Payment>, LedgerError> {
    sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY payment_id")))
        .fetch_all(conn)
        .await?
        .into_iter()
        .map(Row::into_payment)
        .collect()
}

/// Streams replayed per round trip.
const REBUILD_PAGE: i64 = 500;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub streams: u64,
    pub events: u64,
}

/// Rebuilds `payments` from `payment_events` in one transaction (see the module docs).
pub async fn rebuild(pool: &PgPool) -> Result<Rebuilt, LedgerError> {
    let mut tx = pool.begin().await?;
    // First: from here on no projection write can interleave with the replay.
    sqlx::query("LOCK TABLE payments IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM payments")
        .execute(&mut *tx)
        .await?;

    let mut done = Rebuilt {
        streams: 0,
        events: 0,
    };
    // Page through streams by id (keyset), so memory holds one page of payments, not the
    // ledger.
    let mut after = Uuid::nil();
    loop {
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT stream_id, version, event_type, data, recorded_at
               FROM payment_events
              WHERE stream_id IN (SELECT DISTINCT stream_id FROM payment_events
                                   WHERE stream_id > $1 ORDER BY stream_id LIMIT $2)
              ORDER BY stream_id, version",
        )
        .bind(after)
        .bind(REBUILD_PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.stream_id;
        let mut current: Option<Payment> = None;
        for row in rows {
            let recorded = row.decode()?;
            done.events += 1;
            let state = match current.take() {
                Some(p) if p.payment_id == recorded.stream_id => Some(p),
                Some(p) => {
                    upsert(&mut tx, &p).await?;
                    done.streams += 1;
                    None
                }
                None => None,
            };
            current = Some(apply(state, &recorded)?);
        }
        if let Some(p) = current {
            upsert(&mut tx, &p).await?;
            done.streams += 1;
        }
    }
    tx.commit().await?;
    Ok(done)
}
