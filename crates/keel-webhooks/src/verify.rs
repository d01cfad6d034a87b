//! The receiving side (P32): is this message fresh, and did a key we accept sign it?
//!
//! [`Verifier::verify`] checks, in this order, what costs least first:
//! 1. the timestamp parses (else [`VerifyError::Timestamp`]);
//! 2. it is within the tolerance of the receiver's clock, either way ([`VerifyError::TooOld`],
//!    [`VerifyError::TooNew`]) — a request captured and replayed later fails here even though
//!    its signature is valid, and a sender whose clock runs ahead cannot mint messages that
//!    stay valid for long;
//! 3. one offered `v1` signature equals the HMAC under one accepted key, compared in constant
//!    time (`Mac::verify_slice`), so the time an answer takes says nothing about how much of a
//!    forged signature was right. Signatures of other versions and undecodable ones are
//!    skipped, as the specification asks, so a sender can add a scheme without breaking us.
//!
//! The clock is a parameter (`now_unix`): tests pin it, callers pass [`crate::unix_now`].
//! Must not break: the MAC is computed over the body bytes and the timestamp text exactly as
//! received.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::Mac;

use crate::key::SigningKey;

/// The three Standard Webhooks header values of a message, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// `webhook-timestamp`: unix seconds, as text.
    pub timestamp: &'a str,
    /// `webhook-signature`: space-separated `v1,<base64>` entries.
    pub signature: &'a str,
}

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not an integer number of seconds")]
    Timestamp,
    #[error("webhook-timestamp is older than the tolerance")]
    TooOld,
    #[error("webhook-timestamp is further in the future than the tolerance")]
    TooNew,
    #[error("no webhook-signature verifies with an accepted key")]
    Signature,
}

/// Verifies messages signed with any of several keys (two while a secret rotates).
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<SigningKey>,
    tolerance: Duration,
}

impl Verifier {
    /// Accepts signatures by any of `keys`, on messages stamped within `tolerance` of the
    /// receiver's clock (the specification suggests five minutes).
    pub fn new(keys: Vec<SigningKey>, tolerance: Duration) -> Self {
        Self { keys, tolerance }
    }

    /// Checks `signed`'s timestamp against `now_unix` and its signatures over `body`.
    pub fn verify(
        &self,
        signed: &Signed<'_>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), VerifyError> {
        let ts: i64 = signed
            .timestamp
            .parse()
            .map_err(|_| VerifyError::Timestamp)?;
        let tolerance = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
        if now_unix.saturating_sub(ts) > tolerance {
            return Err(VerifyError::TooOld);
        }
        if ts.saturating_sub(now_unix) > tolerance {
            return Err(VerifyError::TooNew);
        }
        // Decode every offered v1 signature once; other versions are not ours to judge.
        let offered: Vec<Vec<u8>> = signed
            .signature
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b64| BASE64.decode(b64).ok())
            .collect();
        for key in &self.keys {
            let mac = key.mac(signed.id, signed.timestamp, body);
            if offered
                .iter()
                .any(|sig| mac.clone().verify_slice(sig).is_ok())
            {
                return Ok(());
            }
        }
        Err(VerifyError::Signature)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sign_with_all;

    const OLD: &str = "whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6";
    const NEW: &str = "whsec_PAf8iVvpMPdIeZajLlzcZ/uiE0NDSRct";
    const BODY: &[u8] = br#"{"type":"payment.captured","data":{}}"#;
    const NOW: i64 = 1_700_000_000;

    fn key(s: &str) -> SigningKey {
        s.parse().unwrap()
    }

    fn verifier(keys: &[&str]) -> Verifier {
        Verifier::new(
            keys.iter().map(|k| key(k)).collect(),
            Duration::from_secs(300),
        )
    }

    fn signed<'a>(ts: &'a str, signature: &'a str) -> Signed<'a> {
        Signed {
            id: "msg_1",
            timestamp: ts,
            signature,
        }
    }

