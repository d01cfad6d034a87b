//! The order aggregate's SQL: create, load, change state.
//!
//! Every function takes the caller's connection: it runs inside the caller's transaction
//! (placing an order, or a saga step), so the order, its history and its outbox event commit
//! with the rest of that step or not at all.
//!
//! Must not break (P02 ordering): the order row is written (inserted or updated, hence
//! locked) *before* its outbox event is inserted, so the events of one order get `seq`s in
//! commit order and the relay publishes them in that order.

use chrono::{DateTime, Utc};
use keel_events::order::{self, OrderEvent};
use keel_events::{Currency, CustomerId, JourneyEvent, Money};
use keel_pg::PgError;
use keel_pg::outbox::{self, NewEvent};
use serde::Serialize;
use sqlx::PgConnection;

use super::request::PricedLine;
use super::{OrderId, OrderState};

/// The outbox aggregate type of orders (with the order id, the per-aggregate ordering key).
pub const AGGREGATE_TYPE: &str = "order";

/// A new order, priced and validated.
#[derive(Debug, Clone)]
pub struct NewOrder<'a> {
    pub id: OrderId,
    pub customer_id: &'a str,
    pub total: Money,
    pub lines: &'a [PricedLine],
}

/// Inserts `order` (state PENDING) with its lines, its first history row and the
/// `checkout.order.placed` event, and returns the order as `POST` answers it.
///
/// Order, lines and history go in one statement (data-modifying CTEs): placement is the
/// hot path, and each statement through pgbouncer is a network round trip. The view is
/// built from what was written; `now()` is the transaction's start, so `created_at`,
/// `updated_at` and the history row's `at` are the same instant the database stored.
pub async fn insert(conn: &mut PgConnection, order: &NewOrder<'_>) -> Result<OrderView, PgError> {
    let line_nos: Vec<i32> = (0..).take(order.lines.len()).collect();
    let skus: Vec<&str> = order.lines.iter().map(|l| l.sku.as_str()).collect();
    let quantities: Vec<i32> = order.lines.iter().map(|l| l.quantity).collect();
    let prices: Vec<i64> = order.lines.iter().map(|l| l.unit_price.minor).collect();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "WITH o AS (
             INSERT INTO orders (id, customer_id, currency, total_minor, state)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING id, created_at),
         l AS (
             INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price_minor)
             SELECT o.id, l.line_no, l.sku, l.quantity, l.price
               FROM o, unnest($6::int[], $7::text[], $8::int[], $9::bigint[])
                       AS l(line_no, sku, quantity, price)),
         h AS (
             INSERT INTO order_history (order_id, state) SELECT o.id, $5 FROM o)
         SELECT created_at FROM o",
    )
    .bind(order.id.0)
    .bind(order.customer_id)
    .bind(order.total.currency.as_str())
    .bind(order.total.minor)
    .bind(OrderState::Pending)
    .bind(&line_nos)
    .bind(&skus)
    .bind(&quantities)
    .bind(&prices)
    .fetch_one(&mut *conn)
    .await?;
    let facts = Facts {
        id: order.id,
        customer_id: order.customer_id,
        total: order.total,
        reason: None,
    };
    publish(conn, OrderState::Pending, facts).await?;
    let money = |minor| Money {
        minor,
        currency: order.total.currency,
    };
    Ok(OrderView {
        id: order.id,
        customer_id: order.customer_id.to_owned(),
        state: OrderState::Pending,
        reason: None,
        total: order.total,
        lines: order
            .lines
            .iter()
            .map(|l| LineView {
                sku: l.sku.clone(),
                quantity: l.quantity,
                unit_price: l.unit_price,
                line_total: money(l.unit_price.minor.saturating_mul(i64::from(l.quantity))),
            })
            .collect(),
        history: vec![HistoryEntry {
            state: OrderState::Pending,
            reason: None,
            at: created_at,
        }],
        created_at,
        updated_at: created_at,
    })
}

/// Moves order `id` to `to` (with `reason`), appends the history row and, for a final state,
/// writes its event. Call inside the transaction of the step that caused the change.
pub async fn change_state(
    conn: &mut PgConnection,
    id: OrderId,
    to: OrderState,
    reason: Option<&str>,
) -> Result<(), PgError> {
    // The UPDATE locks the order row before the event is inserted (see the module doc).
    let (customer_id, total_minor, currency): (String, i64, String) = sqlx::query_as(
        "UPDATE orders SET state = $2, reason = $3, updated_at = now() WHERE id = $1
         RETURNING customer_id, total_minor, currency",
    )
    .bind(id.0)
    .bind(to)
    .bind(reason)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("INSERT INTO order_history (order_id, state, reason) VALUES ($1, $2, $3)")
        .bind(id.0)
        .bind(to)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    // The column's CHECK constraint guarantees the format.
    let currency = Currency::parse(currency.trim()).map_err(|e| sqlx::Error::Decode(e.into()))?;
    let facts = Facts {
        id,
        customer_id: &customer_id,
        total: Money {
            minor: total_minor,
            currency,
        },
        reason,
    };
    publish(conn, to, facts).await
}

