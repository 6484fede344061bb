//! The embedded store (sled). The only module that knows sled.
//!
//! Trees:
//! - `state`:  instance key (`source/instance`) → [`InstanceState`] (JSON);
//! - `outbox`: endpoint `\0` instance `\0` u64 (big-endian, monotonic) →
//!   [`OutboxEntry`]; keys sort in detection order per endpoint and
//!   instance, so an instance's head is one seek (no scan of the queue);
//! - `dead`:   same key → [`DeadLetter`], events whose attempts ran out.
//!
//! The one invariant this module exists for: [`Store::commit_poll`] writes an
//! instance's new state (cursor, seen ids, snapshot) and the outbox entries
//! of the events that state change produced in ONE transaction. A crash
//! either loses both (the next poll detects the change again) or keeps both
//! (the outbox delivers it). A cursor never moves past an undelivered change.

use std::collections::VecDeque;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// Store errors name the operation; sled's own error is the source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("store {op} failed")]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("store record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("backup line {line}: {detail}")]
    Backup { line: usize, detail: String },
    #[error("cannot write the backup")]
    Write(#[source] std::io::Error),
    #[error("the store already holds {records} records: import goes into an empty state_dir (move the current one away first)")]
    NotEmpty { records: usize },
}

type Result<T> = std::result::Result<T, StoreError>;

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
    pub snapshot: Option<Value>,
    /// `snapshot`: how many changes were seen; part of event ids, so that
    /// A→B, B→A, A→B gives three distinct ids.
    #[serde(default)]
    pub generation: u64,
    /// `new`: ids seen, oldest first, bounded by the connector's `seen_limit`.
    #[serde(default)]
    pub seen: VecDeque<String>,
    /// When each id of `seen` was first seen (ms since the epoch), for
    /// `seen_ttl`. Shorter than `seen` in states written before it existed.
    #[serde(default)]
    pub seen_at: VecDeque<i64>,
    /// `new`: ids dropped from `seen` because of its bound.
    #[serde(default)]
    pub seen_evicted: u64,
    /// `changes`: the last version of every item of the listing, by id.
    #[serde(default)]
    pub known: std::collections::BTreeMap<String, KnownItem>,
    /// Sequence number of the last event of this instance.
    #[serde(default)]
    pub sequence: u64,
    /// Conditional request validators of the last 200 response, and the URL
    /// they belong to.
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
    #[serde(default)]
    pub validator_url: Option<String>,
    /// When the next poll is due (ms since the epoch), so that a restart
    /// neither polls early nor forgets runs missed while stopped (the
    /// schedule's `catch_up`). Advisory: written by [`Store::set_next_run`]
    /// without a flush.
    #[serde(default)]
    pub next_run_ms: Option<i64>,
}

/// `changes`: what is remembered of one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KnownItem {
    /// Its version (the `version` template, or the item's hash).
    pub version: String,
    /// The item itself: the `previous` of its next update or deletion.
    pub item: Value,
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

/// How many attempt records are kept (the oldest go first).
pub const ATTEMPTS_KEPT: u64 = 10_000;

/// The version of `pollhook state export`'s format.
pub const BACKUP_FORMAT: u64 = 1;

/// Key of an outbox or dead-letter record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey(Vec<u8>);

impl EntryKey {
    fn new(endpoint: &str, instance: &str, id: u64) -> Self {
        let mut k = instance_prefix(endpoint, instance);
        k.extend_from_slice(&id.to_be_bytes());
        EntryKey(k)
    }
}

/// `endpoint \0 instance \0`: the prefix of one instance's queue.
fn instance_prefix(endpoint: &str, instance: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(endpoint.len() + instance.len() + 10);
    p.extend_from_slice(endpoint.as_bytes());
    p.push(0);
    p.extend_from_slice(instance.as_bytes());
    p.push(0);
    p
}

fn prefix(endpoint: &str) -> Vec<u8> {
    let mut p = endpoint.as_bytes().to_vec();
    p.push(0);
    p
}

