//! Money and currencies: integer minor units with an ISO 4217 code, never a float.
//!
//! Arithmetic is checked: a total that would overflow `i64` is an error the caller turns into
//! a validation problem, not a wrapped negative price. Amounts of different currencies never
//! add up (the types refuse).

use serde::Serialize;

/// An ISO 4217 currency code (three upper-case ASCII letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses three upper-case ASCII letters.
    pub fn parse(code: &str) -> Option<Self> {
        let bytes: [u8; 3] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Self(bytes))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An amount of money in integer minor units (cents), never a float.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
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
mod tests {
    use super::*;

    fn eur(minor: i64) -> Money {
        Money {
            minor,
            currency: Currency::parse("EUR").unwrap_or(Currency(*b"EUR")),
        }
    }

    #[test]
    fn currency_codes_are_three_upper_case_letters() {
        assert!(Currency::parse("EUR").is_some());
        for bad in ["eur", "EU", "EURO", "E1R", ""] {
            assert!(Currency::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn arithmetic_is_checked_and_never_mixes_currencies() {
        assert_eq!(eur(250).checked_mul(3), Some(eur(750)));
        assert_eq!(eur(i64::MAX).checked_mul(2), None);
        assert_eq!(eur(1).checked_add(eur(2)), Some(eur(3)));
        assert_eq!(eur(i64::MAX).checked_add(eur(1)), None);
        let usd = Money {
            minor: 1,
            currency: Currency(*b"USD"),
        };
        assert_eq!(eur(1).checked_add(usd), None);
    }
}
