//! The journey's invariants (P04, P11, P03, P13), declared per service in one table.
//!
//! [`CHECKS`] maps a service name to the checks it owns; the audit runs an entry when the
//! registry has that service, in registry order. A check that spans services (a confirmed
//! order has one captured payment) belongs to the service whose state it judges and asks the
//! [`Ctx`] for the other databases it reads. To give a new service journey checks, write a
//! module here and add one row; to give it none, do nothing: the generic checks cover it.

mod billing;
mod checkout;
mod notification;

use std::future::Future;
use std::pin::Pin;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{AuditError, Check, Ctx, db};

/// Order states that end the journey (checkout's saga).
pub const FINAL_STATES: [&str; 4] = [
    "CONFIRMED",
    "REJECTED",
    "PAYMENT_DECLINED",
    "PAYMENT_FAILED",
];
/// Payment statuses (billing's projection) that hold or took money.
pub const HOLDING_STATUSES: [&str; 3] = ["AUTHORIZED", "CAPTURE_PENDING", "CAPTURED"];
/// An authorization whose provider answer billing never recorded: it may hold money, so a
/// failed order must not leave one behind (compensation voids it).
pub const UNRESOLVED_STATUS: &str = "AUTHORIZATION_PENDING";

/// What a service's checks return.
pub type Checks<'c> = Pin<Box<dyn Future<Output = Result<Vec<Check>, AuditError>> + Send + 'c>>;

/// One row of [`CHECKS`].
#[derive(Debug, Clone, Copy)]
pub struct ServiceChecks {
    /// The registered service whose state these checks judge.
    pub service: &'static str,
    pub checks: for<'c> fn(&'c mut Ctx) -> Checks<'c>,
}

/// The journey's checks, by the service that owns them.
pub const CHECKS: &[ServiceChecks] = &[
    ServiceChecks {
        service: "checkout",
        checks: checkout::checks,
    },
    ServiceChecks {
        service: "billing",
        checks: billing::checks,
    },
    ServiceChecks {
        service: "notification",
        checks: notification::checks,
    },
];

pub(crate) fn is_final(state: &str) -> bool {
    FINAL_STATES.contains(&state)
}

/// An order as the journey checks see it, with where it stands against the settle gate
/// (`audit.settle_within`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Order {
    pub id: Uuid,
    pub state: String,
    pub total_minor: i64,
    pub currency: String,
    /// Placed longer ago than the gate: it must have reached a final state.
    pub placed_past_gate: bool,
    /// Last changed state longer ago than the gate: what follows its final state (the
    /// notification, the provider's capture webhook) has had time to arrive.
    pub changed_past_gate: bool,
}

/// checkout's orders, each placed against the settle gate.
pub(crate) async fn orders(
    conn: &mut PgConnection,
    settle_within: f64,
) -> Result<Vec<Order>, AuditError> {
    sqlx::query_as(
        "SELECT id, state, total_minor, currency,
                created_at < now() - make_interval(secs => $1) AS placed_past_gate,
                updated_at < now() - make_interval(secs => $1) AS changed_past_gate
           FROM orders",
    )
    .bind(settle_within)
    .fetch_all(conn)
    .await
    .map_err(db("checkout"))
}
