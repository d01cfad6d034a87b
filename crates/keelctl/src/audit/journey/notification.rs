//! notification's journey invariant (P03): every order final for longer than the settle gate
//! has exactly one customer notification, announcing the state it ended in. A duplicate is the
//! failure the inbox prevents; a missing one is a lost event (P02) or a stuck consumer.

use std::collections::HashMap;

use uuid::Uuid;

use super::{Checks, is_final, orders};
use crate::audit::{Check, Ctx, db};

pub(super) fn checks(cx: &mut Ctx) -> Checks<'_> {
    Box::pin(async move {
        let settle = cx.bounds.settle_within;
        let orders = orders(cx.db("checkout", "notification")?, settle.as_secs_f64()).await?;
        let notes: Vec<(Uuid, String)> = sqlx::query_as("SELECT order_id, kind FROM notifications")
            .fetch_all(cx.db("notification", "notification")?)
            .await
            .map_err(db("notification"))?;
        let mut kinds: HashMap<Uuid, Vec<String>> = HashMap::new();
        for (order, kind) in notes {
            kinds.entry(order).or_default().push(kind);
        }
        // Gated by when the order ended: its final event travels outbox → broker → consumer
        // after that.
        let (settled, young): (Vec<_>, Vec<_>) = orders
            .iter()
            .filter(|o| is_final(&o.state))
            .partition(|o| o.changed_past_gate);
        let wrong = settled
            .iter()
            .filter_map(|o| match kinds.get(&o.id).map(Vec::as_slice) {
                Some([kind]) if *kind == o.state => None,
                Some([kind]) => Some(format!(
                    "order {} is {} but was announced {kind}",
                    o.id, o.state
                )),
                Some(many) => Some(format!("order {} has {} notifications", o.id, many.len())),
                None => Some(format!("order {} ({}) has no notification", o.id, o.state)),
            })
            .collect();
        Ok(vec![
            Check::new(
                "notification.final_orders_notified_once",
                format!(
                    "orders final for over {}s have exactly one notification of their state",
                    settle.as_secs()
                ),
                settled.len() as i64,
                "orders",
                wrong,
            )
            .gated(settle, young.len() as i64),
        ])
    })
}
