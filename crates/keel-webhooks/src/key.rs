//! The signing key: a `whsec_<base64>` secret parsed once into HMAC key bytes, and the `v1`
//! signature it makes (P32, the sending side).
//!
//! A secret is parsed, not validated later: once a [`SigningKey`] exists it is usable, so a
//! bad secret fails at start-up (configuration, exit 78) rather than at the first delivery.
//! Must not break: the key bytes never leave this type — no `Debug`, `Display` or error shows
//! them, and there is no `PartialEq` (which would invite a comparison that is not
//! constant-time).

use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::SECRET_PREFIX;

/// Shortest key the Standard Webhooks specification allows (192 bits).
pub const MIN_KEY_LEN: usize = 24;

/// Longest key the Standard Webhooks specification allows (512 bits).
pub const MAX_KEY_LEN: usize = 64;

/// Why a secret is unusable. Never carries the secret itself, so it can be printed with the
/// configuration key that held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("must start with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("the part after `{SECRET_PREFIX}` is not standard base64")]
    NotBase64,
    #[error("key is {0} bytes; Standard Webhooks keys are {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes")]
    Length(usize),
}

/// The HMAC key decoded from a `whsec_` secret.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// Bytes of a secret made by [`new_secret`]: 256 bits, inside the specification's bounds.
pub const NEW_KEY_LEN: usize = 32;

/// A new `whsec_<base64>` secret for an endpoint, from the operating system's CSPRNG. The
/// caller shows it to the endpoint's owner once and keeps it to sign with.
///
/// # Errors
/// Only if the operating system has no randomness to give (then nothing must be signed).
pub fn new_secret() -> Result<String, rand::rand_core::OsError> {
    use rand::TryRngCore;
    let mut key = [0_u8; NEW_KEY_LEN];
    rand::rngs::OsRng.try_fill_bytes(&mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", BASE64.encode(key)))
}

impl SigningKey {
    /// Decodes `whsec_<base64>` into the key bytes.
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256>` over
    /// `"{id}.{timestamp}.{body}"`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, &timestamp.to_string(), body).finalize();
        format!("v1,{}", BASE64.encode(tag.into_bytes()))
    }

    /// The HMAC state after the signed content; `timestamp` is the header's text as sent.
    pub(crate) fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length (longer ones are hashed first), and `parse` bounds
        // this one to 24..=64 bytes, so there is no error to handle.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl FromStr for SigningKey {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The `webhook-signature` value signed by every key in `keys`, space-separated: what a sender
/// sends while it rotates its secret, so receivers that know only the old or only the new
/// secret both accept the message.
pub fn sign_with_all(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_new_secret_parses_and_is_never_the_same_twice() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert!(a.starts_with("whsec_"), "{a}");
        assert_ne!(a, b);
        assert!(SigningKey::parse(&a).is_ok());
        assert_eq!(BASE64.decode(&a[6..]).unwrap().len(), NEW_KEY_LEN);
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_24_to_64_bytes() {
        assert!(SigningKey::parse("whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6").is_ok());
        assert_eq!(
            SigningKey::parse("S2vWrImrY1hJwx70XjbtZeu65l4ixwO6").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_not base64!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::Length(5)
        );
        let long = format!("{SECRET_PREFIX}{}", BASE64.encode([7u8; 65]));
        assert_eq!(
            SigningKey::parse(&long).unwrap_err(),
            SecretError::Length(65)
        );
    }

    #[test]
    fn neither_debug_nor_errors_show_the_secret() {
        let key = SigningKey::parse("whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6").unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
        let e = SigningKey::parse("S2vWrImrY1hJwx70XjbtZeu65l4ixwO6").unwrap_err();
        assert!(!e.to_string().contains("S2vW"), "{e}");
    }

    /// The vector of the Standard Webhooks reference libraries (and Svix's, which the
    /// specification grew from): reproducing it byte for byte is what says that a receiver
    /// using any of those libraries accepts what Keel sends.
    #[test]
    fn signatures_match_the_standard_webhooks_reference_vectors() {
        let key: SigningKey = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // standard-webhooks/standard-webhooks, libraries/rust `test_sign`.
        let key: SigningKey = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse().unwrap();
        assert_eq!(
            key.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn signing_with_several_keys_lists_one_signature_per_key() {
        let old: SigningKey = "whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6".parse().unwrap();
        let new: SigningKey = "whsec_PAf8iVvpMPdIeZajLlzcZ/uiE0NDSRct".parse().unwrap();
        let both = sign_with_all(&[old.clone(), new.clone()], "msg_1", 1000, b"{}");
        assert_eq!(
            both,
            format!(
                "{} {}",
                old.sign("msg_1", 1000, b"{}"),
                new.sign("msg_1", 1000, b"{}")
            )
        );
    }
}
