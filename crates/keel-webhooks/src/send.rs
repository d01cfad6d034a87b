//! The sending side's three headers, made together so a sender cannot forget one or stamp
//! the signature with a different timestamp from the one it sends (P32, the sending side;
//! used by webhook delivery, P33).
//!
//! Must not break: the signature is computed over exactly the `msg_id`, `timestamp` and body
//! bytes that go out; the caller sends `body` as given, never a re-serialisation of it.

use crate::{ID_HEADER, SIGNATURE_HEADER, SigningKey, TIMESTAMP_HEADER};

/// `webhook-id`, `webhook-timestamp` and `webhook-signature` for one attempt, as
/// `(header name, value)` pairs for any HTTP client. `msg_id` stays the same on every retry
/// (receivers dedupe on it); `timestamp` is the attempt's own ([`crate::unix_now`]). To sign
/// with several keys while a secret rotates, replace the signature value with
/// [`crate::sign_with_all`].
///
/// ```
/// use keel_webhooks::{SigningKey, send::signed_headers};
///
/// let key: SigningKey = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse()?;
/// let headers = signed_headers(&key, "msg_1", 1_700_000_000, b"{}");
/// assert_eq!(headers[0], ("webhook-id", "msg_1".to_owned()));
/// assert_eq!(headers[1], ("webhook-timestamp", "1700000000".to_owned()));
/// assert!(headers[2].1.starts_with("v1,"));
/// # Ok::<(), keel_webhooks::SecretError>(())
/// ```
pub fn signed_headers(
    key: &SigningKey,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        (ID_HEADER, msg_id.to_owned()),
        (TIMESTAMP_HEADER, timestamp.to_string()),
        (SIGNATURE_HEADER, key.sign(msg_id, timestamp, body)),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::{Signed, Verifier};

    #[test]
    fn a_receiver_accepts_what_the_headers_carry() {
        let key: SigningKey = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let body = br#"{"type":"order.confirmed"}"#;
        let [(_, id), (_, timestamp), (_, signature)] =
            signed_headers(&key, "msg_42", 1_700_000_000, body);
        let verifier = Verifier::new(vec![key], Duration::from_secs(300));
        let signed = Signed {
            id: &id,
            timestamp: &timestamp,
            signature: &signature,
        };
        assert!(verifier.verify(&signed, body, 1_700_000_010).is_ok());
    }
}
