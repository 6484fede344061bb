//! The embedded backend (sled 0.34). The only file that knows sled.
//!
//! Trees (every value is JSON, so backups need no per-tree codec):
//! - `state`:    instance key (`source/instance`) → [`InstanceState`]
//!   without its per-id sets (see [`StateWrite`]);
//! - `seen`:     instance `\0` id → when it was first seen (ms), `new`;
//! - `known`:    instance `\0` id → [`KnownItem`], `changes`;
//! - `next_run`: instance key → next due time (ms), apart from the state so
//!   that the per-poll write is 8 bytes, not the whole seen set;
//! - `outbox`:   endpoint `\0` instance `\0` u64 (big-endian, monotonic) →
//!   [`OutboxEntry`]; keys sort in detection order per endpoint and
//!   instance, so an instance's head is one seek (no scan of the queue);
//! - `dead`:     same key → [`DeadLetter`];
//! - `discovered`, `removed`, `disabled`: by source, instance, endpoint.
//!
//! The delivery history is not a tree: it is a log of its own beside sled's
//! files (`history/`, see [`history`]), because sled keeps a tree's pages
//! in memory and the history is written often and read seldom.
//!
//! Every write, and blocking reads (scans), run on tokio's blocking pool:
//! on a full disk a sled write can wait for log space that never comes,
//! and one inline write then held an async worker (on 2 cores, half the
//! daemon; with both, shutdown itself). Point reads, served from sled's
//! page cache, run inline.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use self::history::AttemptLog;
use super::records::*;
use super::{Backend, Result, StoreError};

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Backend {
        op,
        source: Box::new(source),
    }
}

fn tx_err(op: &'static str) -> impl FnOnce(TransactionError<()>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(source) => StoreError::Backend {
            op,
            source: Box::new(source),
        },
        TransactionError::Abort(()) => unreachable!("the transactions never abort"),
    }
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

fn text(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// Runs blocking sled work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task panicked")
}

/// `instance \0`: the prefix of an instance's per-id records.
fn member_prefix(instance: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(instance.len() + 1);
    p.extend_from_slice(instance.as_bytes());
    p.push(0);
    p
}