/// The open store. Cheap to clone (sled handles are reference-counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    state: sled::Tree,
    outbox: sled::Tree,
    dead: sled::Tree,
    discovered: sled::Tree,
    attempts: sled::Tree,
    /// Instances no source polls any more (removed from the configuration):
    /// key → when their state may be deleted (ms since the epoch).
    removed: sled::Tree,
    /// Endpoints disabled by a `410 Gone` or `circuit.disable_after`:
    /// name → why. Kept across restarts until `pollhook endpoint enable`.
    disabled: sled::Tree,
    flush: std::sync::Arc<GroupFlush>,
}

/// Group commit: one `db.flush()` at a time, on tokio's blocking pool,
/// covering every write made before it started.
///
/// Why not sled's `flush_async`: in sled 0.34 each call holds an internal
/// lock for reading while it waits for a log write queued on sled's own
/// small thread pool (spacejam/sled#1308). 10,000 instances committing
/// their first poll within seconds each started a flush, filled that pool,
/// and the transactions behind the lock blocked both tokio workers of a
/// 2-core machine: polling, `/status` and SIGTERM all froze (12 of 14 runs
/// of `cargo bench --bench scale`). One blocking flush at a time keeps
/// sled's pool free for its log writes, and concurrent commits share one
/// fsync instead of queueing one each.
#[derive(Default)]
struct GroupFlush {
    /// Tickets handed out: one per write that wants to be durable.
    issued: std::sync::atomic::AtomicU64,
    /// Every ticket up to this one is durable.
    durable: std::sync::atomic::AtomicU64,
    /// One flush at a time; waiters find their ticket covered by it.
    turn: tokio::sync::Mutex<()>,
}

