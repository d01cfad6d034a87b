//! Orders: `POST /v1/orders` and `GET /v1/orders/{id}` (P13 idempotency keys), and the
//! order aggregate's state changes that the saga makes.
//!
//! Placing an order is one transaction: the idempotency key, the order and its lines, its
//! first history row, the saga instance, the saga's job, the `checkout.order.placed` outbox
//! event and the stored answer commit together or not at all. The API answers 202: the
//! order is accepted, and the saga (`crate::saga`) takes it to a final state in the
//! background.
//!
//! - [`request`]: parsing and validation of the body, with per-field errors.
//! - [`state`]: the order's states, stored through one mapping (as are all of checkout's).
//! - [`store`]: the SQL of the order aggregate (insert, load, state changes with history and
//!   outbox event).
//! - [`api`]: the handlers.
//!
//! Must not break: an order's state changes only through [`store::change_state`], which
//! locks the order row, appends its history and writes its event in the caller's transaction.

pub mod api;
pub mod request;
pub mod state;
pub mod store;

pub use api::{OrdersState, Placed, place_order, routes};
/// An order's id: the shared wire type, since billing and notification see it too.
pub use keel_events::OrderId;
pub use state::OrderState;
