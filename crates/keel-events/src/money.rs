//! Money and currencies: integer minor units with an ISO 4217 code, never a float (STYLE
//! rule 9). Shared by checkout (prices, totals), billing (payments, its ledger's stored events)
//! and every event that carries an amount.
//!
//! A [`Currency`] is parsed, not validated later: holding one means the code is three
//! upper-case ASCII letters, so it is also `Copy` and serialises as the bare code (`"EUR"`);
//! deserialising parses, so a malformed code in a message or a stored event is an error at
//! the boundary, not a surprise deep inside. Arithmetic is checked: a total that would overflow
//! `i64` is an error the caller turns into a validation problem, not a wrapped negative price,
//! and amounts of different currencies never add up (the types refuse).
//!
//! Must not break: the wire form of a currency is its three-letter code; billing's stored
//! ledger events hold it, so changing it is a data migration.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An ISO 4217 currency code (three upper-case ASCII letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

/// Text that is not a currency code. Written by hand rather than with thiserror: this crate
/// depends on serde (and the types it carries) only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyError(String);

impl fmt::Display for CurrencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "currency must be three upper-case letters (ISO 4217), got {:?}",
            self.0
        )
    }
}

impl std::error::Error for CurrencyError {}

impl Currency {
    /// Parses three upper-case ASCII letters (`EUR`); anything else is an error.
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        let bytes: Option<[u8; 3]> = code.as_bytes().try_into().ok();
        match bytes {
            Some(b) if b.iter().all(u8::is_ascii_uppercase) => Ok(Self(b)),
            _ => Err(CurrencyError(code.to_owned())),
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII upper-case letters, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Currency {
    type Error = CurrencyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of money in integer minor units (cents), never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }

    /// `self × n`, or `None` on overflow.
    pub fn checked_mul(self, n: i64) -> Option<Self> {
        Some(Self {
            minor: self.minor.checked_mul(n)?,
            currency: self.currency,
        })
    }

    /// `self + other`, or `None` on overflow or when the currencies differ.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        (self.currency == other.currency).then_some(())?;
        Some(Self {
            minor: self.minor.checked_add(other.minor)?,
            currency: self.currency,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn money(minor: i64, code: &str) -> Money {
        Money {
            minor,
            currency: Currency::parse(code).unwrap(),
        }
    }

    #[test]
    fn currency_codes_are_three_upper_case_letters() {
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        for bad in ["eur", "EU", "EURO", "E1R", "", "ÉUR"] {
            let e = Currency::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("three upper-case letters"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn arithmetic_is_checked_and_never_mixes_currencies() {
        assert_eq!(money(250, "EUR").checked_mul(3), Some(money(750, "EUR")));
        assert_eq!(money(i64::MAX, "EUR").checked_mul(2), None);
        assert_eq!(
            money(1, "EUR").checked_add(money(2, "EUR")),
            Some(money(3, "EUR"))
        );
        assert_eq!(money(i64::MAX, "EUR").checked_add(money(1, "EUR")), None);
        assert_eq!(money(1, "EUR").checked_add(money(1, "USD")), None);
    }

    #[test]
    fn the_wire_form_is_the_bare_code_and_parsing_guards_it() {
        let m = money(1234, "EUR");
        let v = serde_json::to_value(m).unwrap();
        assert_eq!(v, serde_json::json!({"minor": 1234, "currency": "EUR"}));
        assert_eq!(serde_json::from_value::<Money>(v).unwrap(), m);
        let bad = serde_json::json!({"minor": 1, "currency": "euro"});
        assert!(serde_json::from_value::<Money>(bad).is_err());
    }
}
