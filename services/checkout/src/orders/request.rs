//! The body of `POST /v1/orders`: parsed, not merely validated (a [`PlaceOrder`] can only
//! exist with valid fields), with one error per invalid field so a client can fix them all
//! at once.
//!
//! Two stages: [`parse`] checks what the body alone can tell (types, lengths, ranges,
//! duplicates); [`price`] checks what needs the catalogue (unknown SKUs, the products'
//! currency, the total's range) inside the placing transaction.
//!
//! Syntax errors (not JSON, not an object) are 400; so is a member the API does not define,
//! at any depth (`lines[0].colour`), so a typo or an injected property (`customer_id`, `total`)
//! is refused rather than silently ignored, as Stripe does. JSON that breaks the rules is 422.
//! Both list the fields in `errors: [{field, message}]`.
//!
//! The unknown-member check is [`ORDER_FIELDS`] and [`LINE_FIELDS`] here, not serde's
//! `deny_unknown_fields`: serde stops at the first unknown member and does not say where it
//! is, while this names every one with its path. A unit test keeps both lists equal to the
//! parsed types' fields, so a new field cannot be forgotten in them.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};
use keel_events::{Currency, Money};

/// The members an order body may have; any other is refused (400).
pub const ORDER_FIELDS: &[&str] = &["currency", "payment_token", "lines"];
/// The members a line may have.
pub const LINE_FIELDS: &[&str] = &["sku", "quantity"];
/// Unknown members named in one answer, at most: a body can hold thousands.
const MAX_UNKNOWN_REPORTED: usize = 20;

/// Longest `payment_token`.
pub const MAX_TOKEN_CHARS: usize = 200;
/// Longest SKU (the products table's format allows 32).
const MAX_SKU_CHARS: usize = 32;

/// The limits from `[orders]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_lines: usize,
    pub max_quantity: i32,
}

/// A well-formed order request (not yet checked against the catalogue). It names no customer:
/// the order is placed for the caller's API key's customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlaceOrder {
    pub currency: Currency,
    pub payment_token: String,
    pub lines: Vec<RequestedLine>,
}

/// One requested line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestedLine {
    pub sku: String,
    pub quantity: i32,
}

/// A line with the price it was ordered at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price: Money,
}

impl PlaceOrder {
    /// The request's fingerprint for idempotency: the parsed request in a fixed field order,
    /// so insignificant differences (whitespace, key order) do not count as a different
    /// request, and every field that changes the effect does.
    pub fn fingerprint(&self, scope: &str) -> Vec<u8> {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        keel_pg::idempotency::fingerprint(&[scope.as_bytes(), &canonical])
    }

    /// The distinct SKUs requested.
    pub fn skus(&self) -> Vec<String> {
        self.lines.iter().map(|l| l.sku.clone()).collect()
    }
}

fn text(
    obj: &Map<String, Value>,
    field: &str,
    max_chars: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => errors.push(FieldError::new(field, "required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.push(FieldError::new(field, "must not be empty"));
        }
        Some(Value::String(s)) if s.chars().count() > max_chars => {
            errors.push(FieldError::new(
                field,
                format!("must be at most {max_chars} characters"),
            ));
        }
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            errors.push(FieldError::new(
                field,
                "must not contain control characters",
            ));
        }
        Some(Value::String(s)) => return Some(s.clone()),
        Some(_) => errors.push(FieldError::new(field, "must be a string")),
    }
    None
}

/// Every member of `obj` not in `known`, as a field error at `path`.
fn unknown_members(
    obj: &Map<String, Value>,
    known: &[&str],
    path: &str,
    unknown: &mut Vec<FieldError>,
) {
    for name in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        let message = if path.is_empty() && name == "customer_id" {
            "unknown field: the order is placed for the API key's customer".to_owned()
        } else {
            format!("unknown field; expected one of: {}", known.join(", "))
        };
        unknown.push(FieldError::new(format!("{path}{name}"), message));
    }
}

