//! Stock reservations without oversell or deadlocks (P11).
//!
//! Two transactions that lock the same rows in different orders can each hold one row and
//! wait for the other's: Postgres detects the cycle after `deadlock_timeout` and aborts one
//! with `40P01 deadlock detected`. Orders with several SKUs do exactly that when each locks
//! its lines in the order the customer listed them. Here every function that changes stock
//! first locks the order's stock rows with one `SELECT … ORDER BY sku FOR UPDATE`: rows are
//! locked in the order the sort returns them, every transaction takes them in the same global
//! order, and no wait cycle can form. (The proof, with the unordered variant that does
//! deadlock, is `tests/stock.rs`.)
//!
//! Oversell is prevented by the same lock: availability is read *after* the rows are locked,
//! so two orders for the last unit cannot both see it. The table's CHECK constraints
//! (`available >= 0`, `available + reserved + sold = initial`) are the backstop.
//!
//! Every function takes the caller's connection, inside the caller's transaction (the saga
//! step that also moves the order's state), and is idempotent: the `reservations` row of an
//! (order, SKU) moves `reserved → released | sold` once; a second release or commit finds
//! nothing in `reserved` and changes nothing.
//!
//! Must not break: lock stock rows in SKU order, and before changing any of them.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

use keel_pg::text_column;

/// Where one (order, SKU) reservation stands; stored in `reservations.state` through
/// [`ReservationState::as_str`], the one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    /// Held for the order: counted in `stock.reserved`.
    Reserved,
    /// Given back (compensation): counted in `stock.available` again.
    Released,
    /// The order is confirmed: counted in `stock.sold`.
    Sold,
}

text_column!(ReservationState, "reservation state");

impl ReservationState {
    pub const ALL: [Self; 3] = [Self::Reserved, Self::Released, Self::Sold];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Released => "released",
            Self::Sold => "sold",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One line to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub quantity: i32,
}

/// The outcome of [`reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Every line is now reserved.
    Reserved,
    /// This order's lines were reserved before (a re-run step): nothing changed.
    AlreadyReserved,
    /// At least one line cannot be served; nothing was reserved.
    OutOfStock {
        sku: String,
        requested: i32,
        available: i32,
    },
}

/// Merges lines by SKU and sorts them: the lock order.
fn by_sku(lines: &[Line]) -> BTreeMap<&str, i32> {
    let mut merged = BTreeMap::new();
    for l in lines {
        *merged.entry(l.sku.as_str()).or_insert(0) += l.quantity;
    }
    merged
}

