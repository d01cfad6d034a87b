//! The email a notification becomes: plain text, one part, rendered from the stored row.
//!
//! - Subject: `Your order <order id>: <state>` (`confirmed`, `payment declined`, ...).
//! - Body: the notification's `message`, the same text the API serves.
//! - Message-ID: `<notification id@sender's domain>`. A retried send (at-least-once: see
//!   [`super`]) carries the same Message-ID as the first, so the receiving side can recognise
//!   and drop the duplicate; nothing else in the email identifies the attempt.
//!
//! Must not break: the Message-ID is a function of the notification only, never of the
//! attempt or the time.

use keel_events::CustomerId;
use lettre::Message;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MessageBuilder};

use super::address::{self, BadRecipient, RecipientDomain, Sender};
use crate::customer_notifications::Notification;

/// Why a notification cannot be rendered as an email. Permanent: nothing in a retry changes it.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Recipient(#[from] BadRecipient),
    #[error("building the email: {0}")]
    Build(#[from] lettre::error::Error),
}

/// The subject line: `Your order 0190…: payment declined`.
pub fn subject(notification: &Notification) -> String {
    let state = notification.kind.to_lowercase().replace('_', " ");
    format!("Your order {}: {state}", notification.order_id)
}

/// The Message-ID header's value: `<notification id@domain>` (RFC 5322 §3.6.4).
pub fn message_id(notification: &Notification, sender: &Sender) -> String {
    format!("<{}@{}>", notification.id, sender.domain())
}

/// The email for `notification`, from `sender` to the customer's derived address.
pub fn render(
    notification: &Notification,
    sender: &Sender,
    domain: &RecipientDomain,
) -> Result<Message, RenderError> {
    let customer = CustomerId::from(notification.customer_id.as_str());
    let to = address::recipient(&customer, domain)?;
    let email = MessageBuilder::new()
        .message_id(Some(message_id(notification, sender)))
        .from(sender.mailbox().clone())
        .to(Mailbox::new(None, to))
        .subject(subject(notification))
        .header(ContentType::TEXT_PLAIN)
        .body(notification.message.clone())?;
    Ok(email)
}

/// The email telling an endpoint's owner that deliveries to it stopped, and why.
/// Message-ID `<endpoint-disabled.<endpoint id>@domain>`: one per endpoint, whatever the
/// attempt.
pub fn render_endpoint_disabled(
    endpoint: &crate::webhooks::endpoints::OwnerEmail,
    sender: &Sender,
    domain: &RecipientDomain,
) -> Result<Message, RenderError> {
    let customer = CustomerId::from(endpoint.customer_id.as_str());
    let to = address::recipient(&customer, domain)?;
    let body = format!(
        "Keel stopped delivering webhooks to {url} (endpoint {id}): {reason}.\n\n\
         Deliveries to it have ended. Once it answers again, delete this one \
         (DELETE /v1/webhook-endpoints/{id}) and register it anew (POST /v1/webhook-endpoints).",
        url = endpoint.url,
        id = endpoint.id,
        reason = endpoint
            .disabled_reason
            .as_deref()
            .unwrap_or("it kept failing"),
    );
    Ok(MessageBuilder::new()
        .message_id(Some(format!(
            "<endpoint-disabled.{}@{}>",
            endpoint.id,
            sender.domain()
        )))
        .from(sender.mailbox().clone())
        .to(Mailbox::new(None, to))
        .subject("Your webhook endpoint was disabled")
        .header(ContentType::TEXT_PLAIN)
        .body(body)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    fn notification(customer_id: &str) -> Notification {
        Notification {
            id: Uuid::nil(),
            order_id: Uuid::max(),
            customer_id: customer_id.to_owned(),
            kind: "PAYMENT_DECLINED".to_owned(),
            message: "Your payment was declined; you have not been charged.".to_owned(),
            source_message_id: "m-1".to_owned(),
            created_at: Utc::now(),
        }
    }

    fn sender() -> Sender {
        Sender::try_from("Keel <notifications@keel.test>".to_owned()).unwrap()
    }

    fn domain() -> RecipientDomain {
        RecipientDomain::try_from("customers.keel.test".to_owned()).unwrap()
    }

    #[test]
    fn the_email_says_what_the_notification_says_to_the_derived_address() {
        let n = notification("cust-42");
        let email = render(&n, &sender(), &domain()).unwrap();
        let to: Vec<String> = email
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(to, ["cust-42@customers.keel.test"]);
        let text = String::from_utf8(email.formatted()).unwrap();
        assert!(
            text.contains(
                "Subject: Your order ffffffff-ffff-ffff-ffff-ffffffffffff: payment declined"
            ),
            "{text}"
        );
        assert!(
            text.contains("Message-ID: <00000000-0000-0000-0000-000000000000@keel.test>"),
            "{text}"
        );
        assert!(text.contains("you have not been charged"), "{text}");
    }

    #[test]
    fn an_unsafe_customer_id_renders_no_email() {
        let err = render(&notification("a@evil.example"), &sender(), &domain()).unwrap_err();
        assert!(matches!(err, RenderError::Recipient(_)), "{err}");
    }
}