/// The members of `obj` (the whole body) that the API does not define, with their paths.
/// Lines that are not objects are left to validation, which reports them.
fn unknown_fields(obj: &Map<String, Value>) -> Vec<FieldError> {
    let mut unknown = Vec::new();
    unknown_members(obj, ORDER_FIELDS, "", &mut unknown);
    if let Some(Value::Array(lines)) = obj.get("lines") {
        for (i, line) in lines.iter().enumerate() {
            if let Value::Object(line) = line {
                unknown_members(line, LINE_FIELDS, &format!("lines[{i}]."), &mut unknown);
            }
        }
    }
    unknown.truncate(MAX_UNKNOWN_REPORTED);
    unknown
}

/// Parses the body of `POST /v1/orders`.
pub fn parse(body: &[u8], limits: Limits) -> Result<PlaceOrder, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::MalformedJson(
            "the body must be a JSON object".to_owned(),
        ));
    };
    let unknown = unknown_fields(&obj);
    if !unknown.is_empty() {
        return Err(ApiError::UnknownFields(unknown));
    }
    let mut errors = Vec::new();
    let currency = match obj.get("currency") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("currency", "required"));
            None
        }
        Some(Value::String(s)) => {
            let c = Currency::parse(s).ok();
            if c.is_none() {
                errors.push(FieldError::new(
                    "currency",
                    "must be an ISO 4217 code (three upper-case letters)",
                ));
            }
            c
        }
        Some(_) => {
            errors.push(FieldError::new("currency", "must be a string"));
            None
        }
    };
    let payment_token = text(&obj, "payment_token", MAX_TOKEN_CHARS, &mut errors);
    let lines = parse_lines(obj.get("lines"), limits, &mut errors);
    match (currency, payment_token, lines) {
        (Some(currency), Some(payment_token), Some(lines)) if errors.is_empty() => Ok(PlaceOrder {
            currency,
            payment_token,
            lines,
        }),
        _ => Err(ApiError::Validation(errors)),
    }
}

fn parse_lines(
    value: Option<&Value>,
    limits: Limits,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<RequestedLine>> {
    let items = match value {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("lines", "required"));
            return None;
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            errors.push(FieldError::new("lines", "must be an array"));
            return None;
        }
    };
    if items.is_empty() {
        errors.push(FieldError::new("lines", "must have at least one line"));
        return None;
    }
    if items.len() > limits.max_lines {
        // Not checked line by line: a huge list would make a huge error document.
        errors.push(FieldError::new(
            "lines",
            format!("must have at most {} lines", limits.max_lines),
        ));
        return None;
    }
    let before = errors.len();
    let mut lines = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Object(line) = item else {
            errors.push(FieldError::new(format!("lines[{i}]"), "must be an object"));
            continue;
        };
        let sku_field = format!("lines[{i}].sku");
        let sku = text(line, "sku", MAX_SKU_CHARS, &mut Vec::new());
        match (&sku, line.get("sku")) {
            (Some(sku), _) if !seen.insert(sku.clone()) => errors.push(FieldError::new(
                &sku_field,
                "duplicate SKU; put the whole quantity on one line",
            )),
            (Some(_), _) => {}
            (None, None | Some(Value::Null)) => {
                errors.push(FieldError::new(&sku_field, "required"))
            }
            (None, Some(Value::String(s))) if s.trim().is_empty() => {
                errors.push(FieldError::new(&sku_field, "must not be empty"));
            }
            (None, Some(Value::String(_))) => {
                errors.push(FieldError::new(&sku_field, "unknown SKU"))
            }
            (None, Some(_)) => errors.push(FieldError::new(&sku_field, "must be a string")),
        }
        let quantity_field = format!("lines[{i}].quantity");
        let range = format!("must be between 1 and {}", limits.max_quantity);
        let quantity = match line.get("quantity") {
            None | Some(Value::Null) => {
                errors.push(FieldError::new(&quantity_field, "required"));
                None
            }
            Some(Value::Number(n)) => match n.as_i64() {
                Some(q) if (1..=i64::from(limits.max_quantity)).contains(&q) => {
                    i32::try_from(q).ok()
                }
                Some(_) => {
                    errors.push(FieldError::new(&quantity_field, range));
                    None
                }
                // A fraction, or an integer beyond i64.
                None if n.is_f64() => {
                    errors.push(FieldError::new(&quantity_field, "must be an integer"));
                    None
                }
                None => {
                    errors.push(FieldError::new(&quantity_field, range));
                    None
                }
            },
            Some(_) => {
                errors.push(FieldError::new(&quantity_field, "must be an integer"));
                None
            }
        };
        if let (Some(sku), Some(quantity)) = (sku, quantity) {
            lines.push(RequestedLine { sku, quantity });
        }
    }
    (errors.len() == before).then_some(lines)
}