/// Reserves all of `lines` for `order_id`, or none of them.
pub async fn reserve(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[Line],
) -> Result<Reserve, sqlx::Error> {
    let already: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reservations WHERE order_id = $1)")
            .bind(order_id)
            .fetch_one(&mut *conn)
            .await?;
    if already {
        return Ok(Reserve::AlreadyReserved);
    }
    let wanted = by_sku(lines);
    let skus: Vec<String> = wanted.keys().map(|s| (*s).to_owned()).collect();
    // The lock, in SKU order. Availability is read only now, under the lock.
    let locked: Vec<(String, i32)> = sqlx::query_as(
        "SELECT sku, available FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(&skus)
    .fetch_all(&mut *conn)
    .await?;
    let available: BTreeMap<&str, i32> = locked.iter().map(|(s, a)| (s.as_str(), *a)).collect();
    for (sku, quantity) in &wanted {
        // No stock row: a product that is not stocked is out of stock.
        let have = available.get(sku).copied().unwrap_or(0);
        if have < *quantity {
            return Ok(Reserve::OutOfStock {
                sku: (*sku).to_owned(),
                requested: *quantity,
                available: have,
            });
        }
    }
    let quantities: Vec<i32> = wanted.values().copied().collect();
    // The rows are already locked by this transaction, so the update order no longer matters.
    sqlx::query(
        "UPDATE stock s SET available = s.available - w.quantity,
                            reserved = s.reserved + w.quantity
           FROM unnest($1::text[], $2::int[]) AS w(sku, quantity)
          WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    // The primary key (order_id, sku) is the last guard against a double reservation.
    sqlx::query(
        "INSERT INTO reservations (order_id, sku, quantity, state)
         SELECT $1, w.sku, w.quantity, $4
           FROM unnest($2::text[], $3::int[]) AS w(sku, quantity)",
    )
    .bind(order_id)
    .bind(&skus)
    .bind(&quantities)
    .bind(ReservationState::Reserved)
    .execute(&mut *conn)
    .await?;
    Ok(Reserve::Reserved)
}

/// Moves `order_id`'s `reserved` reservations to `to` (`released` or `sold`) and the stock
/// counts with them. Returns how many reservations moved (0 when already done).
async fn settle(conn: &mut PgConnection, order_id: Uuid, to: Settle) -> Result<u64, sqlx::Error> {
    // Lock the stock rows first, in SKU order, like `reserve`.
    let locked: Vec<String> = sqlx::query_scalar(
        "SELECT s.sku FROM stock s
          WHERE s.sku IN (SELECT sku FROM reservations WHERE order_id = $1 AND state = $2)
          ORDER BY s.sku FOR UPDATE",
    )
    .bind(order_id)
    .bind(ReservationState::Reserved)
    .fetch_all(&mut *conn)
    .await?;
    if locked.is_empty() {
        return Ok(0);
    }
    // The state guard: only rows still `reserved` move, so a second call moves nothing.
    let moved: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE reservations SET state = $2, updated_at = now()
          WHERE order_id = $1 AND state = $3
      RETURNING sku, quantity",
    )
    .bind(order_id)
    .bind(to.state())
    .bind(ReservationState::Reserved)
    .fetch_all(&mut *conn)
    .await?;
    let (skus, quantities): (Vec<String>, Vec<i32>) = moved.into_iter().unzip();
    let sql = match to {
        Settle::Release => {
            "UPDATE stock s SET reserved = s.reserved - m.quantity,
                                available = s.available + m.quantity
               FROM unnest($1::text[], $2::int[]) AS m(sku, quantity)
              WHERE s.sku = m.sku"
        }
        Settle::Commit => {
            "UPDATE stock s SET reserved = s.reserved - m.quantity,
                                sold = s.sold + m.quantity
               FROM unnest($1::text[], $2::int[]) AS m(sku, quantity)
              WHERE s.sku = m.sku"
        }
    };
    sqlx::query(sql)
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *conn)
        .await?;
    Ok(skus.len() as u64)
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Release,
    Commit,
}

impl Settle {
    fn state(self) -> ReservationState {
        match self {
            Self::Release => ReservationState::Released,
            Self::Commit => ReservationState::Sold,
        }
    }
}

/// Returns `order_id`'s reserved units to `available` (compensation). Idempotent.
pub async fn release(conn: &mut PgConnection, order_id: Uuid) -> Result<u64, sqlx::Error> {
    settle(conn, order_id, Settle::Release).await
}

/// Moves `order_id`'s reserved units to `sold` (the order is confirmed). Idempotent.
pub async fn commit(conn: &mut PgConnection, order_id: Uuid) -> Result<u64, sqlx::Error> {
    settle(conn, order_id, Settle::Commit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_merged_by_sku_and_sorted() {
        let lines = [
            Line {
                sku: "B".into(),
                quantity: 1,
            },
            Line {
                sku: "A".into(),
                quantity: 2,
            },
            Line {
                sku: "B".into(),
                quantity: 3,
            },
        ];
        let merged: Vec<(&str, i32)> = by_sku(&lines).into_iter().collect();
        assert_eq!(merged, vec![("A", 2), ("B", 4)]);
    }

    #[test]
    fn reservation_states_round_trip() {
        for s in ReservationState::ALL {
            assert_eq!(ReservationState::parse(s.as_str()), Some(s));
        }
    }
}
