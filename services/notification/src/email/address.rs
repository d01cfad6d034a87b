//! Who an email is from and who it goes to: parsed once, as types, never checked as strings at
//! the point of sending (zero2prod's `SubscriberEmail::parse`).
//!
//! - [`Sender`]: `email.from`, a mailbox (`Keel <notifications@keel.test>`), parsed when the
//!   configuration is loaded, so a bad one exits 78 naming the key.
//! - [`RecipientDomain`]: `email.recipient_domain`, the domain customer addresses are made in.
//! - [`recipient`]: a customer's address, `<customer_id>@<recipient_domain>`.
//!
//! Keel's journey carries a customer id (`cust-42`) and no email address, so the address is
//! *derived*. A real system would look the address up (a customer service, a profile table)
//! and would get consent and bounces back from its provider; deriving it keeps the delivery
//! pattern visible without inventing a customer database.
//!
//! Must not break: a customer id is only ever used as a local part if it passes
//! [`is_safe_local_part`]. The id comes from another service's event; without the check an id
//! like `a@evil.example` or one carrying a CR LF would choose its own recipient or headers.

use std::fmt;
use std::str::FromStr;

use keel_events::CustomerId;
use lettre::Address;
use lettre::message::Mailbox;

/// Longest local part RFC 5321 (§4.5.3.1.1) allows.
pub const MAX_LOCAL_PART: usize = 64;

/// `email.from`: the mailbox every email is sent from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Sender(Mailbox);

impl Sender {
    pub fn mailbox(&self) -> &Mailbox {
        &self.0
    }

    /// The domain of the sender's address: the right-hand side of our Message-IDs.
    pub fn domain(&self) -> &str {
        self.0.email.domain()
    }
}

impl TryFrom<String> for Sender {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Mailbox::from_str(&text)
            .map(Self)
            .map_err(|e| format!("not a mailbox like `Keel <notifications@keel.test>` ({e})"))
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `email.recipient_domain`: the domain of every derived customer address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct RecipientDomain(String);

impl RecipientDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RecipientDomain {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        // lettre's own address grammar decides; a probe local part that is always valid.
        match Address::new("probe", &text) {
            Ok(_) if !text.is_empty() => Ok(Self(text)),
            _ => Err("not a mail domain like `customers.keel.test`".to_owned()),
        }
    }
}

/// Why a customer cannot be emailed. Permanent: the same id fails the same way every time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("customer id {customer_id:?} is not a safe email local part")]
pub struct BadRecipient {
    pub customer_id: String,
}

/// A customer id that may stand as the local part of an address: 1 to 64 characters of ASCII
/// letters, digits, `-` and `_`, with single dots between them. A deliberately narrow subset of
/// RFC 5321's dot-atom: no quoting, no `+`, `@`, spaces or control characters.
pub fn is_safe_local_part(id: &str) -> bool {
    let atom_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    !id.is_empty()
        && id.len() <= MAX_LOCAL_PART
        && id
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atom_char))
}

/// The customer's address: `<customer_id>@<domain>`, or [`BadRecipient`] for an unsafe id.
pub fn recipient(customer: &CustomerId, domain: &RecipientDomain) -> Result<Address, BadRecipient> {
    let bad = || BadRecipient {
        customer_id: customer.as_str().to_owned(),
    };
    if !is_safe_local_part(customer.as_str()) {
        return Err(bad());
    }
    // A second opinion from lettre's grammar; cannot disagree with the rule above today.
    Address::new(customer.as_str(), domain.as_str()).map_err(|_| bad())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn domain() -> RecipientDomain {
        RecipientDomain::try_from("customers.keel.test".to_owned()).unwrap()
    }

    #[test]
    fn a_customer_id_becomes_the_local_part() {
        let to = recipient(&CustomerId::from("cust-42"), &domain()).unwrap();
        assert_eq!(to.to_string(), "cust-42@customers.keel.test");
        let dotted = recipient(&CustomerId::from("ada.lovelace_1"), &domain()).unwrap();
        assert_eq!(dotted.user(), "ada.lovelace_1");
    }

    #[test]
    fn an_id_that_would_choose_its_own_recipient_or_headers_is_refused() {
        let long = "x".repeat(MAX_LOCAL_PART + 1);
        for id in [
            "",
            "a@evil.example",
            "cust 42",
            "cust-42\r\nBcc: victim@example.com",
            "\"quoted\"",
            "a+tag",
            ".leading",
            "trailing.",
            "two..dots",
            "<cust>",
            "ünïcode",
            long.as_str(),
        ] {
            let err = recipient(&CustomerId::from(id), &domain()).unwrap_err();
            assert_eq!(err.customer_id, id);
        }
        assert!(is_safe_local_part(&"x".repeat(MAX_LOCAL_PART)));
    }

    #[test]
    fn config_values_parse_or_say_what_they_should_look_like() {
        let sender = Sender::try_from("Keel <notifications@keel.test>".to_owned()).unwrap();
        assert_eq!(sender.domain(), "keel.test");
        assert!(Sender::try_from("not an address".to_owned()).is_err());
        assert!(RecipientDomain::try_from(String::new()).is_err());
        assert!(RecipientDomain::try_from("bad domain".to_owned()).is_err());
    }
}