/// What an order event says about the order besides its state.
struct Facts<'a> {
    id: OrderId,
    customer_id: &'a str,
    total: Money,
    reason: Option<&'a str>,
}

/// Writes the outbox event of a change to `to`, if that state has one (first and final):
/// `keel_events`' `OrderEvent`, the payload notification decodes.
async fn publish(conn: &mut PgConnection, to: OrderState, order: Facts<'_>) -> Result<(), PgError> {
    let Some(kind) = to.event_type().and_then(order::EventType::parse) else {
        return Ok(());
    };
    let event = JourneyEvent::Order(
        kind,
        OrderEvent {
            order_id: order.id,
            customer_id: CustomerId::from(order.customer_id),
            state: kind.state(),
            total_minor: order.total.minor,
            currency: order.total.currency,
            reason: order.reason.map(str::to_owned),
        },
    );
    let data = event.data().map_err(|e| PgError::Encode(e.to_string()))?;
    outbox::insert(
        conn,
        &NewEvent {
            aggregate_type: AGGREGATE_TYPE,
            aggregate_id: &order.id.to_string(),
            event_type: event.event_type(),
            data,
        },
    )
    .await?;
    Ok(())
}

/// An order as `GET /v1/orders/{id}` shows it (and `POST` answers).
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    pub id: OrderId,
    pub customer_id: String,
    pub state: OrderState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub total: Money,
    pub lines: Vec<LineView>,
    /// Every state change, oldest first.
    pub history: Vec<HistoryEntry>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One line of an order.
#[derive(Debug, Clone, Serialize)]
pub struct LineView {
    pub sku: String,
    pub quantity: i32,
    pub unit_price: Money,
    pub line_total: Money,
}

/// One state change.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub state: OrderState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    customer_id: String,
    currency: String,
    total_minor: i64,
    state: OrderState,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Loads order `id` with its lines and history; `None` if there is no such order.
pub async fn load(conn: &mut PgConnection, id: OrderId) -> Result<Option<OrderView>, sqlx::Error> {
    load_matching(conn, id, None).await
}

/// Loads order `id` if `customer` placed it. Another customer's order is `None`, exactly as a
/// nonexistent one, found by the same single query: whether an order exists is not told to
/// anyone but its customer (object-level authorization).
pub async fn load_for_customer(
    conn: &mut PgConnection,
    id: OrderId,
    customer: &CustomerId,
) -> Result<Option<OrderView>, sqlx::Error> {
    load_matching(conn, id, Some(customer.as_str())).await
}

async fn load_matching(
    conn: &mut PgConnection,
    id: OrderId,
    customer: Option<&str>,
) -> Result<Option<OrderView>, sqlx::Error> {
    let Some(row): Option<OrderRow> = sqlx::query_as(
        "SELECT customer_id, currency, total_minor, state, reason, created_at, updated_at
           FROM orders WHERE id = $1 AND ($2::text IS NULL OR customer_id = $2)",
    )
    .bind(id.0)
    .bind(customer)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    // The column's CHECK constraint guarantees the format.
    let currency = Currency::parse(row.currency.trim()).map_err(|_| {
        sqlx::Error::Decode(format!("bad currency on order {id}: {:?}", row.currency).into())
    })?;
    let money = |minor| Money { minor, currency };
    let lines: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT sku, quantity, unit_price_minor FROM order_lines
          WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id.0)
    .fetch_all(&mut *conn)
    .await?;
    let history: Vec<(OrderState, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT state, reason, at FROM order_history WHERE order_id = $1 ORDER BY id",
    )
    .bind(id.0)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(OrderView {
        id,
        customer_id: row.customer_id,
        state: row.state,
        reason: row.reason,
        total: money(row.total_minor),
        lines: lines
            .into_iter()
            .map(|(sku, quantity, price)| LineView {
                sku,
                quantity,
                unit_price: money(price),
                // Cannot overflow: the total (their sum) was checked when the order was placed.
                line_total: money(price.saturating_mul(i64::from(quantity))),
            })
            .collect(),
        history: history
            .into_iter()
            .map(|(state, reason, at)| HistoryEntry { state, reason, at })
            .collect(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    }))
}
