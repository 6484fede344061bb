//! The records the store keeps, whatever the backend: what an instance
//! remembers, what waits for an endpoint, what died, what was tried. They
//! are plain serde types so that every backend stores the same JSON and a
//! backup taken from one imports into another.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What an instance remembers between polls.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceState {
    /// False until the first successful poll committed (the baseline).
    #[serde(default)]
    pub initialized: bool,
    /// Where the next poll resumes, offered to templates as `cursor`.
    #[serde(default)]
    pub cursor: Option<String>,
    /// `snapshot`: the last value seen.
    #[serde(default)]
    pub snapshot: Option<Snapshot>,
    /// `snapshot`: how many changes were seen; part of event ids, so that
    /// A→B, B→A, A→B gives three distinct ids.
    #[serde(default)]
    pub generation: u64,
    /// `new`: ids seen, oldest first, bounded by the connector's `seen_limit`.
    /// Stored as one record per id, apart from the state record (see
    /// [`StateWrite`]).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub seen: VecDeque<String>,
    /// When each id of `seen` was first seen (ms since the epoch), for
    /// `seen_ttl`. Shorter than `seen` in states written before it existed.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub seen_at: VecDeque<i64>,
    /// `new`: ids dropped from `seen` because of its bound.
    #[serde(default)]
    pub seen_evicted: u64,
    /// `changes`: the last version of every item of the listing, by id.
    /// Stored as one record per id, like `seen`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub known: BTreeMap<String, KnownItem>,
    /// Sequence number of the last event of this instance.
    #[serde(default)]
    pub sequence: u64,
    /// Conditional request validators of the last 200 response, and the URL
    /// they belong to (its [`UrlTag`]: only ever compared with the URL of
    /// the next request).
    #[serde(default)]
    pub etag: Option<Box<str>>,
    #[serde(default)]
    pub last_modified: Option<Box<str>>,
    #[serde(default)]
    pub validator_url: Option<UrlTag>,
    /// When the next poll is due (ms since the epoch), so that a restart
    /// neither polls early nor forgets runs missed while stopped (the
    /// schedule's `catch_up`). Advisory: written by [`super::Store::set_next_run`]
    /// without a flush.
    #[serde(default)]
    pub next_run_ms: Option<i64>,
}

/// Which URL a state's validators belong to: 64 bits of the URL's SHA-256,
/// not the URL. Every instance keeps its state between polls, and the URL
/// (about 50 bytes, in an allocation of 64) was the largest string of a
/// bank balance's; the state is only ever asked whether the next request
/// goes to the same URL, which 64 bits answer (two URLs of one instance
/// colliding is a 1 in 2^64 chance, and costs one unconditional request).
///
/// Written as `#` and 16 hex digits in the `validator_url` field; a stored
/// URL (a state written before) is read as its tag, so no state loses its
/// validators on upgrade. An older daemon reading a tag sees a URL that is
/// not its request's, and asks once without validators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UrlTag(u64);

impl UrlTag {
    pub fn of(url: &str) -> UrlTag {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(url.as_bytes());
        UrlTag(u64::from_be_bytes(
            d[..8].try_into().expect("8 of 32 bytes"),
        ))
    }
}

impl Serialize for UrlTag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("#{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for UrlTag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UrlTag, D::Error> {
        let text = String::deserialize(d)?;
        let tag = text
            .strip_prefix('#')
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        // No absolute URL starts with `#`: anything else is a stored URL.
        Ok(tag.map_or_else(|| UrlTag::of(&text), UrlTag))
    }
}

/// `detect: snapshot`'s last value, kept as its compact JSON text.
///
/// Why text: every instance keeps its last snapshot in memory between
/// polls (a poll task's state), and a small object as a [`Value`] is a map
/// with an allocation per key and per string: a bank balance took about
/// 820 B that way (heaptrack, 20,000 instances), against about 130 B as
/// text. Detection needs the value only when an answer came in whole (a
/// `304` needs nothing), and parses it then. It is written and read as
/// the JSON value it holds, so the stored records are what they were.
#[derive(Clone)]
pub struct Snapshot(Box<str>);

