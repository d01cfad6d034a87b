//! Identifiers that cross service boundaries, as newtypes (STYLE rule 9): an order id cannot
//! be passed where a payment id is expected, and the wire form stays a bare string
//! (`#[serde(transparent)]`), so the types cost nothing in the JSON.
//!
//! Only ids that more than one service sees live here. An id private to a service (a saga's,
//! a notification's) is that service's own type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An order (checkout's aggregate; billing's payments and notification's notifications point
/// at it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A new, time-ordered id (v7): keeps the primary key index append-mostly.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

/// A payment (billing's aggregate: the ledger's stream id, published in every
/// `billing.payment.*` event). Billing derives it from the authorization's idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentId(pub Uuid);

macro_rules! uuid_id {
    ($($t:ident),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $t {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $t {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    )*};
}

uuid_id!(OrderId, PaymentId);

/// A customer: the one an API key belongs to. Opaque text (`cust-42`), not a UUID: customers
/// are provisioned outside Keel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(pub String);

impl CustomerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for CustomerId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for CustomerId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bare_strings_on_the_wire() {
        let id = OrderId(Uuid::nil());
        assert_eq!(
            serde_json::to_value(id).unwrap(),
            serde_json::json!("00000000-0000-0000-0000-000000000000")
        );
        assert_eq!(id.to_string().parse::<OrderId>().unwrap(), id);
        assert_eq!(
            serde_json::to_value(CustomerId::from("cust-42")).unwrap(),
            serde_json::json!("cust-42")
        );
        assert!("not-a-uuid".parse::<PaymentId>().is_err());
    }
}
