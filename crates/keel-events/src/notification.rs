//! `notification.notification.recorded`: published by notification (through its outbox, P02)
//! in the transaction that records a customer notification, so that anyone downstream (an
//! audit, a delivery worker) hears about it exactly as reliably as the notification exists.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order;
use crate::{CustomerId, OrderId};

pub const RECORDED: &str = "notification.notification.recorded";

/// `data` of `notification.notification.recorded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRecorded {
    /// notification's own id for the notification (the event's aggregate id).
    pub notification_id: Uuid,
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    /// The order state it announces.
    pub kind: order::State,
}