impl Snapshot {
    pub fn of(v: &Value) -> Snapshot {
        Snapshot(v.to_string().into_boxed_str())
    }

    /// The value. Always parses: only [`Snapshot::of`] and a checked
    /// read make one.
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.0).expect("a snapshot holds the text of a value")
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Equal as values (key order aside), as when it was a [`Value`].
impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        self.0 == other.0 || self.value() == other.value()
    }
}

impl Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    /// Refuses a value its text could not be read back from (serde_json
    /// reads 128 levels at most): from JSON such a value never gets here,
    /// but another format (YAML) could hand one over.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Snapshot, D::Error> {
        let v = Value::deserialize(d)?;
        if nested_deeper_than(&v, SNAPSHOT_READ_LIMIT) {
            return Err(serde::de::Error::custom(format!(
                "a snapshot nested deeper than {SNAPSHOT_READ_LIMIT} levels"
            )));
        }
        Ok(Snapshot::of(&v))
    }
}

/// The deepest snapshot whose text serde_json reads back (its recursion
/// limit is 128 nested arrays or objects).
const SNAPSHOT_READ_LIMIT: usize = 127;

/// The deepest an item, a snapshot or any other value pollhook keeps may
/// be nested: arrays and objects one inside the other, `{"a": {}}` being
/// 2. ONE limit for detection (a deeper item is refused at poll time),
/// the store (which refuses to write a deeper value) and backups (which
/// refuse to import one), chosen so that every wrapper around a value (a
/// state record, a known item, a backup line: 4 levels at most) stays far
/// under serde_json's recursion limit of 128 when the record is read back.
pub const MAX_DEPTH: usize = 64;

/// Whether `v` is nested deeper than `limit` (see [`MAX_DEPTH`]): without
/// recursion (a hostile value cannot exhaust the stack here), stopping at
/// the first container past `limit`. Pure.
pub fn nested_deeper_than(v: &Value, limit: usize) -> bool {
    // Values still to look into, with the depth of their container.
    let mut todo: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, above)) = todo.pop() {
        let children: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            Value::Object(o) => o.values().collect(),
            _ => continue,
        };
        if above + 1 > limit {
            return true;
        }
        todo.extend(children.into_iter().map(|c| (c, above + 1)));
    }
    false
}

/// `changes`: what is remembered of one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KnownItem {
    /// Its version (the `version` template, or the item's hash).
    pub version: String,
    /// The item itself: the `previous` of its next update or deletion.
    pub item: Value,
}

/// What a commit writes of an instance's state: the state record itself,
/// small (cursor, sequence, validators, snapshot), and the changes to its
/// per-id records (`seen` ids with their times, `known` items).
///
/// Why apart: a listing of 10,000 items keeps 10,000 seen ids (`new`) or
/// 10,000 whole items (`changes`). Kept inside the state record, every
/// poll that found one new item rewrote all of them (hundreds of KB to
/// MBs); as records of their own, a commit writes what changed. Pure: the
/// delta is computed in memory from the state the poller holds (which is
/// what the store holds: one writer per instance) and the next one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateWrite {
    /// The state without `seen`, `seen_at`, `known` and `next_run_ms`.
    pub core: InstanceState,
    /// Every per-id record of the instance goes first (a whole state is
    /// written: an import, a seeded baseline, a state from before the
    /// split).
    pub replace: bool,
    /// Seen ids to write, with when they were first seen.
    pub seen_put: Vec<(String, i64)>,
    /// Seen ids forgotten.
    pub seen_del: Vec<String>,
    /// Known items to write (new or changed).
    pub known_put: Vec<(String, KnownItem)>,
    /// Known items gone from the listing.
    pub known_del: Vec<String>,
}

