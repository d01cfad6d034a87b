//! checkout's journey invariants: orders end (P04), stock is conserved and reservations end as
//! their order did (P11).

use sqlx::PgConnection;
use uuid::Uuid;

use super::{Checks, FINAL_STATES, is_final, orders};
use crate::audit::{AuditError, Check, Ctx, db};

pub(super) fn checks(cx: &mut Ctx) -> Checks<'_> {
    Box::pin(async move {
        let settle = cx.bounds.settle_within;
        let conn = cx.db("checkout", "checkout")?;
        let orders = orders(conn, settle.as_secs_f64()).await?;
        // Gated: an order younger than the bound may still be on its way.
        let (old, young): (Vec<_>, Vec<_>) = orders.iter().partition(|o| o.placed_past_gate);
        let stuck = old
            .iter()
            .filter(|o| !is_final(&o.state))
            .map(|o| format!("order {} still {}", o.id, o.state))
            .collect();
        Ok(vec![
            Check::new(
                "checkout.orders_final",
                format!("orders older than {}s are final", settle.as_secs()),
                old.len() as i64,
                "orders",
                stuck,
            )
            .gated(settle, young.len() as i64),
            stock_conserved(conn).await?,
            reservations_match(conn).await?,
        ])
    })
}

async fn stock_conserved(conn: &mut PgConnection) -> Result<Check, AuditError> {
    let rows: Vec<(String, i32, i32, i32, i32, i64, i64)> = sqlx::query_as(
        "SELECT s.sku, s.initial, s.available, s.reserved, s.sold,
                COALESCE(sum(r.quantity) FILTER (WHERE r.state = 'reserved'), 0)::int8,
                COALESCE(sum(r.quantity) FILTER (WHERE r.state = 'sold'), 0)::int8
           FROM stock s LEFT JOIN reservations r ON r.sku = s.sku
          GROUP BY s.sku, s.initial, s.available, s.reserved, s.sold
          ORDER BY s.sku",
    )
    .fetch_all(conn)
    .await
    .map_err(db("checkout"))?;
    let broken = rows
        .iter()
        .filter(|(_, initial, available, reserved, sold, r_reserved, r_sold)| {
            available + reserved + sold != *initial
                || *available < 0
                || i64::from(*reserved) != *r_reserved
                || i64::from(*sold) != *r_sold
        })
        .map(|(sku, initial, available, reserved, sold, rr, rs)| {
            format!(
                "{sku}: initial {initial} != available {available} + reserved {reserved} + sold {sold} \
                 (reservations: {rr} reserved, {rs} sold)"
            )
        })
        .collect();
    Ok(Check::new(
        "checkout.stock_conserved",
        "stock conserved per SKU (available + reserved + sold = initial, = reservations)",
        rows.len() as i64,
        "SKUs",
        broken,
    ))
}

async fn reservations_match(conn: &mut PgConnection) -> Result<Check, AuditError> {
    let finals = FINAL_STATES.map(str::to_owned).to_vec();
    let examined: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = ANY($1)")
        .bind(&finals)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("checkout"))?;
    // A CONFIRMED order sold every line, exactly; any other final order holds nothing and
    // sold nothing.
    let broken: Vec<(Uuid, String, String, Option<String>)> = sqlx::query_as(
        "SELECT o.id, o.state, l.sku, r.state
           FROM orders o
           JOIN order_lines l ON l.order_id = o.id
           LEFT JOIN reservations r ON r.order_id = o.id AND r.sku = l.sku
          WHERE (o.state = 'CONFIRMED'
                 AND (r.state IS DISTINCT FROM 'sold' OR r.quantity <> l.quantity))
             OR (o.state = ANY($1) AND o.state <> 'CONFIRMED'
                 AND r.state IN ('reserved', 'sold'))
          ORDER BY o.created_at",
    )
    .bind(&finals)
    .fetch_all(conn)
    .await
    .map_err(db("checkout"))?;
    Ok(Check::new(
        "checkout.reservations_match_orders",
        "final orders' reservations match their state",
        examined,
        "orders",
        broken
            .into_iter()
            .map(|(id, state, sku, r)| {
                format!(
                    "order {id} is {state} but {sku} is {}",
                    r.as_deref().unwrap_or("not reserved")
                )
            })
            .collect(),
    ))
}