    #[test]
    fn the_reference_vector_verifies_among_other_signatures() {
        let v = Verifier::new(
            vec![key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            Duration::from_secs(300),
        );
        let msg = Signed {
            id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp: "1614265330",
            signature: "v1a,ignored v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        };
        assert_eq!(
            v.verify(&msg, br#"{"test": 2432232314}"#, 1_614_265_330),
            Ok(())
        );
    }

    #[test]
    fn rotation_accepts_either_secret_and_a_sender_signing_with_both() {
        let both = verifier(&[OLD, NEW]);
        for secret in [OLD, NEW] {
            let sig = key(secret).sign("msg_1", NOW, BODY);
            assert_eq!(both.verify(&signed("1700000000", &sig), BODY, NOW), Ok(()));
        }
        // The sender signs with old and new while receivers move from one to the other.
        let sig = sign_with_all(&[key(OLD), key(NEW)], "msg_1", NOW, BODY);
        for receiver in [verifier(&[OLD]), verifier(&[NEW])] {
            assert_eq!(
                receiver.verify(&signed("1700000000", &sig), BODY, NOW),
                Ok(())
            );
        }
        // Once the old secret is dropped, what only it signed is refused.
        let old_only = key(OLD).sign("msg_1", NOW, BODY);
        assert_eq!(
            verifier(&[NEW]).verify(&signed("1700000000", &old_only), BODY, NOW),
            Err(VerifyError::Signature)
        );
    }

    #[test]
    fn a_tampered_body_id_or_timestamp_is_refused() {
        let v = verifier(&[OLD]);
        let sig = key(OLD).sign("msg_1", NOW, BODY);
        let changed = br#"{"type":"payment.captured","data":{"x":1}}"#;
        assert_eq!(
            v.verify(&signed("1700000000", &sig), changed, NOW),
            Err(VerifyError::Signature)
        );
        let other_id = Signed {
            id: "msg_2",
            ..signed("1700000000", &sig)
        };
        assert_eq!(v.verify(&other_id, BODY, NOW), Err(VerifyError::Signature));
        // Re-stamping a captured message within the window does not carry its signature.
        assert_eq!(
            v.verify(&signed("1700000001", &sig), BODY, NOW),
            Err(VerifyError::Signature)
        );
        // A valid signature of another version, or garbage, is no signature.
        let v1a = sig.replacen("v1,", "v1a,", 1);
        assert_eq!(
            v.verify(&signed("1700000000", &v1a), BODY, NOW),
            Err(VerifyError::Signature)
        );
        assert_eq!(
            v.verify(&signed("1700000000", "v1,!!!"), BODY, NOW),
            Err(VerifyError::Signature)
        );
    }

    #[test]
    fn stale_and_future_timestamps_are_refused_at_the_tolerance() {
        let v = verifier(&[OLD]);
        for (ts, now, expected) in [
            (NOW, NOW + 300, Ok(())),
            (NOW, NOW + 301, Err(VerifyError::TooOld)),
            (NOW, NOW - 300, Ok(())),
            (NOW, NOW - 301, Err(VerifyError::TooNew)),
        ] {
            let sig = key(OLD).sign("msg_1", ts, BODY);
            let text = ts.to_string();
            assert_eq!(
                v.verify(&signed(&text, &sig), BODY, now),
                expected,
                "{ts} at {now}"
            );
        }
        assert_eq!(
            v.verify(&signed("soon", "v1,AAAA"), BODY, NOW),
            Err(VerifyError::Timestamp)
        );
        // Extremes do not overflow into acceptance.
        let sig = key(OLD).sign("msg_1", i64::MIN, BODY);
        assert_eq!(
            v.verify(&signed(&i64::MIN.to_string(), &sig), BODY, i64::MAX),
            Err(VerifyError::TooOld)
        );
    }
}
