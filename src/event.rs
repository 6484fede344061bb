//! The wire format of an event, defined once.
//!
//! Body: `{"type", "timestamp", "source", "instance", "sequence", "data"}`,
//! serialized once at detection and stored as bytes in the outbox, so every
//! retry sends (and signs) exactly the same body.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The largest event body pollhook sends. Well under the default upstream
/// body cap (10 MiB): a 9 MB item emitted whole is a 9 MB webhook, retried
/// for hours by every endpoint, and a probe saw the daemon's memory grow
/// from 101 to 477 MB while one was retried. Receivers and their proxies
/// commonly refuse bodies past 1 MiB anyway.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One event, as the agent receives it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// The `webhook-id`; not part of the body (it is a header).
    #[serde(skip)]
    pub id: String,
    /// e.g. `bank.balance.changed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the change was detected (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: DateTime<Utc>,
    /// The source (bridge.yaml) that detected it.
    pub source: String,
    /// The instance of that source (`acc-0001`, or `default`).
    pub instance: String,
    /// Counts events per instance, from 1, in detection order; an agent can
    /// check order and gaps with it.
    pub sequence: u64,
    /// The item (`new`) or `{previous, current}` (`snapshot`).
    pub data: Value,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl Event {
    /// The JSON body sent to endpoints.
    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes")
    }
}

/// The deterministic `webhook-id` of a change: the same (source, instance,
/// event type, change key) always gives the same id, so a receiver can drop
/// duplicates after a crash or a retry. The change key is the item id for
/// `new`, and the snapshot's generation and content hash for `snapshot`.
pub fn event_id(source: &str, instance: &str, kind: &str, change_key: &str) -> String {
    let mut h = Sha256::new();
    for part in [source, instance, kind, change_key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    format!("msg_{}", hex::encode(&digest[..16]))
}

/// A short stable hash of a JSON value (for snapshot change keys).
pub fn value_hash(v: &Value) -> String {
    let digest = Sha256::digest(v.to_string().as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn body_has_the_contract_fields_in_order() {
        let e = Event {
            id: "msg_x".into(),
            kind: "bank.balance.changed".into(),
            timestamp: Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
            source: "balances".into(),
            instance: "acc-0001".into(),
            sequence: 7,
            data: serde_json::json!({"previous": 1, "current": 2}),
        };
        assert_eq!(
            e.body(),
            r#"{"type":"bank.balance.changed","timestamp":"2026-11-23T10:00:00.000Z","source":"balances","instance":"acc-0001","sequence":7,"data":{"previous":1,"current":2}}"#
        );
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = event_id("s", "i", "t", "tx-1");
        assert_eq!(a, event_id("s", "i", "t", "tx-1"));
        assert_ne!(a, event_id("s", "i", "t", "tx-2"));
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(event_id("ab", "c", "t", "k"), event_id("a", "bc", "t", "k"));
        assert!(a.starts_with("msg_") && a.len() == 36);
    }

    #[test]
    fn ids_and_hashes_are_the_stored_ones() {
        // Ids already stored and delivered must come out the same (lower-case
        // hex of the SHA-256 prefix), or receivers would see new events.
        assert_eq!(
            event_id("bank", "acct_1", "balance.changed", "v1"),
            "msg_54c3a2861e83175df200237e3012c049"
        );
        assert_eq!(value_hash(&serde_json::json!({"a": 1})), "015abd7f5cc57a2d");
    }
}