/// Prices `order`'s lines from the catalogue (`prices`: SKU → current price). Errors: unknown
/// SKUs, an order currency that is not the products' currency, a total beyond `i64`.
pub fn price(
    order: &PlaceOrder,
    prices: &HashMap<String, Money>,
) -> Result<(Vec<PricedLine>, Money), ApiError> {
    let mut errors = Vec::new();
    let mut lines = Vec::with_capacity(order.lines.len());
    let mut total = Some(Money::zero(order.currency));
    let mut product_currency = None;
    for (i, line) in order.lines.iter().enumerate() {
        let Some(price) = prices.get(&line.sku) else {
            errors.push(FieldError::new(format!("lines[{i}].sku"), "unknown SKU"));
            continue;
        };
        if price.currency != order.currency {
            product_currency.get_or_insert(price.currency);
            continue;
        }
        total = total.and_then(|t| t.checked_add(price.checked_mul(i64::from(line.quantity))?));
        lines.push(PricedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price: *price,
        });
    }
    if let Some(c) = product_currency {
        errors.push(FieldError::new(
            "currency",
            format!("must match the products' currency ({c})"),
        ));
    }
    match total {
        Some(total) if errors.is_empty() => Ok((lines, total)),
        Some(_) => Err(ApiError::Validation(errors)),
        None => {
            errors.push(FieldError::new("lines", "the order total is too large"));
            Err(ApiError::Validation(errors))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_lines: 3,
        max_quantity: 10,
    };

    fn errors(body: serde_json::Value) -> Vec<(String, String)> {
        match parse(body.to_string().as_bytes(), LIMITS) {
            Err(ApiError::Validation(e)) => e.into_iter().map(|e| (e.field, e.message)).collect(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn fields(body: serde_json::Value) -> Vec<String> {
        errors(body).into_iter().map(|(f, _)| f).collect()
    }

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "currency": "EUR", "payment_token": "tok_approve",
            "lines": [{"sku": "KEEL-MUG", "quantity": 2}]
        })
    }

    #[test]
    fn a_valid_body_parses() {
        let p = parse(valid().to_string().as_bytes(), LIMITS).unwrap();
        assert_eq!(p.payment_token, "tok_approve");
        assert_eq!(p.lines[0].quantity, 2);
    }

    fn unknown(body: serde_json::Value) -> Vec<String> {
        match parse(body.to_string().as_bytes(), LIMITS) {
            Err(ApiError::UnknownFields(e)) => e.into_iter().map(|e| e.field).collect(),
            other => panic!("expected unknown fields, got {other:?}"),
        }
    }

    #[test]
    fn unknown_members_are_named_with_their_paths_at_every_depth() {
        let mut body = valid();
        body["customer_id"] = serde_json::json!("cus_1");
        body["totl"] = serde_json::json!(1);
        body["lines"] = serde_json::json!([
            {"sku": "A-1", "quantity": 1, "colour": "red"},
            "not an object",
            {"sku": "A-2", "qty": 1}
        ]);
        let mut got = unknown(body);
        got.sort();
        assert_eq!(
            got,
            ["customer_id", "lines[0].colour", "lines[2].qty", "totl"]
        );
        // Even with a null value, and before any other validation (currency is wrong too).
        assert_eq!(
            unknown(serde_json::json!({"currency": 7, "x": null})),
            ["x"]
        );
    }

    #[test]
    fn the_known_member_lists_are_the_parsed_types_fields() {
        let order = parse(valid().to_string().as_bytes(), LIMITS).unwrap();
        let value = serde_json::to_value(&order).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut known = ORDER_FIELDS.to_vec();
        fields.sort_unstable();
        known.sort_unstable();
        assert_eq!(fields, known);
        let line = serde_json::to_value(&order.lines[0]).unwrap();
        let mut fields: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut known = LINE_FIELDS.to_vec();
        fields.sort_unstable();
        known.sort_unstable();
        assert_eq!(fields, known);
    }

    #[test]
    fn syntax_errors_are_not_validation_errors() {
        for body in [&b"{"[..], b"[]", b"42", b""] {
            assert!(matches!(
                parse(body, LIMITS),
                Err(ApiError::MalformedJson(_))
            ));
        }
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let f = fields(serde_json::json!({
            "currency": "eur", "payment_token": 7,
            "lines": [{"sku": "KEEL-MUG", "quantity": 0}, {"quantity": 1.5}, "x"]
        }));
        assert_eq!(
            f,
            [
                "currency",
                "payment_token",
                "lines[0].quantity",
                "lines[1].sku",
                "lines[1].quantity",
                "lines[2]"
            ]
        );
    }

    #[test]
    fn line_count_and_quantity_are_bounded_by_config() {
        let mut body = valid();
        body["lines"] = serde_json::json!([]);
        assert_eq!(fields(body.clone()), ["lines"]);
        body["lines"] = serde_json::json!([
            {"sku": "A-1", "quantity": 1}, {"sku": "A-2", "quantity": 1},
            {"sku": "A-3", "quantity": 1}, {"sku": "A-4", "quantity": 1}
        ]);
        assert_eq!(
            errors(body.clone()),
            [("lines".into(), "must have at most 3 lines".into())]
        );
        body["lines"] = serde_json::json!([{"sku": "A-1", "quantity": 11}]);
        assert_eq!(
            errors(body),
            [(
                "lines[0].quantity".into(),
                "must be between 1 and 10".into()
            )]
        );
    }

    #[test]
    fn duplicate_skus_and_overlong_text_are_rejected() {
        let mut body = valid();
        body["payment_token"] = serde_json::json!("t".repeat(MAX_TOKEN_CHARS + 1));
        body["lines"] = serde_json::json!([
            {"sku": "KEEL-MUG", "quantity": 1}, {"sku": "KEEL-MUG", "quantity": 1}
        ]);
        assert_eq!(fields(body), ["payment_token", "lines[1].sku"]);
    }

    #[test]
    fn the_fingerprint_ignores_formatting_but_not_content() {
        let a = parse(
            br#"{"currency":"EUR","payment_token":"t","lines":[{"sku":"S-1","quantity":1}]}"#,
            LIMITS,
        )
        .unwrap();
        let b = parse(br#"{ "lines": [ {"quantity": 1, "sku": "S-1"} ], "payment_token": "t", "currency": "EUR" }"#, LIMITS).unwrap();
        let c = parse(
            br#"{"currency":"EUR","payment_token":"t","lines":[{"sku":"S-1","quantity":2}]}"#,
            LIMITS,
        )
        .unwrap();
        assert_eq!(a.fingerprint("s"), b.fingerprint("s"));
        assert_ne!(a.fingerprint("s"), c.fingerprint("s"));
        assert_ne!(a.fingerprint("s"), a.fingerprint("other scope"));
    }

    #[test]
    fn pricing_reports_unknown_skus_currency_and_overflow() {
        let eur = Currency::parse("EUR").unwrap();
        let usd = Currency::parse("USD").unwrap();
        let mut order = parse(valid().to_string().as_bytes(), LIMITS).unwrap();
        let mut prices = HashMap::new();
        assert!(
            matches!(price(&order, &prices), Err(ApiError::Validation(e)) if e[0].field == "lines[0].sku")
        );
        prices.insert(
            "KEEL-MUG".to_owned(),
            Money {
                minor: 1200,
                currency: usd,
            },
        );
        assert!(
            matches!(price(&order, &prices), Err(ApiError::Validation(e)) if e[0].field == "currency")
        );
        prices.insert(
            "KEEL-MUG".to_owned(),
            Money {
                minor: 1200,
                currency: eur,
            },
        );
        let (lines, total) = price(&order, &prices).unwrap();
        assert_eq!((lines.len(), total.minor), (1, 2400));
        prices.insert(
            "KEEL-MUG".to_owned(),
            Money {
                minor: i64::MAX,
                currency: eur,
            },
        );
        order.lines[0].quantity = 2;
        assert!(
            matches!(price(&order, &prices), Err(ApiError::Validation(e)) if e[0].field == "lines")
        );
    }
}