/// Outboxes written before keys carried the instance (`endpoint \0 u64`)
/// are rekeyed once, each entry in one transaction, keeping their order.
fn migrate_outbox_keys(outbox: &sled::Tree) -> Result<()> {
    let mut old = Vec::new();
    for r in outbox.iter() {
        let (k, v) = r.map_err(sled_err("scan outbox"))?;
        let Some(sep) = k.iter().position(|b| *b == 0) else {
            continue;
        };
        if k.len() - sep - 1 == 8 {
            old.push((k, v));
        }
    }
    for (k, v) in old {
        let entry: OutboxEntry = decode(&k, &v)?;
        let sep = k.iter().position(|b| *b == 0).expect("found above");
        let endpoint = String::from_utf8_lossy(&k[..sep]).into_owned();
        let id = u64::from_be_bytes(k[sep + 1..].try_into().expect("8 bytes"));
        let new = EntryKey::new(&endpoint, &entry.instance, id);
        outbox
            .transaction(|t| {
                t.remove(&k)?;
                t.insert(new.0.as_slice(), v.clone())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => StoreError::Sled {
                    op: "migrate outbox",
                    source,
                },
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
    }
    Ok(())
}

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled { op, source }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records always serialize")
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            // sled's default page cache is 1 GiB; pollhook's working set
            // (instance states, the outbox head) is far smaller, and a
            // daemon next to agents should stay small.
            .cache_capacity(64 * 1024 * 1024)
            // Durability comes from flushing at each commit (see commit_poll),
            // not from this background timer; keep it as a safety net.
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err("open tree"));
        let outbox = tree("outbox")?;
        migrate_outbox_keys(&outbox)?;
        Ok(Store {
            state: tree("state")?,
            outbox,
            dead: tree("dead")?,
            discovered: tree("discovered")?,
            attempts: tree("attempts")?,
            removed: tree("removed")?,
            disabled: tree("disabled")?,
            db,
            flush: Default::default(),
        })
    }

    /// Makes every write done before the call durable, sharing one flush
    /// with concurrent callers (see [`GroupFlush`]). The ticket is taken
    /// after the caller's write, and a flush covers every ticket issued
    /// before it started.
    async fn flush_group(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.flush.issued.fetch_add(1, SeqCst) + 1;
        let _turn = self.flush.turn.lock().await;
        if self.flush.durable.load(SeqCst) >= ticket {
            return Ok(());
        }
        let covers = self.flush.issued.load(SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .expect("flush task")
            .map_err(sled_err("flush"))?;
        self.flush.durable.store(covers, SeqCst);
        Ok(())
    }

    /// What a discovering source found last (empty when it never did).
    pub fn load_discovered(&self, source: &str) -> Result<Discovered> {
        match self
            .discovered
            .get(source)
            .map_err(sled_err("read discovered"))?
        {
            Some(b) => decode(source.as_bytes(), &b),
            None => Ok(Discovered::default()),
        }
    }

    /// Records what a discovering source found. Not flushed: losing it in
    /// a crash only means the next discovery finds the same again.
    pub fn save_discovered(&self, source: &str, d: &Discovered) -> Result<()> {
        self.discovered
            .insert(source, encode(d))
            .map_err(sled_err("write discovered"))?;
        Ok(())
    }

    /// Forgets an instance's state (a discovered instance past retention).
    /// Its undelivered events stay in the outbox.
    pub fn remove_state(&self, instance: &str) -> Result<()> {
        self.state
            .remove(instance)
            .map_err(sled_err("remove state"))?;
        Ok(())
    }

    /// Records that an endpoint is disabled, and why (flushed: a restart
    /// must not send to an endpoint that said `410 Gone`).
    pub fn disable_endpoint(&self, endpoint: &str, why: &str) -> Result<()> {
        self.disabled
            .insert(endpoint, encode(&why))
            .map_err(sled_err("disable endpoint"))?;
        self.flush()
    }

    /// Why an endpoint is disabled, if it is.
    pub fn endpoint_disabled(&self, endpoint: &str) -> Result<Option<String>> {
        match self
            .disabled
            .get(endpoint)
            .map_err(sled_err("read disabled"))?
        {
            Some(b) => decode(endpoint.as_bytes(), &b).map(Some),
            None => Ok(None),
        }
    }

    /// Enables an endpoint again; whether it was disabled.
    pub fn enable_endpoint(&self, endpoint: &str) -> Result<bool> {
        let was = self
            .disabled
            .remove(endpoint)
            .map_err(sled_err("enable endpoint"))?
            .is_some();
        self.flush()?;
        Ok(was)
    }

    /// Keys of every stored instance state (nothing decoded).
    pub fn state_keys(&self) -> Result<Vec<String>> {
        self.state
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(sled_err("scan state"))?;
                Ok(String::from_utf8_lossy(&k).to_string())
            })
            .collect()
    }

    /// Marks an instance that no source polls any more: its state is
    /// deleted after `delete_at_ms` (see [`Store::expired_removed`]). A mark
    /// already there keeps its (earlier) time.
    pub fn mark_removed(&self, instance: &str, delete_at_ms: i64) -> Result<()> {
        let _ = self
            .removed
            .compare_and_swap(instance, None as Option<&[u8]>, Some(encode(&delete_at_ms)))
            .map_err(sled_err("mark removed"))?;
        Ok(())
    }

    /// An instance polled again: its state is kept.
    pub fn unmark_removed(&self, instance: &str) -> Result<()> {
        self.removed
            .remove(instance)
            .map_err(sled_err("unmark removed"))?;
        Ok(())
    }

    /// Instances marked removed, with when their state may be deleted.
    pub fn removed(&self) -> Result<Vec<(String, i64)>> {
        self.removed
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(sled_err("scan removed"))?;
                Ok((String::from_utf8_lossy(&k).to_string(), decode(&k, &v)?))
            })
            .collect()
    }

    /// Deletes the state of removed instances whose time has come; returns
    /// their keys. Their undelivered events stay in the outbox.
    pub fn sweep_removed(&self, now_ms: i64) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for (key, at) in self.removed()? {
            if at <= now_ms {
                self.remove_state(&key)?;
                self.unmark_removed(&key)?;
                gone.push(key);
            }
        }
        Ok(gone)
    }

    /// The stored state of an instance (default when it never polled).
    pub fn load_state(&self, instance: &str) -> Result<InstanceState> {
        match self.state.get(instance).map_err(sled_err("read state"))? {
            Some(b) => decode(instance.as_bytes(), &b),
            None => Ok(InstanceState::default()),
        }
    }

    /// Every stored instance state.
    pub fn all_states(&self) -> Result<Vec<(String, InstanceState)>> {
        self.state
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(sled_err("scan state"))?;
                Ok((String::from_utf8_lossy(&k).to_string(), decode(&k, &v)?))
            })
            .collect()
    }

    /// THE transaction: the instance's new state and its events' outbox
    /// entries, atomically, then flushed to disk before returning, so that a
    /// poll is only "done" once it survives a crash.
    pub async fn commit_poll(
        &self,
        instance: &str,
        state: &InstanceState,
        deliveries: &[(String, OutboxEntry)],
    ) -> Result<Vec<(String, EntryKey)>> {
        let state_bytes = encode(state);
        let encoded: Vec<(String, Vec<u8>)> = deliveries
            .iter()
            .map(|(ep, e)| (ep.clone(), encode(e)))
            .collect();
        let keys = (&self.state, &self.outbox)
            .transaction(|(st, ob)| {
                st.insert(instance.as_bytes(), state_bytes.as_slice())?;
                let mut keys = Vec::with_capacity(encoded.len());
                for (ep, bytes) in &encoded {
                    let key = EntryKey::new(ep, instance, ob.generate_id()?);
                    ob.insert(key.0.as_slice(), bytes.as_slice())?;
                    keys.push((ep.clone(), key));
                }
                Ok::<_, ConflictableTransactionError<()>>(keys)
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => StoreError::Sled {
                    op: "commit poll",
                    source,
                },
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
        self.flush_group().await?;
        Ok(keys)
    }

    /// Records when an instance's next poll is due, changing nothing else of
    /// its state. Polls only commit when they run, so this is how a due time
    /// reaches the next start. Not flushed: it is advisory, and losing it in
    /// a crash only means a poll at start (or none, with `catch_up: skip`).
    pub fn set_next_run(&self, instance: &str, next_run_ms: i64) -> Result<()> {
        let mut corrupt = None;
        self.state
            .update_and_fetch(instance.as_bytes(), |old| {
                let mut state = match old.map(serde_json::from_slice::<InstanceState>) {
                    None => InstanceState::default(),
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        // Leave a corrupt record as it is; load_state reports it.
                        corrupt = Some(e.to_string());
                        return old.map(<[u8]>::to_vec);
                    }
                };
                corrupt = None;
                state.next_run_ms = Some(next_run_ms);
                Some(encode(&state))
            })
            .map_err(sled_err("record next run"))?;
        match corrupt {
            Some(detail) => Err(StoreError::Corrupt {
                key: instance.to_string(),
                detail,
            }),
            None => Ok(()),
        }
    }

    /// Pending entries of an endpoint, in detection order.
    pub fn outbox(&self, endpoint: &str) -> impl Iterator<Item = Result<(EntryKey, OutboxEntry)>> {
        self.outbox.scan_prefix(prefix(endpoint)).map(|r| {
            let (k, v) = r.map_err(sled_err("scan outbox"))?;
            Ok((EntryKey(k.to_vec()), decode(&k, &v)?))
        })
    }

    /// The first pending entry of one instance for an endpoint: one seek.
    pub fn outbox_head(
        &self,
        endpoint: &str,
        instance: &str,
    ) -> Result<Option<(EntryKey, OutboxEntry)>> {
        match self
            .outbox
            .scan_prefix(instance_prefix(endpoint, instance))
            .next()
        {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(sled_err("read outbox head"))?;
                Ok(Some((EntryKey(k.to_vec()), decode(&k, &v)?)))
            }
        }
    }

    /// The instances with pending entries for an endpoint (one scan of its
    /// queue; the worker runs it at start and after a replay).
    pub fn outbox_instances(&self, endpoint: &str) -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        let skip = endpoint.len() + 1;
        for k in self.outbox.scan_prefix(prefix(endpoint)).keys() {
            let k = k.map_err(sled_err("scan outbox"))?;
            if k.len() > skip + 9 {
                let inst = &k[skip..k.len() - 9];
                out.insert(String::from_utf8_lossy(inst).into_owned());
            }
        }
        Ok(out)
    }

    /// When the oldest pending entry of an endpoint was detected (ms since
    /// the epoch). One key scan; only each instance's head is decoded
    /// (entries of an instance are in detection order).
    pub fn outbox_oldest_ms(&self, endpoint: &str) -> Result<Option<i64>> {
        let skip = endpoint.len() + 1;
        let mut instance: Option<Vec<u8>> = None;
        let mut oldest: Option<i64> = None;
        for r in self.outbox.scan_prefix(prefix(endpoint)) {
            let (k, v) = r.map_err(sled_err("scan outbox"))?;
            let inst = k.get(skip..k.len().saturating_sub(9)).unwrap_or(&[]);
            if instance.as_deref() == Some(inst) {
                continue;
            }
            instance = Some(inst.to_vec());
            let e: OutboxEntry = decode(&k, &v)?;
            oldest = Some(oldest.map_or(e.created_ms, |o| o.min(e.created_ms)));
        }
        Ok(oldest)
    }

    /// Number of pending entries of an endpoint.
    pub fn outbox_len(&self, endpoint: &str) -> usize {
        self.outbox.scan_prefix(prefix(endpoint)).keys().count()
    }

    /// Dead letters of an endpoint.
    pub fn dead_letters(
        &self,
        endpoint: &str,
    ) -> impl Iterator<Item = Result<(EntryKey, DeadLetter)>> {
        self.dead.scan_prefix(prefix(endpoint)).map(|r| {
            let (k, v) = r.map_err(sled_err("scan dead letters"))?;
            Ok((EntryKey(k.to_vec()), decode(&k, &v)?))
        })
    }

    /// Number of dead letters of an endpoint.
    pub fn dead_len(&self, endpoint: &str) -> usize {
        self.dead.scan_prefix(prefix(endpoint)).keys().count()
    }

    /// A delivered entry leaves the outbox. Not flushed at once: if a crash
    /// loses the removal, the event is delivered again with the same
    /// `webhook-id` (at-least-once), which receivers deduplicate.
    pub fn delivered(&self, key: &EntryKey) -> Result<()> {
        self.outbox
            .remove(&key.0)
            .map_err(sled_err("remove delivered"))?;
        Ok(())
    }

    /// A failed attempt: the entry stays, with its new attempt count and time.
    pub fn reschedule(&self, key: &EntryKey, entry: &OutboxEntry) -> Result<()> {
        self.outbox
            .insert(&key.0, encode(entry))
            .map_err(sled_err("reschedule"))?;
        Ok(())
    }

    /// The last attempt failed: move the entry to the dead-letter tree, in
    /// one transaction (it is never in neither tree).
    pub async fn dead_letter(&self, key: &EntryKey, letter: &DeadLetter) -> Result<()> {
        let bytes = encode(letter);
        (&self.outbox, &self.dead)
            .transaction(|(ob, dead)| {
                ob.remove(key.0.as_slice())?;
                dead.insert(key.0.as_slice(), bytes.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => StoreError::Sled {
                    op: "dead-letter",
                    source,
                },
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
        self.flush_group().await?;
        Ok(())
    }

    /// Records a delivery attempt (not flushed: history, not state), and
    /// now and then forgets the oldest beyond [`ATTEMPTS_KEPT`].
    pub fn record_attempt(&self, rec: &AttemptRecord) -> Result<()> {
        let id = self.db.generate_id().map_err(sled_err("attempt id"))?;
        self.attempts
            .insert(id.to_be_bytes(), encode(rec))
            .map_err(sled_err("record attempt"))?;
        if id % 100 == 0 && id > ATTEMPTS_KEPT {
            let old: Vec<sled::IVec> = self
                .attempts
                .range(..(id - ATTEMPTS_KEPT).to_be_bytes())
                .keys()
                .filter_map(|k| k.ok())
                .collect();
            for k in old {
                let _ = self.attempts.remove(k);
            }
        }
        Ok(())
    }

    /// Forgets delivery attempts made before `before_ms` (history is in
    /// time order: stops at the first newer one). Returns how many.
    pub fn prune_attempts(&self, before_ms: i64) -> Result<usize> {
        let mut n = 0;
        for r in self.attempts.iter() {
            let (k, v) = r.map_err(sled_err("scan attempts"))?;
            let rec: AttemptRecord = decode(&k, &v)?;
            if rec.at_ms >= before_ms {
                break;
            }
            self.attempts
                .remove(k)
                .map_err(sled_err("prune attempts"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes dead letters that died before `before_ms`. Returns how many.
    pub fn prune_dead(&self, before_ms: i64) -> Result<usize> {
        let mut n = 0;
        for r in self.dead.iter() {
            let (k, v) = r.map_err(sled_err("scan dead letters"))?;
            let letter: DeadLetter = decode(&k, &v)?;
            if letter.dead_at_ms < before_ms {
                self.dead
                    .remove(k)
                    .map_err(sled_err("prune dead letters"))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Attempt records, newest first.
    pub fn attempts(&self) -> impl Iterator<Item = Result<AttemptRecord>> {
        self.attempts.iter().rev().map(|r| {
            let (k, v) = r.map_err(sled_err("scan attempts"))?;
            decode(&k, &v)
        })
    }

    /// Every dead letter, by endpoint then age.
    pub fn all_dead_letters(&self) -> impl Iterator<Item = Result<(EntryKey, DeadLetter)>> {
        self.dead.iter().map(|r| {
            let (k, v) = r.map_err(sled_err("scan dead letters"))?;
            Ok((EntryKey(k.to_vec()), decode(&k, &v)?))
        })
    }

    /// Puts dead letters back at the end of their endpoint's outbox, with
    /// their attempts reset and their `webhook-id` and body unchanged, each
    /// in one transaction (never in both trees, never in neither).
    pub async fn replay_dead(&self, letters: &[(EntryKey, DeadLetter)]) -> Result<usize> {
        for (key, letter) in letters {
            let mut entry = letter.entry.clone();
            entry.attempts = 0;
            entry.next_attempt_ms = 0;
            entry.last_error = None;
            let bytes = encode(&entry);
            (&self.dead, &self.outbox)
                .transaction(|(dead, ob)| {
                    dead.remove(key.0.as_slice())?;
                    let k =
                        EntryKey::new(&letter.endpoint, &letter.entry.instance, ob.generate_id()?);
                    ob.insert(k.0.as_slice(), bytes.as_slice())?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                })
                .map_err(|e| match e {
                    TransactionError::Storage(source) => StoreError::Sled {
                        op: "replay",
                        source,
                    },
                    TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
                })?;
        }
        self.flush_group().await?;
        Ok(letters.len())
    }

    /// Deletes dead letters for good.
    pub async fn drop_dead(&self, keys: &[EntryKey]) -> Result<usize> {
        for k in keys {
            self.dead
                .remove(&k.0)
                .map_err(sled_err("drop dead letter"))?;
        }
        self.flush_group().await?;
        Ok(keys.len())
    }

    /// Writes everything to disk (shutdown).
    /// The trees of a backup, in export order. Instance state (and what
    /// says which instances exist) comes before the outbox, because the
    /// export is not a snapshot across trees: a poll committing between
    /// the two scans then leaves an old state and its new events, which
    /// the imported daemon detects again under the same event ids (a
    /// duplicate, never a loss). The other order could lose the event.
    fn backup_trees(&self) -> [(&'static str, &sled::Tree); 7] {
        [
            ("disabled", &self.disabled),
            ("state", &self.state),
            ("discovered", &self.discovered),
            ("removed", &self.removed),
            ("outbox", &self.outbox),
            ("dead", &self.dead),
            ("attempts", &self.attempts),
        ]
    }

    /// Writes a backup as JSON lines: a header, then one line per record
    /// (`tree`, base64 `key`, and the record's JSON `value`; every tree
    /// stores JSON). Readable,
    /// diffable, and independent of sled's on-disk format.
    pub fn export(&self, out: &mut dyn std::io::Write) -> Result<usize> {
        let header = serde_json::json!({
            "pollhook_state": BACKUP_FORMAT,
            "pollhook_version": env!("CARGO_PKG_VERSION"),
            "exported_ms": crate::now_ms(),
        });
        writeln!(out, "{header}").map_err(StoreError::Write)?;
        let mut n = 0;
        for (name, tree) in self.backup_trees() {
            for r in tree.iter() {
                let (k, v) = r.map_err(sled_err("scan for export"))?;
                let value: Value = decode(&k, &v)?;
                let line =
                    serde_json::json!({ "tree": name, "key": B64.encode(&k), "value": value });
                writeln!(out, "{line}").map_err(StoreError::Write)?;
                n += 1;
            }
        }
        out.flush().map_err(StoreError::Write)?;
        Ok(n)
    }

    /// Reads a backup written by [`Store::export`] into this store, which
    /// must be empty. Every line is checked (its tree known, its record
    /// readable as that tree's type) before anything is written, so a bad
    /// file changes nothing; then the store is flushed.
    pub fn import(&self, input: impl std::io::BufRead) -> Result<usize> {
        let records: usize = self.backup_trees().iter().map(|(_, t)| t.len()).sum();
        if records > 0 {
            return Err(StoreError::NotEmpty { records });
        }
        let bad = |line: usize, detail: String| StoreError::Backup { line, detail };
        let mut rows: Vec<(usize, Vec<u8>, Vec<u8>)> = Vec::new();
        let trees = self.backup_trees();
        for (i, line) in input.lines().enumerate() {
            let no = i + 1;
            let line = line.map_err(|e| bad(no, e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| bad(no, format!("not JSON: {e}")))?;
            if no == 1 {
                match v["pollhook_state"].as_u64() {
                    Some(BACKUP_FORMAT) => continue,
                    Some(other) => {
                        return Err(bad(
                            1,
                            format!(
                                "backup format {other}; this pollhook reads format {BACKUP_FORMAT}"
                            ),
                        ))
                    }
                    None => {
                        return Err(bad(
                            1,
                            "not a pollhook state backup (no `pollhook_state` header)".into(),
                        ))
                    }
                }
            }
            let tree = v["tree"].as_str().unwrap_or("");
            let Some(t) = trees.iter().position(|(n, _)| *n == tree) else {
                return Err(bad(no, format!("unknown tree `{tree}` (expected one of disabled, state, discovered, removed, outbox, dead, attempts)")));
            };
            let key = B64
                .decode(v["key"].as_str().unwrap_or(""))
                .map_err(|e| bad(no, format!("`key` is not base64: {e}")))?;
            let value = &v["value"];
            let check = |r: std::result::Result<(), serde_json::Error>| {
                r.map_err(|e| bad(no, format!("`value` is not a {tree} record: {e}")))
            };
            match tree {
                "state" => check(InstanceState::deserialize(value).map(drop))?,
                "discovered" => check(Discovered::deserialize(value).map(drop))?,
                "removed" => check(i64::deserialize(value).map(drop))?,
                "outbox" => check(OutboxEntry::deserialize(value).map(drop))?,
                "dead" => check(DeadLetter::deserialize(value).map(drop))?,
                "disabled" => check(String::deserialize(value).map(drop))?,
                _ => check(AttemptRecord::deserialize(value).map(drop))?,
            }
            let bytes = encode(value);
            rows.push((t, key, bytes));
        }
        for (t, key, bytes) in &rows {
            trees[*t]
                .1
                .insert(key.as_slice(), bytes.as_slice())
                .map_err(sled_err("import"))?;
        }
        self.flush()?;
        Ok(rows.len())
    }

    /// Whether the store answers a read (for `/readyz`).
    pub fn ping(&self) -> Result<()> {
        self.state.first().map_err(sled_err("read state"))?;
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_err("flush"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10,000 instances committing their first poll at once on a 2-worker
    /// runtime (the daemon's shape on a 2-core machine) must all finish.
    /// With sled's `flush_async` per commit this froze (see `GroupFlush`).
    /// Run on its own thread so a stall fails the test instead of hanging it.
    #[test]
    fn ten_thousand_concurrent_commits_do_not_stall() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..10_000 {
                    let s = store.clone();
                    set.spawn(async move {
                        let key = format!("src/acc-{i}");
                        s.set_next_run(&key, 1).unwrap();
                        let state = InstanceState {
                            initialized: true,
                            ..Default::default()
                        };
                        s.commit_poll(&key, &state, &[]).await.unwrap();
                    });
                }
                while set.join_next().await.is_some() {}
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("10,000 concurrent commits stalled");
    }

    #[test]
    fn outboxes_of_the_old_key_format_are_migrated_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let t = db.open_tree("outbox").unwrap();
            for (id, seq) in [(7u64, 1u64), (9, 2)] {
                let mut k = b"ep\0".to_vec();
                k.extend_from_slice(&id.to_be_bytes());
                t.insert(k, encode(&entry(seq))).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let (_, head) = store.outbox_head("ep", "s/i").unwrap().unwrap();
        assert_eq!(head.sequence, 1);
        assert_eq!(
            store
                .outbox_instances("ep")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            ["s/i"]
        );
        assert_eq!(store.outbox_len("ep"), 2);
    }

    fn entry(seq: u64) -> OutboxEntry {
        OutboxEntry {
            event_id: format!("msg_{seq}"),
            instance: "s/i".into(),
            kind: "t".into(),
            sequence: seq,
            body: "{}".into(),
            attempts: 0,
            next_attempt_ms: 0,
            created_ms: 0,
            last_error: None,
        }
    }

    #[tokio::test]
    async fn commit_writes_state_and_outbox_together_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = InstanceState {
            cursor: Some("c1".into()),
            initialized: true,
            ..Default::default()
        };
        let d = vec![
            ("a".to_string(), entry(1)),
            ("b".to_string(), entry(1)),
            ("a".to_string(), entry(2)),
        ];
        store.commit_poll("s/i", &state, &d).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_state("s/i").unwrap(), state);
        let a: Vec<u64> = store.outbox("a").map(|r| r.unwrap().1.sequence).collect();
        assert_eq!(a, vec![1, 2]);
        assert_eq!(store.outbox_len("b"), 1);
        // A prefix of another endpoint's name does not leak in.
        assert_eq!(store.outbox_len(""), 0);
    }

    #[tokio::test]
    async fn set_next_run_changes_only_that_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.set_next_run("s/new", 7).unwrap();
        assert_eq!(store.load_state("s/new").unwrap().next_run_ms, Some(7));
        let state = InstanceState {
            cursor: Some("c1".into()),
            sequence: 3,
            ..Default::default()
        };
        store.commit_poll("s/i", &state, &[]).await.unwrap();
        store.set_next_run("s/i", 42).unwrap();
        assert_eq!(
            store.load_state("s/i").unwrap(),
            InstanceState {
                next_run_ms: Some(42),
                ..state
            }
        );
    }

    #[tokio::test]
    async fn dead_letter_moves_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = store
            .commit_poll("s/i", &InstanceState::default(), &[("a".into(), entry(1))])
            .await
            .unwrap();
        let (_, key) = &keys[0];
        let letter = DeadLetter {
            endpoint: "a".into(),
            entry: entry(1),
            dead_at_ms: 1,
        };
        store.dead_letter(key, &letter).await.unwrap();
        assert_eq!(store.outbox_len("a"), 0);
        assert_eq!(store.dead_len("a"), 1);
    }
}