/// `instance \0 id`: one per-id record (instance keys hold no 0 byte).
fn member_key(instance: &str, id: &str) -> Vec<u8> {
    let mut k = member_prefix(instance);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A [`StateWrite`] as the bytes it writes.
struct EncodedWrite {
    state_key: Vec<u8>,
    core: Vec<u8>,
    seen_put: Vec<(Vec<u8>, Vec<u8>)>,
    seen_del: Vec<Vec<u8>>,
    known_put: Vec<(Vec<u8>, Vec<u8>)>,
    known_del: Vec<Vec<u8>>,
}

impl EncodedWrite {
    /// Applies the write within a transaction over `state`, `seen` and
    /// `known`. Deletions first: a replacing write deletes every record
    /// and puts back the ones it keeps.
    fn apply(
        &self,
        st: &sled::transaction::TransactionalTree,
        se: &sled::transaction::TransactionalTree,
        kn: &sled::transaction::TransactionalTree,
    ) -> std::result::Result<(), ConflictableTransactionError<()>> {
        st.insert(self.state_key.as_slice(), self.core.as_slice())?;
        for k in &self.seen_del {
            se.remove(k.as_slice())?;
        }
        for k in &self.known_del {
            kn.remove(k.as_slice())?;
        }
        for (k, v) in &self.seen_put {
            se.insert(k.as_slice(), v.as_slice())?;
        }
        for (k, v) in &self.known_put {
            kn.insert(k.as_slice(), v.as_slice())?;
        }
        Ok(())
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

/// `endpoint \0`: the prefix of one endpoint's queue.
fn prefix(endpoint: &str) -> Vec<u8> {
    let mut p = endpoint.as_bytes().to_vec();
    p.push(0);
    p
}

fn key_bytes(k: &EntryKey) -> Vec<u8> {
    let mut b = instance_prefix(&k.endpoint, &k.instance);
    b.extend_from_slice(&k.seq.to_be_bytes());
    b
}

/// The inverse of [`key_bytes`]. Endpoint names cannot hold `\0`, and the
/// last 9 bytes are `\0` + the sequence, so the instance is what lies
/// between.
fn parse_key(b: &[u8]) -> Result<EntryKey> {
    let bad = || StoreError::Corrupt {
        key: text(b).replace('\0', "/"),
        detail: "not an outbox key".into(),
    };
    let sep = b.iter().position(|c| *c == 0).ok_or_else(bad)?;
    if b.len() < sep + 1 + 9 || b[b.len() - 9] != 0 {
        return Err(bad());
    }
    Ok(EntryKey {
        endpoint: text(&b[..sep]),
        instance: text(&b[sep + 1..b.len() - 9]),
        seq: u64::from_be_bytes(b[b.len() - 8..].try_into().expect("8 bytes")),
    })
}

/// The sled store. Cheap to clone (sled handles are reference-counted).
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    state: sled::Tree,
    next_run: sled::Tree,
    /// Seen ids (`new`), one record each: a commit writes the ids that
    /// came and went, not the whole set (see [`StateWrite`]).
    seen: sled::Tree,
    /// Known items (`changes`), one record each, for the same reason.
    known: sled::Tree,
    outbox: sled::Tree,
    dead: sled::Tree,
    discovered: sled::Tree,
    /// The delivery history, in files of its own (see [`history`]).
    history: Arc<AttemptLog>,
    /// Instances no source polls any more (removed from the configuration):
    /// key → when their state may be deleted (ms since the epoch).
    removed: sled::Tree,
    /// Endpoints disabled by a `410 Gone` or `circuit.disable_after`:
    /// name → why. Kept across restarts until `pollhook endpoint enable`.
    disabled: sled::Tree,
    /// Stored rate quotas (a connector's long-window `rate_limit`): key →
    /// the quota's theoretical arrival time (see [`crate::gcra`]), so that
    /// a restart cannot spend a day's quota again.
    quota: sled::Tree,
    /// Credentials pollhook keeps (rotated OAuth2 refresh tokens): key →
    /// value. Not in backups.
    credentials: sled::Tree,
    flush: Arc<GroupFlush>,
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
    issued: AtomicU64,
    /// Every ticket up to this one is durable.
    durable: AtomicU64,
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
        let new = key_bytes(&EntryKey {
            endpoint: text(&k[..sep]),
            instance: entry.instance.clone(),
            seq: u64::from_be_bytes(k[sep + 1..].try_into().expect("8 bytes")),
        });
        outbox
            .transaction(|t| {
                t.remove(&k)?;
                t.insert(new.as_slice(), v.clone())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err("migrate outbox"))?;
    }
    Ok(())
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Backend {
        op,
        source: Box::new(source),
    }
}

/// Stores before the history had its own log kept it in the `attempts`
/// tree (u64 big-endian → [`AttemptRecord`]): its newest records become
/// the log, then the tree is dropped. Done again whole if cut short (the
/// log is written aside and renamed into place before the drop).
fn migrate_attempts_tree(db: &sled::Db, history_dir: &Path) -> Result<()> {
    if !db.tree_names().iter().any(|n| n.as_ref() == b"attempts") {
        return Ok(());
    }
    let tree = db.open_tree("attempts").map_err(sled_err("open tree"))?;
    let mut recs = std::collections::VecDeque::new();
    for r in tree.iter() {
        let (k, v) = r.map_err(sled_err("scan attempts"))?;
        recs.push_back(decode::<AttemptRecord>(&k, &v)?);
        if recs.len() as u64 > ATTEMPTS_KEPT {
            recs.pop_front();
        }
    }
    drop(tree);
    let recs: Vec<AttemptRecord> = recs.into();
    history::replace(history_dir, &recs).map_err(io_err("move the delivery history"))?;
    db.drop_tree("attempts").map_err(sled_err("drop tree"))?;
    Ok(())
}

/// sled's page cache for a fleet of `instances` (`None`: not known, as
/// when a source discovers its instances): 84 bytes an instance, at least
/// 1 MiB and at most 8 MiB. Pure.
///
/// sled's default is 1 GiB; pollhook's working set (instance states, the
/// outbox heads) is far smaller, and a daemon next to agents should stay
/// small. Reads past the cache are rare (a state is read once per
/// instance start; a commit reads the state it replaces, from the
/// kernel's page cache when sled evicted it). At 100,000 instances 8 MiB
/// is full, and each of its MiB is about 10 bytes per instance: 8 MiB
/// rather than 16 was 84 of them (README, "Benchmarks"). A small fleet
/// does not fill it with states, but the outbox's churn (an entry written
/// at detection, removed at delivery) does, with pages sled keeps: 50
/// instances delivering 50 events a second held 5.5–6.1 MiB of anonymous
/// memory with 8 MiB, 4.0–4.7 with 1 MiB. So the cache follows the fleet,
/// as counted at start (a reload that adds instances keeps it until the
/// next start).
pub fn cache_for(instances: Option<usize>) -> u64 {
    const MIB: u64 = 1024 * 1024;
    const PER_INSTANCE: u64 = 84;
    match instances {
        None => 8 * MIB,
        Some(n) => (n as u64).saturating_mul(PER_INSTANCE).clamp(MIB, 8 * MIB),
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, with the cache of a fleet
    /// of unknown size (see [`cache_for`]).
    pub fn open(dir: &Path) -> Result<SledStore> {
        Self::open_with_cache(dir, cache_for(None))
    }

    /// Opens (or creates) the store in `dir` with `cache` bytes of page
    /// cache.
    pub fn open_with_cache(dir: &Path, cache: u64) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache)
            // Durability comes from flushing at each commit (see commit_poll),
            // not from this background timer; keep it as a safety net.
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| match &source {
                // sled says so only in its message (`Error::Io`, kind Other).
                sled::Error::Io(e) if e.to_string().starts_with("could not acquire lock") => {
                    StoreError::Locked {
                        path: dir.display().to_string(),
                    }
                }
                _ => StoreError::Open {
                    path: dir.display().to_string(),
                    source: Box::new(source),
                },
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err("open tree"));
        let outbox = tree("outbox")?;
        migrate_outbox_keys(&outbox)?;
        let history_dir = dir.join("history");
        migrate_attempts_tree(&db, &history_dir)?;
        let history = AttemptLog::open(&history_dir).map_err(|source| StoreError::Open {
            path: history_dir.display().to_string(),
            source: Box::new(source),
        })?;
        let store = SledStore {
            state: tree("state")?,
            next_run: tree("next_run")?,
            seen: tree("seen")?,
            known: tree("known")?,
            outbox,
            dead: tree("dead")?,
            discovered: tree("discovered")?,
            history: Arc::new(history),
            removed: tree("removed")?,
            disabled: tree("disabled")?,
            quota: tree("quota")?,
            credentials: tree("credentials")?,
            db,
            flush: Default::default(),
        };
        store.split_inline_states()?;
        Ok(store)
    }

    /// States written before seen ids and known items had records of
    /// their own carry them inline: they are split once, each state in one
    /// transaction.
    fn split_inline_states(&self) -> Result<()> {
        let mut inline = Vec::new();
        for r in self.state.iter() {
            let (k, v) = r.map_err(sled_err("scan state"))?;
            let s: InstanceState = decode(&k, &v)?;
            if !s.seen.is_empty() || !s.seen_at.is_empty() || !s.known.is_empty() {
                inline.push((text(&k), s));
            }
        }
        for (instance, s) in inline {
            let w = self.encode_write(&instance, &StateWrite::whole(&s, crate::now_ms()))?;
            self.write_state(&w)?;
        }
        Ok(())
    }

    /// The length of an instance's state record as stored (tests: what a
    /// commit rewrites).
    #[cfg(test)]
    pub(crate) fn state_record_len(&self, instance: &str) -> usize {
        self.state.get(instance).unwrap().map_or(0, |v| v.len())
    }

    /// Writes a state record as a version before the split wrote it
    /// (tests); the next open splits it.
    #[cfg(test)]
    pub(crate) fn write_legacy_state(&self, instance: &str, json: &str) {
        self.state.insert(instance, json.as_bytes()).unwrap();
        self.db.flush().unwrap();
    }

    /// Encodes `w` for `instance`. A replacing write also deletes the
    /// instance's current per-id records, read here: a store has one
    /// writer per instance, so none come between this read and the
    /// transaction. Blocking (a scan).
    fn encode_write(&self, instance: &str, w: &StateWrite) -> Result<EncodedWrite> {
        let enc = |ids: &[String]| ids.iter().map(|id| member_key(instance, id)).collect();
        let mut e = EncodedWrite {
            state_key: instance.as_bytes().to_vec(),
            core: encode(&w.core),
            seen_put: w
                .seen_put
                .iter()
                .map(|(id, at)| (member_key(instance, id), encode(at)))
                .collect(),
            seen_del: enc(&w.seen_del),
            known_put: w
                .known_put
                .iter()
                .map(|(id, item)| (member_key(instance, id), encode(item)))
                .collect(),
            known_del: enc(&w.known_del),
        };
        if w.replace {
            let prefix = member_prefix(instance);
            for (tree, del) in [
                (&self.seen, &mut e.seen_del),
                (&self.known, &mut e.known_del),
            ] {
                for k in tree.scan_prefix(&prefix).keys() {
                    del.push(k.map_err(sled_err("scan state"))?.to_vec());
                }
            }
        }
        Ok(e)
    }

    /// Writes a state alone (imports, the split of old states), in one
    /// transaction. Blocking.
    fn write_state(&self, e: &EncodedWrite) -> Result<()> {
        (&self.state, &self.seen, &self.known)
            .transaction(|(st, se, kn)| e.apply(st, se, kn))
            .map_err(tx_err("write state"))
    }

    /// Makes every write done before the call durable, sharing one flush
    /// with concurrent callers (see [`GroupFlush`]). The ticket is taken
    /// after the caller's write, and a flush covers every ticket issued
    /// before it started.
    async fn flush_group(&self) -> Result<()> {
        let ticket = self.flush.issued.fetch_add(1, SeqCst) + 1;
        let _turn = self.flush.turn.lock().await;
        if self.flush.durable.load(SeqCst) >= ticket {
            return Ok(());
        }
        let covers = self.flush.issued.load(SeqCst);
        let db = self.db.clone();
        blocking(move || db.flush().map_err(sled_err("flush"))).await?;
        self.flush.durable.store(covers, SeqCst);
        Ok(())
    }

    /// The tree of a kind of record (the history has none).
    fn tree(&self, kind: RecordKind) -> Option<&sled::Tree> {
        Some(match kind {
            RecordKind::Disabled => &self.disabled,
            RecordKind::State => &self.state,
            RecordKind::Discovered => &self.discovered,
            RecordKind::Removed => &self.removed,
            RecordKind::Outbox => &self.outbox,
            RecordKind::Dead => &self.dead,
            RecordKind::Attempt => return None,
        })
    }

    /// The state as stored, with its next run from its own tree. (States
    /// written before that tree existed carry their own `next_run_ms`,
    /// used until the poller records a new one.)
    /// An instance's state from its record, its per-id records and its
    /// next run. Blocking (scans).
    fn read_state(&self, key: &[u8], bytes: Option<&[u8]>) -> Result<InstanceState> {
        let core: InstanceState = match bytes {
            Some(b) => decode(key, b)?,
            None => InstanceState::default(),
        };
        let prefix = member_prefix(&text(key));
        let mut seen = Vec::new();
        for r in self.seen.scan_prefix(&prefix) {
            let (k, v) = r.map_err(sled_err("read seen ids"))?;
            seen.push((text(&k[prefix.len()..]), decode(&k, &v)?));
        }
        let mut known = Vec::new();
        for r in self.known.scan_prefix(&prefix) {
            let (k, v) = r.map_err(sled_err("read known items"))?;
            known.push((text(&k[prefix.len()..]), decode(&k, &v)?));
        }
        let mut s = assemble(core, seen, known);
        if let Some(b) = self.next_run.get(key).map_err(sled_err("read next run"))? {
            s.next_run_ms = Some(decode(key, &b)?);
        }
        Ok(s)
    }
}

impl Backend for SledStore {
    async fn load_state(&self, instance: &str) -> Result<InstanceState> {
        let (me, instance) = (self.clone(), instance.to_string());
        blocking(move || {
            let b = me.state.get(&instance).map_err(sled_err("read state"))?;
            me.read_state(instance.as_bytes(), b.as_deref())
        })
        .await
    }

    async fn all_states(&self) -> Result<Vec<(String, InstanceState)>> {
        let me = self.clone();
        blocking(move || {
            let mut out = Vec::new();
            for r in me.state.iter() {
                let (k, v) = r.map_err(sled_err("scan state"))?;
                out.push((text(&k), me.read_state(&k, Some(&v))?));
            }
            Ok(out)
        })
        .await
    }

    async fn state_keys(&self) -> Result<Vec<String>> {
        let me = self.clone();
        blocking(move || {
            let mut keys = BTreeSet::new();
            for t in [&me.state, &me.next_run] {
                for k in t.iter().keys() {
                    keys.insert(text(&k.map_err(sled_err("scan state"))?));
                }
            }
            Ok(keys.into_iter().collect())
        })
        .await
    }

    async fn commit_poll(
        &self,
        instance: &str,
        write: &StateWrite,
        deliveries: &[(String, OutboxEntry)],
        // One process writes a sled store: there are no leases to check.
        _fence: Option<&Fence>,
    ) -> Result<Vec<EntryKey>> {
        let encoded: Vec<(String, Vec<u8>)> = deliveries
            .iter()
            .map(|(ep, e)| (ep.clone(), encode(e)))
            .collect();
        let me = self.clone();
        let instance = instance.to_string();
        let write = write.clone();
        let keys = blocking(move || {
            let w = me.encode_write(&instance, &write)?;
            (&me.state, &me.seen, &me.known, &me.outbox)
                .transaction(|(st, se, kn, ob)| {
                    w.apply(st, se, kn)?;
                    let mut keys = Vec::with_capacity(encoded.len());
                    for (ep, bytes) in &encoded {
                        let key = EntryKey {
                            endpoint: ep.clone(),
                            instance: instance.clone(),
                            seq: ob.generate_id()?,
                        };
                        ob.insert(key_bytes(&key), bytes.as_slice())?;
                        keys.push(key);
                    }
                    Ok::<_, ConflictableTransactionError<()>>(keys)
                })
                .map_err(tx_err("commit poll"))
        })
        .await?;
        self.flush_group().await?;
        Ok(keys)
    }

    async fn load_credential(&self, key: &str) -> Result<Option<String>> {
        let (t, k) = (self.credentials.clone(), key.to_string());
        blocking(move || {
            Ok(t.get(k.as_bytes())
                .map_err(sled_err("read credential"))?
                .map(|v| text(&v)))
        })
        .await
    }

    async fn save_credential(&self, key: &str, value: &str) -> Result<()> {
        let (t, k, v) = (self.credentials.clone(), key.to_string(), value.to_string());
        blocking(move || {
            t.insert(k.as_bytes(), v.as_bytes())
                .map_err(sled_err("keep credential"))?;
            Ok(())
        })
        .await?;
        self.flush_group().await
    }

    async fn enqueue(&self, deliveries: &[(String, OutboxEntry)]) -> Result<()> {
        let encoded: Vec<(EntryKey, Vec<u8>)> = deliveries
            .iter()
            .map(|(ep, e)| {
                let key = EntryKey {
                    endpoint: ep.clone(),
                    instance: e.instance.clone(),
                    seq: 0,
                };
                (key, encode(e))
            })
            .collect();
        let ob = self.outbox.clone();
        blocking(move || {
            ob.transaction(|t| {
                for (key, bytes) in &encoded {
                    let key = EntryKey {
                        seq: t.generate_id()?,
                        ..key.clone()
                    };
                    t.insert(key_bytes(&key), bytes.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err("queue"))
        })
        .await?;
        self.flush_group().await
    }

    async fn take_quota(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
    ) -> Result<Option<Duration>> {
        let (t, k) = (self.quota.clone(), key.to_string());
        let now = crate::now_ms() as f64;
        let wait = blocking(move || {
            // Compare-and-swap: two takers of one key never both get the
            // last slot.
            let mut wait = None;
            t.fetch_and_update(k.as_bytes(), |old| {
                let tat = old
                    .and_then(|b| b.try_into().ok())
                    .map_or(0.0, f64::from_be_bytes);
                match crate::gcra::take(now, tat, interval_ms, burst) {
                    Ok(next) => {
                        wait = None;
                        Some(next.to_be_bytes().to_vec())
                    }
                    Err(w) => {
                        wait = Some(w);
                        old.map(|b| b.to_vec())
                    }
                }
            })
            .map_err(sled_err("take quota"))?;
            Ok(wait)
        })
        .await?;
        if wait.is_none() {
            // Durable before the request goes (see the trait).
            self.flush_group().await?;
        }
        Ok(wait.map(|w| Duration::from_millis(w.max(0.0).ceil() as u64)))
    }

    async fn set_next_run(&self, instance: &str, next_run_ms: i64) -> Result<()> {
        let (t, k) = (self.next_run.clone(), instance.to_string());
        blocking(move || {
            t.insert(k, encode(&next_run_ms))
                .map_err(sled_err("record next run"))?;
            Ok(())
        })
        .await
    }

    async fn remove_state(&self, instance: &str) -> Result<()> {
        let (me, k) = (self.clone(), instance.to_string());
        blocking(move || {
            me.state.remove(&k).map_err(sled_err("remove state"))?;
            me.next_run
                .remove(&k)
                .map_err(sled_err("remove next run"))?;
            let prefix = member_prefix(&k);
            for tree in [&me.seen, &me.known] {
                for key in tree.scan_prefix(&prefix).keys() {
                    let key = key.map_err(sled_err("remove state"))?;
                    tree.remove(key).map_err(sled_err("remove state"))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn load_discovered(&self, source: &str) -> Result<Discovered> {
        match self
            .discovered
            .get(source)
            .map_err(sled_err("read discovered"))?
        {
            Some(b) => decode(source.as_bytes(), &b),
            None => Ok(Discovered::default()),
        }
    }

    async fn save_discovered(&self, source: &str, d: &Discovered) -> Result<()> {
        let (t, k, v) = (self.discovered.clone(), source.to_string(), encode(d));
        blocking(move || {
            t.insert(k, v).map_err(sled_err("write discovered"))?;
            Ok(())
        })
        .await
    }

    async fn mark_removed(&self, instance: &str, delete_at_ms: i64) -> Result<()> {
        let (t, k) = (self.removed.clone(), instance.to_string());
        blocking(move || {
            let _ = t
                .compare_and_swap(k, None as Option<&[u8]>, Some(encode(&delete_at_ms)))
                .map_err(sled_err("mark removed"))?;
            Ok(())
        })
        .await
    }

    async fn unmark_removed(&self, instance: &str) -> Result<()> {
        let (t, k) = (self.removed.clone(), instance.to_string());
        blocking(move || {
            t.remove(k).map_err(sled_err("unmark removed"))?;
            Ok(())
        })
        .await
    }

    async fn removed(&self) -> Result<Vec<(String, i64)>> {
        let me = self.clone();
        blocking(move || {
            me.removed
                .iter()
                .map(|r| {
                    let (k, v) = r.map_err(sled_err("scan removed"))?;
                    Ok((text(&k), decode(&k, &v)?))
                })
                .collect()
        })
        .await
    }

    async fn disable_endpoint(&self, endpoint: &str, why: &str) -> Result<()> {
        let (t, k, v) = (self.disabled.clone(), endpoint.to_string(), encode(&why));
        blocking(move || {
            t.insert(k, v).map_err(sled_err("disable endpoint"))?;
            Ok(())
        })
        .await?;
        self.flush_group().await
    }

    async fn endpoint_disabled(&self, endpoint: &str) -> Result<Option<String>> {
        match self
            .disabled
            .get(endpoint)
            .map_err(sled_err("read disabled"))?
        {
            Some(b) => decode(endpoint.as_bytes(), &b).map(Some),
            None => Ok(None),
        }
    }

    async fn enable_endpoint(&self, endpoint: &str) -> Result<bool> {
        let (t, k) = (self.disabled.clone(), endpoint.to_string());
        let was = blocking(move || Ok(t.remove(k).map_err(sled_err("enable endpoint"))?.is_some()))
            .await?;
        self.flush_group().await?;
        Ok(was)
    }

    async fn outbox_instances(&self, endpoint: &str) -> Result<BTreeSet<String>> {
        let me = self.clone();
        let p = prefix(endpoint);
        blocking(move || {
            let mut out = BTreeSet::new();
            // One seek per instance: after finding an instance, jump past
            // its whole lane (`\0` + 1 = `\x01` ends its prefix).
            let mut from = p.clone();
            loop {
                let Some(r) = me.outbox.range(from.clone()..).keys().next() else {
                    break;
                };
                let k = r.map_err(sled_err("scan outbox"))?;
                if !k.starts_with(&p) {
                    break;
                }
                let key = parse_key(&k)?;
                let mut next = instance_prefix(&key.endpoint, &key.instance);
                *next.last_mut().expect("prefix ends with \\0") = 1;
                out.insert(key.instance);
                from = next;
            }
            Ok(out)
        })
        .await
    }

    async fn outbox_head(
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
                Ok(Some((parse_key(&k)?, decode(&k, &v)?)))
            }
        }
    }

    async fn outbox_page(
        &self,
        endpoint: &str,
        after: Option<&EntryKey>,
        limit: usize,
    ) -> Result<Vec<(EntryKey, OutboxEntry)>> {
        let me = self.clone();
        let p = prefix(endpoint);
        let from = match after {
            Some(k) => {
                let mut b = key_bytes(k);
                b.push(0); // strictly after
                b
            }
            None => p.clone(),
        };
        blocking(move || {
            let mut out = Vec::new();
            for r in me.outbox.range(from..) {
                let (k, v) = r.map_err(sled_err("scan outbox"))?;
                if !k.starts_with(&p) || out.len() >= limit {
                    break;
                }
                out.push((parse_key(&k)?, decode(&k, &v)?));
            }
            Ok(out)
        })
        .await
    }

    async fn outbox_stats(&self, endpoint: &str) -> Result<(u64, Option<i64>)> {
        let me = self.clone();
        let p = prefix(endpoint);
        blocking(move || {
            let (mut n, mut oldest, mut lane): (u64, Option<i64>, Option<Vec<u8>>) =
                (0, None, None);
            for r in me.outbox.scan_prefix(&p) {
                let (k, v) = r.map_err(sled_err("scan outbox"))?;
                n += 1;
                // Entries of an instance are in detection order: only each
                // lane's head is decoded.
                let this = &k[..k.len().saturating_sub(8)];
                if lane.as_deref() == Some(this) {
                    continue;
                }
                lane = Some(this.to_vec());
                let e: OutboxEntry = decode(&k, &v)?;
                oldest = Some(oldest.map_or(e.created_ms, |o| o.min(e.created_ms)));
            }
            Ok((n, oldest))
        })
        .await
    }

    async fn delivered(&self, key: &EntryKey) -> Result<()> {
        let (t, k) = (self.outbox.clone(), key_bytes(key));
        blocking(move || {
            t.remove(k).map_err(sled_err("remove delivered"))?;
            Ok(())
        })
        .await
    }

    async fn delivered_next(&self, key: &EntryKey) -> Result<Option<(EntryKey, OutboxEntry)>> {
        self.delivered(key).await?;
        self.outbox_head(&key.endpoint, &key.instance).await
    }

    async fn reschedule(&self, key: &EntryKey, entry: &OutboxEntry) -> Result<()> {
        let (t, k, v) = (self.outbox.clone(), key_bytes(key), encode(entry));
        blocking(move || {
            t.insert(k, v).map_err(sled_err("reschedule"))?;
            Ok(())
        })
        .await
    }

    async fn dead_letter(&self, key: &EntryKey, letter: &DeadLetter) -> Result<()> {
        let bytes = encode(letter);
        let k = key_bytes(key);
        let me = self.clone();
        blocking(move || {
            (&me.outbox, &me.dead)
                .transaction(|(ob, dead)| {
                    ob.remove(k.as_slice())?;
                    dead.insert(k.as_slice(), bytes.as_slice())?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                })
                .map_err(tx_err("dead-letter"))
        })
        .await?;
        self.flush_group().await
    }

    async fn dead_letters(&self, endpoint: Option<&str>) -> Result<Vec<(EntryKey, DeadLetter)>> {
        let me = self.clone();
        let p = endpoint.map(prefix).unwrap_or_default();
        blocking(move || {
            me.dead
                .scan_prefix(p)
                .map(|r| {
                    let (k, v) = r.map_err(sled_err("scan dead letters"))?;
                    Ok((parse_key(&k)?, decode(&k, &v)?))
                })
                .collect()
        })
        .await
    }

    async fn replay_dead(&self, letters: &[(EntryKey, DeadLetter)]) -> Result<usize> {
        let me = self.clone();
        let letters = letters.to_vec();
        let n = letters.len();
        blocking(move || {
            for (key, letter) in &letters {
                let mut entry = letter.entry.clone();
                entry.attempts = 0;
                entry.next_attempt_ms = 0;
                entry.last_error = None;
                let bytes = encode(&entry);
                let old = key_bytes(key);
                (&me.dead, &me.outbox)
                    .transaction(|(dead, ob)| {
                        dead.remove(old.as_slice())?;
                        let k = EntryKey {
                            endpoint: letter.endpoint.clone(),
                            instance: letter.entry.instance.clone(),
                            seq: ob.generate_id()?,
                        };
                        ob.insert(key_bytes(&k), bytes.as_slice())?;
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .map_err(tx_err("replay"))?;
            }
            Ok(())
        })
        .await?;
        self.flush_group().await?;
        Ok(n)
    }

    async fn drop_dead(&self, keys: &[EntryKey]) -> Result<usize> {
        let (t, ks): (_, Vec<Vec<u8>>) = (self.dead.clone(), keys.iter().map(key_bytes).collect());
        blocking(move || {
            for k in ks {
                t.remove(k).map_err(sled_err("drop dead letter"))?;
            }
            Ok(())
        })
        .await?;
        self.flush_group().await?;
        Ok(keys.len())
    }

    /// Appended to the history's log (see [`history`]), which keeps the
    /// newest [`ATTEMPTS_KEPT`]. Not durable until the next
    /// [`Backend::flush`]: the history records what happened, and a crash
    /// that loses its last records loses no event.
    async fn record_attempt(&self, rec: &AttemptRecord) -> Result<()> {
        let history = self.history.clone();
        let rec = rec.clone();
        blocking(move || {
            history
                .append(std::slice::from_ref(&rec))
                .map_err(io_err("record attempt"))
        })
        .await
    }

    async fn attempts(&self, q: &AttemptQuery) -> Result<Vec<AttemptRecord>> {
        let history = self.history.clone();
        let q = q.clone();
        blocking(move || history.newest(&q).map_err(io_err("read attempts"))).await
    }

    async fn prune_attempts(&self, before_ms: i64) -> Result<usize> {
        let history = self.history.clone();
        blocking(move || {
            history
                .prune_before(before_ms)
                .map_err(io_err("prune attempts"))
        })
        .await
    }

    async fn export_page(
        &self,
        kind: RecordKind,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Page> {
        let me = self.clone();
        blocking(move || {
            let Some(tree) = me.tree(kind) else {
                // The history's cursor is the last record's id.
                let after = match after.as_deref().map(<[u8; 8]>::try_from) {
                    None => None,
                    Some(Ok(id)) => Some(u64::from_be_bytes(id)),
                    Some(Err(_)) => {
                        return Err(StoreError::Corrupt {
                            key: "attempts".into(),
                            detail: "the export cursor is not an attempt id".into(),
                        })
                    }
                };
                let (recs, next) = me
                    .history
                    .page(after, limit)
                    .map_err(io_err("scan for export"))?;
                return Ok(Page {
                    records: recs
                        .into_iter()
                        .map(|value| Record::Attempt { value })
                        .collect(),
                    next: next.map(|id| id.to_be_bytes().to_vec()),
                });
            };
            let range = match &after {
                Some(a) => {
                    let mut from = a.clone();
                    from.push(0);
                    tree.range(from..)
                }
                None => tree.iter(),
            };
            let mut records = Vec::new();
            let mut last = None;
            for r in range {
                if records.len() >= limit {
                    return Ok(Page {
                        records,
                        next: last,
                    });
                }
                let (k, v) = r.map_err(sled_err("scan for export"))?;
                records.push(match kind {
                    RecordKind::Disabled => Record::Disabled {
                        endpoint: text(&k),
                        why: decode(&k, &v)?,
                    },
                    RecordKind::State => Record::State {
                        instance: text(&k),
                        value: me.read_state(&k, Some(&v))?,
                    },
                    RecordKind::Discovered => Record::Discovered {
                        source: text(&k),
                        value: decode(&k, &v)?,
                    },
                    RecordKind::Removed => Record::Removed {
                        instance: text(&k),
                        delete_at_ms: decode(&k, &v)?,
                    },
                    RecordKind::Outbox => Record::Outbox {
                        endpoint: parse_key(&k)?.endpoint,
                        value: decode(&k, &v)?,
                    },
                    RecordKind::Dead => Record::Dead {
                        value: decode(&k, &v)?,
                    },
                    RecordKind::Attempt => unreachable!("the history is no tree"),
                });
                last = Some(k.to_vec());
            }
            Ok(Page {
                records,
                next: None,
            })
        })
        .await
    }

    async fn count_records(&self) -> Result<usize> {
        let me = self.clone();
        blocking(move || {
            Ok(RecordKind::ALL
                .iter()
                .filter_map(|k| me.tree(*k))
                .map(sled::Tree::len)
                .sum::<usize>()
                + me.history.len()
                + me.next_run.len()
                + me.seen.len()
                + me.known.len())
        })
        .await
    }

    async fn import_records(&self, records: Vec<Record>) -> Result<usize> {
        let me = self.clone();
        let n = records.len();
        blocking(move || {
            let mut attempts = Vec::new();
            for r in records {
                let ins = |t: &sled::Tree, k: Vec<u8>, v: Vec<u8>| {
                    t.insert(k, v).map(drop).map_err(sled_err("import"))
                };
                match r {
                    Record::Disabled { endpoint, why } => {
                        ins(&me.disabled, endpoint.into_bytes(), encode(&why))?
                    }
                    Record::State { instance, value } => {
                        if let Some(t) = value.next_run_ms {
                            ins(&me.next_run, instance.clone().into_bytes(), encode(&t))?;
                        }
                        let w = StateWrite::whole(&value, crate::now_ms());
                        me.write_state(&me.encode_write(&instance, &w)?)?
                    }
                    Record::Discovered { source, value } => {
                        ins(&me.discovered, source.into_bytes(), encode(&value))?
                    }
                    Record::Removed {
                        instance,
                        delete_at_ms,
                    } => ins(&me.removed, instance.into_bytes(), encode(&delete_at_ms))?,
                    Record::Outbox { endpoint, value } => {
                        let key = EntryKey {
                            endpoint,
                            instance: value.instance.clone(),
                            seq: me.db.generate_id().map_err(sled_err("import"))?,
                        };
                        ins(&me.outbox, key_bytes(&key), encode(&value))?
                    }
                    Record::Dead { value } => {
                        let key = EntryKey {
                            endpoint: value.endpoint.clone(),
                            instance: value.entry.instance.clone(),
                            seq: me.db.generate_id().map_err(sled_err("import"))?,
                        };
                        ins(&me.dead, key_bytes(&key), encode(&value))?
                    }
                    Record::Attempt { value } => attempts.push(value),
                }
            }
            me.history.append(&attempts).map_err(io_err("import"))?;
            me.history.sync().map_err(io_err("import"))?;
            me.db.flush().map_err(sled_err("flush"))?;
            Ok(n)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.state.first().map_err(sled_err("read state"))?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.flush_group().await?;
        let history = self.history.clone();
        blocking(move || history.sync().map_err(io_err("flush the delivery history"))).await
    }
}

mod history;

#[cfg(test)]
mod tests;
