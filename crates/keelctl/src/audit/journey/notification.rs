//! notification's journey invariant (P03): every settled final order has exactly one customer
//! notification, announcing the state it ended in. A duplicate is the failure the inbox
//! prevents; a missing one is a lost event (P02) or a stuck consumer.

use std::collections::HashMap;

use uuid::Uuid;

use super::{Checks, is_final, orders};
use crate::audit::{Ctx, check, db};

pub(super) fn checks(cx: &mut Ctx) -> Checks<'_> {
    Box::pin(async move {
        let settle = cx.bounds.settle_within.as_secs_f64();
        let orders = orders(cx.db("checkout", "notification")?, settle).await?;
        let notes: Vec<(Uuid, String)> = sqlx::query_as("SELECT order_id, kind FROM notifications")
            .fetch_all(cx.db("notification", "notification")?)
            .await
            .map_err(db("notification"))?;
        let mut kinds: HashMap<Uuid, Vec<String>> = HashMap::new();
        for (order, kind) in notes {
            kinds.entry(order).or_default().push(kind);
        }
        let settled_final: Vec<_> = orders
            .iter()
            .filter(|o| o.settled && is_final(&o.state))
            .collect();
        let wrong = settled_final
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
        Ok(vec![check(
            "settled final orders have exactly one notification of their state",
            settled_final.len() as i64,
            wrong,
        )])
    })
}
