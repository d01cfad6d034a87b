//! Items: the template's example resource. Replace it with your own; keep its shape.
//!
//! - This file: the domain: [`ItemId`], [`NewItem`] (a request body that parses into a valid
//!   item or says which fields are wrong, never half-valid) and the event skeleton publishes
//!   when an item is created ([`ItemCreated`], routing key [`CREATED`]).
//! - [`store`]: the `items` table's SQL, one function per statement.
//! - [`api`]: `POST /v1/items` (idempotent, P13) and `GET /v1/items/{id}`.
//!
//! Must not break: an item is only ever written together with its `skeleton.item.created`
//! outbox event (P02) and its idempotency key's answer, in one transaction, so a retry never
//! creates a second item and every item is announced exactly as reliably as it exists.

pub mod api;
pub mod store;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::FieldError;

/// The routing key (and envelope `type`) of the event published when an item is created:
/// `<service>.<aggregate>.<event>`.
pub const CREATED: &str = "skeleton.item.created";

/// The outbox's aggregate type for items.
pub const AGGREGATE: &str = "item";

/// Longest item name, in characters.
const MAX_NAME: usize = 200;
/// Largest quantity one item may hold.
const MAX_QUANTITY: i32 = 1_000_000;

/// An item's id: a UUIDv7, so ids sort by creation time (index-friendly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(pub Uuid);

impl ItemId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for ItemId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An item, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub id: ItemId,
    pub name: String,
    pub quantity: i32,
    pub created_at: DateTime<Utc>,
}

/// A valid new item: only [`NewItem::parse`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    name: String,
    quantity: i32,
}

/// The body of `POST /v1/items`, as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewItemBody {
    name: String,
    quantity: i64,
}

/// Why a body is not a [`NewItem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not JSON of the right shape (400).
    Malformed(String),
    /// The right shape, but values break the rules (422), one entry per field.
    Fields(Vec<FieldError>),
}

impl NewItem {
    /// Parses a request body: a valid item, or every reason it is not.
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let raw: NewItemBody =
            serde_json::from_slice(body).map_err(|e| Invalid::Malformed(e.to_string()))?;
        let name = raw.name.trim().to_owned();
        let mut errors = Vec::new();
        if name.is_empty() || name.chars().count() > MAX_NAME {
            errors.push(FieldError::new(
                "name",
                format!("must be 1 to {MAX_NAME} characters"),
            ));
        }
        let quantity = i32::try_from(raw.quantity)
            .ok()
            .filter(|q| (0..=MAX_QUANTITY).contains(q));
        if quantity.is_none() {
            errors.push(FieldError::new(
                "quantity",
                format!("must be 0 to {MAX_QUANTITY}"),
            ));
        }
        match quantity {
            Some(quantity) if errors.is_empty() => Ok(Self { name, quantity }),
            _ => Err(Invalid::Fields(errors)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn quantity(&self) -> i32 {
        self.quantity
    }

    /// What identifies this request for its idempotency key: the same key with a different
    /// fingerprint is a client bug (422), not a retry.
    pub fn fingerprint(&self, scope: &str) -> Vec<u8> {
        keel_pg::idempotency::fingerprint(&[
            scope.as_bytes(),
            self.name.as_bytes(),
            &self.quantity.to_be_bytes(),
        ])
    }
}

/// `data` of `skeleton.item.created`: the payload both the producer and every consumer use,
/// so neither picks fields out of raw JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCreated {
    pub item_id: ItemId,
    pub name: String,
    pub quantity: i32,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_body_parses_with_its_name_trimmed() {
        let item = NewItem::parse(br#"{"name": "  bolt ", "quantity": 3}"#).unwrap();
        assert_eq!((item.name(), item.quantity()), ("bolt", 3));
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let err = NewItem::parse(br#"{"name": " ", "quantity": -1}"#).unwrap_err();
        let Invalid::Fields(fields) = err else {
            panic!("field errors expected, got {err:?}")
        };
        let names: Vec<_> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["name", "quantity"]);
    }

    #[test]
    fn the_wrong_shape_is_malformed_not_invalid() {
        for body in [
            &b"not json"[..],
            br#"{"name": "x"}"#,
            br#"{"name": "x", "quantity": 1, "extra": 1}"#,
        ] {
            assert!(
                matches!(NewItem::parse(body), Err(Invalid::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_fingerprint_tells_different_requests_apart() {
        let a = NewItem::parse(br#"{"name": "bolt", "quantity": 3}"#).unwrap();
        let b = NewItem::parse(br#"{"name": "bolt", "quantity": 4}"#).unwrap();
        let same = NewItem::parse(br#"{"quantity": 3, "name": "bolt"}"#).unwrap();
        assert_ne!(a.fingerprint("s"), b.fingerprint("s"));
        assert_eq!(
            a.fingerprint("s"),
            same.fingerprint("s"),
            "field order is not a difference"
        );
    }
}
