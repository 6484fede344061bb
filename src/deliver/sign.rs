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
    format!("sha256={}", hex::encode(digest))
}

/// What a receiver verifies with: the shared `whsec_` secret (`v1`), or
/// an Ed25519 `whpk_` public key (`v1a`; a `whsk_` secret key is accepted
/// too and stands for its public key).
pub enum VerifyKey {
    Hmac(SigningKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl VerifyKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if let Some(b64) = text.strip_prefix("whpk_") {
            let bytes = B64.decode(b64).map_err(|_| KeyError::NotBase64)?;
            let raw: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::BadEd25519Length(bytes.len()))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
                .map_err(|_| KeyError::BadEd25519Length(bytes.len()))?;
            return Ok(VerifyKey::Ed25519(key));
        }
        match SigningKey::parse(text)? {
            SigningKey::Ed25519(k) => Ok(VerifyKey::Ed25519(k.verifying_key())),
            hmac => Ok(VerifyKey::Hmac(hmac)),
        }
    }
}

/// Why a message was not accepted.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("signature does NOT match")]
    Mismatch,
    /// Outside the replay window (Standard Webhooks: 5 minutes by default).
    #[error("timestamp {timestamp} is {skew}s away from now, more than the {tolerance}s tolerance (a replayed or delayed message; --tolerance changes it)")]
    Stale {
        timestamp: i64,
        skew: i64,
        tolerance: i64,
    },
}

/// The tolerance of Standard Webhooks verifiers for `webhook-timestamp`.
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

/// Verifies a message as a Standard Webhooks receiver does: the timestamp
/// within `tolerance_secs` of `now_secs` (replay protection), then any of
/// the header's space-separated signatures (`v1` HMAC compared in
/// constant time, `v1a` Ed25519). Pure: the time is passed in.
pub fn verify(
    key: &VerifyKey,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), Rejected> {
    let skew = (now_secs - timestamp).abs();
    if skew > tolerance_secs {
        return Err(Rejected::Stale {
            timestamp,
            skew,
            tolerance: tolerance_secs,
        });
    }
    let ok = match key {
        VerifyKey::Hmac(k) => {
            let expected = k.sign(id, timestamp, body);
            header
                .split(' ')
                .any(|sig| constant_time_eq(sig.as_bytes(), expected.as_bytes()))
        }
        VerifyKey::Ed25519(k) => {
            let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
            msg.extend_from_slice(id.as_bytes());
            msg.push(b'.');
            msg.extend_from_slice(timestamp.to_string().as_bytes());
            msg.push(b'.');
            msg.extend_from_slice(body);
            header.split(' ').any(|sig| {
                let Some(b64) = sig.strip_prefix("v1a,") else {
                    return false;
                };
                let Ok(bytes) = B64.decode(b64) else {
                    return false;
                };
                let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
                    return false;
                };
                k.verify_strict(&msg, &sig).is_ok()
            })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(Rejected::Mismatch)
    }
}

/// Equality whose time does not depend on where the inputs differ, for
/// comparing secrets and signatures (`subtle`; only a length difference
/// answers early, and lengths are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1614265330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn verify_applies_the_tolerance_on_both_sides() {
        let key = VerifyKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let v = |now: i64| verify(&key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, sig, now, 300);
        assert_eq!(v(VECTOR_TS), Ok(()));
        assert_eq!(v(VECTOR_TS + 300), Ok(()));
        assert_eq!(v(VECTOR_TS - 300), Ok(()));
        assert_eq!(
            v(VECTOR_TS + 301),
            Err(Rejected::Stale {
                timestamp: VECTOR_TS,
                skew: 301,
                tolerance: 300
            })
        );
        assert!(matches!(v(VECTOR_TS - 301), Err(Rejected::Stale { .. })));
        // Any of several signatures; a wrong one alone is a mismatch.
        let two = format!("v1,AAAA {sig}");
        assert_eq!(
            verify(
                &key,
                VECTOR_ID,
                VECTOR_TS,
                VECTOR_BODY,
                &two,
                VECTOR_TS,
                300
            ),
            Ok(())
        );
        assert_eq!(
            verify(&key, VECTOR_ID, VECTOR_TS, b"{}", sig, VECTOR_TS, 300),
            Err(Rejected::Mismatch)
        );
    }

    #[test]
    fn verify_takes_a_whpk_public_key_for_v1a() {
        let (sk, pk) = SigningKey::generate_ed25519();
        let signer = SigningKey::parse(&sk).unwrap();
        let header = signer.sign("msg_1", 100, b"{}");
        for key in [&pk, &sk] {
            let k = VerifyKey::parse(key).unwrap();
            assert_eq!(verify(&k, "msg_1", 100, b"{}", &header, 100, 300), Ok(()));
            assert_eq!(
                verify(&k, "msg_1", 100, b"{ }", &header, 100, 300),
                Err(Rejected::Mismatch)
            );
        }
        // A v1 HMAC signature never passes for an Ed25519 key.
        let hmac = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let k = VerifyKey::parse(&pk).unwrap();
        let h = hmac.sign("msg_1", 100, b"{}");
        assert_eq!(
            verify(&k, "msg_1", 100, b"{}", &h, 100, 300),
            Err(Rejected::Mismatch)
        );
        assert!(VerifyKey::parse("whpk_AAAA").is_err());
    }

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
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
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
        let (a, b) = (VerifyKey::Hmac(a), VerifyKey::Hmac(b));
        assert_eq!(verify(&a, "msg_1", 5, b"{}", &h, 5, 300), Ok(()));
        assert_eq!(verify(&b, "msg_1", 5, b"{}", &h, 5, 300), Ok(()));
        assert_eq!(
            verify(&a, "msg_1", 6, b"{}", &h, 6, 300),
            Err(Rejected::Mismatch)
        );
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