impl StateWrite {
    /// The whole state, replacing whatever per-id records the instance had.
    /// Ids a state written before `seen_at` existed has no time for count
    /// as seen at `now_ms` (as detection counts them).
    pub fn whole(state: &InstanceState, now_ms: i64) -> StateWrite {
        StateWrite {
            core: core_of(state),
            replace: true,
            seen_put: seen_pairs(state, now_ms),
            seen_del: Vec::new(),
            known_put: state
                .known
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            known_del: Vec::new(),
        }
    }

    /// What turns the stored `prev` into `next`: only the ids and items
    /// that were added, changed or dropped.
    pub fn between(prev: &InstanceState, next: &InstanceState, now_ms: i64) -> StateWrite {
        // Borrowed: only the ids written are copied.
        let before: HashMap<&str, i64> = seen_times(prev, now_ms).collect();
        let kept: HashSet<&str> = next.seen.iter().map(String::as_str).collect();
        let seen_del = before
            .keys()
            .filter(|id| !kept.contains(*id))
            .map(|id| id.to_string())
            .collect();
        let seen_put = seen_times(next, now_ms)
            .filter(|(id, at)| before.get(id) != Some(at))
            .map(|(id, at)| (id.to_string(), at))
            .collect();
        let known_put = next
            .known
            .iter()
            .filter(|(id, item)| prev.known.get(*id) != Some(*item))
            .map(|(id, item)| (id.clone(), item.clone()))
            .collect();
        let known_del = prev
            .known
            .keys()
            .filter(|id| !next.known.contains_key(*id))
            .cloned()
            .collect();
        StateWrite {
            core: core_of(next),
            replace: false,
            seen_put,
            seen_del,
            known_put,
            known_del,
        }
    }
}

impl StateWrite {
    /// Every value it writes is nested at most [`MAX_DEPTH`] deep, so that
    /// the store reads back (and backups import) whatever it wrote.
    /// Detection refuses deeper items first; this is the store's own
    /// guard, whoever writes.
    pub fn check_depth(&self, instance: &str) -> Result<(), super::StoreError> {
        let refused = |what: String| super::StoreError::Refused {
            op: "commit poll",
            what,
            detail: format!("nested deeper than {MAX_DEPTH} levels, the most the store keeps"),
        };
        if let Some(v) = &self.core.snapshot {
            if nested_deeper_than(&v.value(), MAX_DEPTH) {
                return Err(refused(format!("the snapshot of {instance}")));
            }
        }
        for (id, k) in &self.known_put {
            if nested_deeper_than(&k.item, MAX_DEPTH) {
                return Err(refused(format!("item {id} of {instance}")));
            }
        }
        Ok(())
    }
}

/// The state record's part of a state: no per-id sets, no next run (kept
/// apart too, written every poll).
pub fn core_of(state: &InstanceState) -> InstanceState {
    // Field by field, not `..state.clone()`: that would clone the sets
    // only to drop them (10,000 items for a `changes` listing), and a new
    // field must be placed on one side or the other here.
    InstanceState {
        initialized: state.initialized,
        cursor: state.cursor.clone(),
        snapshot: state.snapshot.clone(),
        generation: state.generation,
        seen: VecDeque::new(),
        seen_at: VecDeque::new(),
        seen_evicted: state.seen_evicted,
        known: BTreeMap::new(),
        sequence: state.sequence,
        etag: state.etag.clone(),
        last_modified: state.last_modified.clone(),
        validator_url: state.validator_url,
        next_run_ms: None,
    }
}

/// Each seen id with its time; ids without one (states written before
/// `seen_at`: the times are the newest ones, aligned at the back) get
/// `now_ms`.
fn seen_pairs(state: &InstanceState, now_ms: i64) -> Vec<(String, i64)> {
    seen_times(state, now_ms)
        .map(|(id, at)| (id.to_string(), at))
        .collect()
}

