//! billing's journey invariants (P04, P10, P32): payments agree with the final state of their
//! order — a confirmed order has exactly one payment of its amount, captured once the order
//! has settled (a replayed provider webhook captured nothing twice); a rejected or failed order
//! holds no authorization that was not voided (compensation ran).

use std::collections::HashMap;

use uuid::Uuid;

use super::{Checks, HOLDING_STATUSES, Order, UNRESOLVED_STATUS, is_final, orders};
use crate::audit::{Check, Ctx, db};

#[derive(Debug, sqlx::FromRow)]
struct Payment {
    payment_id: Uuid,
    order_id: Uuid,
    amount_minor: i64,
    currency: String,
    status: String,
}

pub(super) fn checks(cx: &mut Ctx) -> Checks<'_> {
    Box::pin(async move {
        let settle = cx.bounds.settle_within;
        let orders = orders(cx.db("checkout", "billing")?, settle.as_secs_f64()).await?;
        let payments: Vec<Payment> = sqlx::query_as(
            "SELECT payment_id, order_id, amount_minor, currency, status FROM payments",
        )
        .fetch_all(cx.db("billing", "billing")?)
        .await
        .map_err(db("billing"))?;

        let mut by_order: HashMap<Uuid, Vec<&Payment>> = HashMap::new();
        for p in &payments {
            by_order.entry(p.order_id).or_default().push(p);
        }
        let payments_of = |o: &Order, holds: &dyn Fn(&str) -> bool| -> Vec<&Payment> {
            by_order
                .get(&o.id)
                .map(|ps| ps.iter().copied().filter(|p| holds(&p.status)).collect())
                .unwrap_or_default()
        };
        let holding = |o: &Order| payments_of(o, &|s| HOLDING_STATUSES.contains(&s));
        let maybe_holding = |o: &Order| {
            payments_of(o, &|s| {
                HOLDING_STATUSES.contains(&s) || s == UNRESOLVED_STATUS
            })
        };

        let confirmed: Vec<&Order> = orders.iter().filter(|o| o.state == "CONFIRMED").collect();
        let unpaid = confirmed
            .iter()
            .filter_map(|o| match holding(o).as_slice() {
                [p] if p.amount_minor == o.total_minor && p.currency == o.currency => None,
                [p] => Some(format!(
                    "order {} total {} {} but payment {} is {} {}",
                    o.id, o.total_minor, o.currency, p.payment_id, p.amount_minor, p.currency
                )),
                ps => Some(format!("order {} has {} holding payments", o.id, ps.len())),
            })
            .collect();

        // Gated: the provider's capture webhook comes after the order is confirmed; once it
        // has been confirmed for longer than the gate, the webhook has had time to arrive.
        let (settled, young): (Vec<&Order>, Vec<&Order>) =
            confirmed.iter().partition(|o| o.changed_past_gate);
        let uncaptured = settled
            .iter()
            .filter(|o| !holding(o).iter().any(|p| p.status == "CAPTURED"))
            .map(|o| {
                let statuses: Vec<&str> = by_order
                    .get(&o.id)
                    .map(|ps| ps.iter().map(|p| p.status.as_str()).collect())
                    .unwrap_or_default();
                format!(
                    "order {} confirmed but no payment captured (payments: [{}])",
                    o.id,
                    statuses.join(", ")
                )
            })
            .collect();

        let failed: Vec<&Order> = orders
            .iter()
            .filter(|o| is_final(&o.state) && o.state != "CONFIRMED")
            .collect();
        let open = failed
            .iter()
            .flat_map(|o| {
                maybe_holding(o).into_iter().map(move |p| {
                    format!(
                        "order {} is {} but payment {} is {}",
                        o.id, o.state, p.payment_id, p.status
                    )
                })
            })
            .collect();

        Ok(vec![
            Check::new(
                "billing.confirmed_orders_paid_once",
                "confirmed orders hold exactly one payment, of their amount",
                confirmed.len() as i64,
                "orders",
                unpaid,
            ),
            Check::new(
                "billing.settled_payments_captured",
                format!(
                    "orders confirmed over {}s ago have their payment captured",
                    settle.as_secs()
                ),
                settled.len() as i64,
                "orders",
                uncaptured,
            )
            .gated(settle, young.len() as i64),
            Check::new(
                "billing.failed_orders_hold_nothing",
                "rejected and failed orders hold no unvoided authorization",
                failed.len() as i64,
                "orders",
                open,
            ),
        ])
    })
}
