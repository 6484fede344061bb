//! Standard Webhooks signing (pure, no I/O).
//!
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`
//! where the key is the base64-decoded part of a `whsec_…` secret; or, with
//! a `whsk_…` Ed25519 secret key, `v1a,<base64(Ed25519 signature of the
//! same content)>`, which a receiver verifies with the `whpk_…` public key
//! and so never holds anything that could sign. With several active keys
//! (rotation, or both schemes) the signatures are space-separated; a
//! receiver accepts the message when any of them verifies.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// A decoded signing key: `whsec_` (HMAC, `v1`) or `whsk_` (Ed25519, `v1a`).
///
/// `Debug` never prints the key: a secret must not reach a log line even by
/// accident through `{:?}` of a config struct.
#[derive(Clone)]
pub enum SigningKey {
    Hmac(Vec<u8>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SigningKey::Hmac(a), SigningKey::Hmac(b)) => a == b,
            (SigningKey::Ed25519(a), SigningKey::Ed25519(b)) => a.to_bytes() == b.to_bytes(),
            _ => false,
        }
    }
}

impl Eq for SigningKey {}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// Why a secret was refused. The message never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "expected a secret of the form `whsec_<base64>` (make one with `pollhook secret generate`) or an Ed25519 `whsk_<base64>` (`pollhook secret generate --ed25519`)"
    )]
    NoPrefix,
    #[error(
        "a `whsk_` key holds 32 bytes (the seed) or 64 (seed and public key); this one has {0}"
    )]
    BadEd25519Length(usize),
    #[error("the part after `whsec_` is not valid base64")]
    NotBase64,
    #[error("the key is {0} bytes long; expected 24 to 64 bytes")]
    BadLength(usize),
}

impl SigningKey {
    /// Parses `whsec_<base64>` or `whsk_<base64>`.
    pub fn parse(secret: &str) -> Result<Self, KeyError> {
        let secret = secret.trim();
        if let Some(b64) = secret.strip_prefix("whsk_") {
            let bytes = B64.decode(b64).map_err(|_| KeyError::NotBase64)?;
            if bytes.len() != 32 && bytes.len() != 64 {
                return Err(KeyError::BadEd25519Length(bytes.len()));
            }
            let seed: [u8; 32] = bytes[..32].try_into().expect("length checked");
            return Ok(SigningKey::Ed25519(Box::new(
                ed25519_dalek::SigningKey::from_bytes(&seed),
            )));
        }
        let b64 = secret.strip_prefix("whsec_").ok_or(KeyError::NoPrefix)?;
        let bytes = B64.decode(b64).map_err(|_| KeyError::NotBase64)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(KeyError::BadLength(bytes.len()));
        }
        Ok(SigningKey::Hmac(bytes))
    }

    /// A new Ed25519 key pair: (`whsk_…` secret key, `whpk_…` public key).
    pub fn generate_ed25519() -> (String, String) {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        (
            format!("whsk_{}", B64.encode(seed)),
            format!("whpk_{}", B64.encode(key.verifying_key().to_bytes())),
        )
    }

    /// The `whpk_…` public key of an Ed25519 key (what receivers hold).
    pub fn public_key(&self) -> Option<String> {
        match self {
            SigningKey::Ed25519(k) => {
                Some(format!("whpk_{}", B64.encode(k.verifying_key().to_bytes())))
            }
            SigningKey::Hmac(_) => None,
        }
    }

    /// A new random 32-byte key, as `whsec_…` text.
    pub fn generate() -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        format!("whsec_{}", B64.encode(bytes))
    }

    /// `v1,<base64 signature>` (or `v1a,…`) of one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        match self {
            SigningKey::Hmac(key) => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
            }
            SigningKey::Ed25519(key) => {
                use ed25519_dalek::Signer;
                let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
                msg.extend_from_slice(id.as_bytes());
                msg.push(b'.');
                msg.extend_from_slice(timestamp.to_string().as_bytes());
                msg.push(b'.');
                msg.extend_from_slice(body);
                format!("v1a,{}", B64.encode(key.sign(&msg).to_bytes()))
            }
        }
    }
}

/// The `webhook-signature` header value: one `v1,…` per key, space-separated.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `X-Hub-Signature-256` for receivers written for GitHub-style webhooks:
/// `sha256=<hex HMAC-SHA256(secret, body)>`, keyed with the secret as text.
pub fn hub_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Checks a `webhook-signature` header against a key: true when any of its
/// `v1` signatures matches (constant-time comparison).
pub fn verify(key: &SigningKey, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = key.sign(id, timestamp, body);
    header
        .split(' ')
        .any(|sig| constant_time_eq(sig.as_bytes(), expected.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ, for
/// comparing secrets and signatures.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn second_reference_vector() {
        let key = SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            key.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn ed25519_keys_sign_v1a_that_the_public_key_verifies() {
        use ed25519_dalek::Verifier;
        let (sk, pk) = SigningKey::generate_ed25519();
        assert!(sk.starts_with("whsk_") && pk.starts_with("whpk_"));
        let key = SigningKey::parse(&sk).unwrap();
        assert_eq!(key.public_key().as_deref(), Some(pk.as_str()));
        let sig = key.sign("msg_1", 1614265330, br#"{"a":1}"#);
        let b64 = sig.strip_prefix("v1a,").expect("v1a");
        let sig = ed25519_dalek::Signature::from_slice(&B64.decode(b64).unwrap()).unwrap();
        let public: [u8; 32] = B64
            .decode(pk.strip_prefix("whpk_").unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
        assert!(vk.verify(br#"msg_1.1614265330.{"a":1}"#, &sig).is_ok());
        assert!(vk.verify(br#"msg_1.1614265331.{"a":1}"#, &sig).is_err());
        // Mixed rotation: both schemes in one header.
        let hmac = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let h = signature_header(&[hmac, key], "msg_1", 5, b"{}");
        assert!(h.starts_with("v1,") && h.contains(" v1a,"), "{h}");
        assert_eq!(
            SigningKey::parse("whsk_AAAA"),
            Err(KeyError::BadEd25519Length(3))
        );
    }

    #[test]
    fn github_hub_signature_vector() {
        assert_eq!(
            hub_signature("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn several_keys_sign_space_separated_and_each_verifies() {
        let a = SigningKey::parse(&SigningKey::generate()).unwrap();
        let b = SigningKey::parse(&SigningKey::generate()).unwrap();
        let h = signature_header(&[a.clone(), b.clone()], "msg_1", 5, b"{}");
        assert_eq!(h.split(' ').count(), 2);
        assert!(verify(&a, "msg_1", 5, b"{}", &h));
        assert!(verify(&b, "msg_1", 5, b"{}", &h));
        assert!(!verify(&a, "msg_1", 6, b"{}", &h));
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        assert_eq!(SigningKey::parse("hunter2"), Err(KeyError::NoPrefix));
        assert_eq!(SigningKey::parse("whsec_!!!"), Err(KeyError::NotBase64));
        assert_eq!(SigningKey::parse("whsec_AAAA"), Err(KeyError::BadLength(3)));
        assert!(
            !format!("{:?}", SigningKey::parse(&SigningKey::generate()).unwrap()).contains("whsec")
        );
    }
}