/// [`seen_pairs`], borrowed.
fn seen_times(state: &InstanceState, now_ms: i64) -> impl Iterator<Item = (&str, i64)> {
    let missing = state.seen.len().saturating_sub(state.seen_at.len());
    state.seen.iter().enumerate().map(move |(i, id)| {
        let at = if i < missing {
            now_ms
        } else {
            state.seen_at[i - missing]
        };
        (id.as_str(), at)
    })
}

/// A state from its record and its per-id records (in any order). Seen
/// ids come back oldest first, ids first seen together in id order: the
/// order detection keeps them in, but for ties, which it does not depend
/// on.
pub fn assemble(
    core: InstanceState,
    mut seen: Vec<(String, i64)>,
    known: Vec<(String, KnownItem)>,
) -> InstanceState {
    let mut s = core;
    if s.seen.is_empty() && s.known.is_empty() {
        seen.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        s.seen_at = seen.iter().map(|(_, at)| *at).collect();
        s.seen = seen.into_iter().map(|(id, _)| id).collect();
        s.known = known.into_iter().collect();
    }
    s
}

/// One event waiting for one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxEntry {
    /// The `webhook-id`.
    pub event_id: String,
    /// `source/instance` it came from: deliveries of one instance keep order.
    pub instance: String,
    /// Event type.
    pub kind: String,
    /// Per-instance sequence number.
    pub sequence: u64,
    /// The exact body to send.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this time (ms since the epoch).
    pub next_attempt_ms: i64,
    /// When it was detected (ms since the epoch).
    pub created_ms: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// An event whose attempts ran out. Kept, never dropped silently.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub endpoint: String,
    pub entry: OutboxEntry,
    pub dead_at_ms: i64,
}

/// What a `for_each: discover` source last found, so that its instances
/// poll at start even when the discovery request fails, and removed ones
/// keep their state for the retention period.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Discovered {
    /// Instance name → its discovered param values.
    #[serde(default)]
    pub instances: std::collections::BTreeMap<String, serde_json::Map<String, Value>>,
    /// Instances that left the list → when (ms since the epoch).
    #[serde(default)]
    pub removed: std::collections::BTreeMap<String, i64>,
}

/// One delivery attempt, for `pollhook events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    pub event_id: String,
    pub endpoint: String,
    pub instance: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it started (ms since the epoch).
    pub at_ms: i64,
    /// The receiver's status code, when it answered.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// `delivered`, `failed`, `gone`.
    pub outcome: String,
    pub error: Option<String>,
}

/// Which attempts `pollhook events` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AttemptQuery {
    /// One event (`webhook-id`).
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Most records (default 50).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl AttemptQuery {
    /// Does an attempt match? Pure.
    pub fn matches(&self, r: &AttemptRecord) -> bool {
        self.id.as_ref().is_none_or(|i| *i == r.event_id)
            && self.endpoint.as_ref().is_none_or(|e| *e == r.endpoint)
    }

    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(50)
    }
}

/// How many attempt records are kept (the oldest go first).
pub const ATTEMPTS_KEPT: u64 = 10_000;

/// Where an outbox entry or dead letter sits: its endpoint's queue, its
/// instance's lane in that queue, and its place in detection order.
///
/// Backend-neutral on purpose: sled turns it into an ordered byte key,
/// a database into a primary key; callers only pass it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryKey {
    pub endpoint: String,
    pub instance: String,
    /// Increases with detection order within the store (not dense).
    pub seq: u64,
}

/// One record of a backup (`pollhook state export`), in the order they are
/// written. The format is the same for every backend, so a backup is also
/// how state moves from one backend to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tree", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    Disabled {
        endpoint: String,
        why: String,
    },
    State {
        instance: String,
        value: InstanceState,
    },
    Discovered {
        source: String,
        value: Discovered,
    },
    Removed {
        instance: String,
        delete_at_ms: i64,
    },
    /// Outbox entries of one endpoint, in detection order.
    Outbox {
        endpoint: String,
        value: OutboxEntry,
    },
    Dead {
        value: DeadLetter,
    },
    Attempt {
        value: AttemptRecord,
    },
}

/// The kinds of [`Record`], in backup order. Instance state (and what says
/// which instances exist) comes before the outbox, because an export is
/// not a snapshot across kinds: a poll committing between the two scans
/// then leaves an old state and its new events, which the imported daemon
/// detects again under the same event ids (a duplicate, never a loss).
/// The other order could lose the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Disabled,
    State,
    Discovered,
    Removed,
    Outbox,
    Dead,
    Attempt,
}

impl RecordKind {
    /// Every kind, in backup order.
    pub const ALL: [RecordKind; 7] = [
        RecordKind::Disabled,
        RecordKind::State,
        RecordKind::Discovered,
        RecordKind::Removed,
        RecordKind::Outbox,
        RecordKind::Dead,
        RecordKind::Attempt,
    ];

    /// The `tree` name in backups.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Disabled => "disabled",
            RecordKind::State => "state",
            RecordKind::Discovered => "discovered",
            RecordKind::Removed => "removed",
            RecordKind::Outbox => "outbox",
            RecordKind::Dead => "dead",
            RecordKind::Attempt => "attempts",
        }
    }
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Disabled { .. } => RecordKind::Disabled,
            Record::State { .. } => RecordKind::State,
            Record::Discovered { .. } => RecordKind::Discovered,
            Record::Removed { .. } => RecordKind::Removed,
            Record::Outbox { .. } => RecordKind::Outbox,
            Record::Dead { .. } => RecordKind::Dead,
            Record::Attempt { .. } => RecordKind::Attempt,
        }
    }
}

/// A page of records and where the next one starts (`None`: the last page).
/// The cursor is opaque: only the backend that gave it reads it.
pub struct Page {
    pub records: Vec<Record>,
    pub next: Option<Vec<u8>>,
}

/// The lease a node held on an instance when its poll began (clusters on
/// PostgreSQL). A commit under a fence succeeds only if the lease is still
/// `owner`'s with the same `epoch`: a node paused or cut off past its
/// lease, whose instance another node has since taken (and polled, and
/// committed), can never write its stale cursor or events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The node that polled.
    pub owner: String,
    /// The lease's epoch, raised by one at every claim.
    pub epoch: i64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The validators' URL is kept as a tag, written as `#` and 16 hex
    /// digits; a state written with the URL itself reads back as that
    /// URL's tag (its validators still used after an upgrade).
    #[test]
    fn the_validators_url_is_kept_as_its_tag_and_read_from_either_form() {
        let url = "http://127.0.0.1:8080/accounts/acc-0001/balance";
        let tag = UrlTag::of(url);
        assert_ne!(
            tag,
            UrlTag::of("http://127.0.0.1:8080/accounts/acc-0002/balance")
        );
        let s = InstanceState {
            etag: Some("\"v3\"".into()),
            validator_url: Some(tag),
            ..Default::default()
        };
        let written = serde_json::to_value(&s).unwrap();
        let text = written["validator_url"].as_str().unwrap();
        assert!(
            text.len() == 17 && text.starts_with('#') && !text.contains(url),
            "{text}"
        );
        let back: InstanceState = serde_json::from_value(written).unwrap();
        assert_eq!(back, s);
        let before: InstanceState = serde_json::from_value(serde_json::json!({
            "etag": "\"v3\"", "validator_url": url
        }))
        .unwrap();
        assert_eq!(before.validator_url, Some(tag));
        assert_eq!(before.etag.as_deref(), Some("\"v3\""));
        // A `#` text that is not a tag is a (strange) URL, not an error.
        let odd: InstanceState =
            serde_json::from_value(serde_json::json!({ "validator_url": "#nope" })).unwrap();
        assert_eq!(odd.validator_url, Some(UrlTag::of("#nope")));
    }

    /// A snapshot kept as text is stored as the value it holds, byte for
    /// byte what a `Value` wrote (key order and number spelling kept),
    /// reads back from records written before, and compares as values.
    #[test]
    fn a_snapshot_is_stored_as_the_value_it_holds() {
        let v = serde_json::json!({"z": 1, "a": [1.5, "x", null], "m": {"k": true}});
        let with_value = serde_json::json!({ "snapshot": v }).to_string();
        let s = InstanceState {
            snapshot: Some(Snapshot::of(&v)),
            ..Default::default()
        };
        let written = serde_json::to_value(&s).unwrap();
        assert_eq!(
            serde_json::json!({ "snapshot": written["snapshot"] }).to_string(),
            with_value
        );
        let back: InstanceState = serde_json::from_str(&with_value).unwrap();
        assert_eq!(back.snapshot.as_ref().map(Snapshot::value), Some(v.clone()));
        assert_eq!(back.snapshot, s.snapshot);
        let reordered =
            Snapshot::of(&serde_json::json!({"a": [1.5, "x", null], "m": {"k": true}, "z": 1}));
        assert_eq!(Some(reordered), s.snapshot, "key order aside, equal");
        assert_ne!(Some(Snapshot::of(&serde_json::json!({"z": 2}))), s.snapshot);
        assert_eq!(format!("{:?}", s.snapshot.unwrap()), v.to_string());
        // What could not be read back is refused when made from another
        // format, not left to fail when detection reads it.
        let deep = nested(SNAPSHOT_READ_LIMIT + 1);
        assert!(Snapshot::deserialize(deep).is_err());
        let ok = Snapshot::deserialize(nested(SNAPSHOT_READ_LIMIT)).unwrap();
        assert_eq!(ok.value(), nested(SNAPSHOT_READ_LIMIT));
    }

    fn state(seen: &[(&str, i64)], known: &[(&str, &str)]) -> InstanceState {
        InstanceState {
            cursor: Some("c".into()),
            seen: seen.iter().map(|(id, _)| id.to_string()).collect(),
            seen_at: seen.iter().map(|(_, at)| *at).collect(),
            known: known
                .iter()
                .map(|(id, v)| {
                    let item = KnownItem {
                        version: v.to_string(),
                        item: Value::Null,
                    };
                    (id.to_string(), item)
                })
                .collect(),
            next_run_ms: Some(5),
            ..Default::default()
        }
    }

    fn ids(v: &[(String, impl Clone)]) -> Vec<&str> {
        let mut ids: Vec<&str> = v.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort();
        ids
    }

    /// `{"a": …}` nested `n` deep around a scalar.
    pub(crate) fn nested(n: usize) -> Value {
        (0..n).fold(Value::from(1), |v, _| serde_json::json!({ "a": v }))
    }

    #[test]
    fn depth_counts_arrays_and_objects_one_inside_the_other() {
        assert!(!nested_deeper_than(&Value::from(1), 0));
        assert!(nested_deeper_than(&serde_json::json!([]), 0));
        assert!(!nested_deeper_than(&serde_json::json!([{}]), 2));
        assert!(nested_deeper_than(&serde_json::json!([1, {"b": [[]]}]), 3));
        assert!(!nested_deeper_than(&nested(MAX_DEPTH), MAX_DEPTH));
        assert!(nested_deeper_than(&nested(MAX_DEPTH + 1), MAX_DEPTH));
        // Every wrapper the store and backups put around a value at the
        // limit still reads back under serde_json's recursion limit.
        let item = KnownItem {
            version: "1".into(),
            item: nested(MAX_DEPTH),
        };
        let state = InstanceState {
            snapshot: Some(Snapshot::of(&nested(MAX_DEPTH))),
            known: [("id".to_string(), item)].into(),
            ..Default::default()
        };
        let line = serde_json::to_string(&Record::State {
            instance: "s/i".into(),
            value: state.clone(),
        })
        .unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back,
            Record::State {
                instance: "s/i".into(),
                value: state
            }
        );
    }

    #[test]
    fn a_change_writes_only_what_came_went_or_changed() {
        let prev = state(&[("a", 1), ("b", 2), ("c", 3)], &[("x", "1"), ("y", "1")]);
        let next = state(&[("b", 2), ("c", 4), ("d", 5)], &[("x", "2"), ("z", "1")]);
        let w = StateWrite::between(&prev, &next, 99);
        assert!(!w.replace);
        assert_eq!(w.seen_put, [("c".to_string(), 4), ("d".to_string(), 5)]);
        assert_eq!(w.seen_del, ["a"]);
        assert_eq!(ids(&w.known_put), ["x", "z"]);
        assert_eq!(w.known_del, ["y"]);
        assert_eq!(w.core, core_of(&next));
    }

    #[test]
    fn an_unchanged_state_writes_no_member() {
        let s = state(&[("a", 1), ("b", 2)], &[("x", "1")]);
        let w = StateWrite::between(&s, &s, 99);
        assert!(w.seen_put.is_empty() && w.seen_del.is_empty());
        assert!(w.known_put.is_empty() && w.known_del.is_empty());
    }

    #[test]
    fn the_state_record_holds_no_set_and_no_next_run() {
        let s = state(&[("a", 1)], &[("x", "1")]);
        let core = core_of(&s);
        assert!(core.seen.is_empty() && core.seen_at.is_empty() && core.known.is_empty());
        assert_eq!(core.next_run_ms, None);
        assert_eq!(core.cursor.as_deref(), Some("c"));
        // Empty sets are not even spelled out.
        let json = serde_json::to_string(&core).unwrap();
        assert!(
            !json.contains("seen\"") && !json.contains("known"),
            "{json}"
        );
    }

    #[test]
    fn a_whole_write_replaces_and_times_the_ids_that_had_none() {
        // Written before `seen_at`: the oldest id has no time.
        let mut s = state(&[("a", 0), ("b", 7)], &[("x", "1")]);
        s.seen_at.pop_front();
        let w = StateWrite::whole(&s, 99);
        assert!(w.replace);
        assert_eq!(w.seen_put, [("a".to_string(), 99), ("b".to_string(), 7)]);
        assert_eq!(ids(&w.known_put), ["x"]);
        // The same state as a change from nothing writes the same members.
        let from_nothing = StateWrite::between(&InstanceState::default(), &s, 99);
        assert_eq!(from_nothing.seen_put, w.seen_put);
        assert!(!from_nothing.replace);
    }

    #[test]
    fn assembled_ids_come_back_oldest_first_ties_by_id() {
        let core = core_of(&state(&[], &[]));
        let seen = vec![("b".into(), 2), ("z".into(), 1), ("a".into(), 2)];
        let s = assemble(core, seen, vec![]);
        assert_eq!(s.seen, ["z", "a", "b"]);
        assert_eq!(s.seen_at, [1, 2, 2]);
    }

    #[test]
    fn a_state_record_still_holding_its_sets_is_read_as_it_is() {
        let inline = state(&[("a", 1)], &[("x", "1")]);
        let s = assemble(inline.clone(), vec![("b".into(), 2)], vec![]);
        assert_eq!(s, inline);
        // Either set inline is enough (a `new` state has no known items).
        let seen_only = state(&[("a", 1)], &[]);
        let s = assemble(seen_only.clone(), vec![("b".into(), 2)], vec![]);
        assert_eq!(s, seen_only);
        let known_only = state(&[], &[("x", "1")]);
        let s = assemble(known_only.clone(), vec![("b".into(), 2)], vec![]);
        assert_eq!(s, known_only);
    }
}
