//! Live status of instances and endpoints, shared by the workers (writers)
//! and the admin server (reader). In memory only: the store holds what must
//! survive a restart; this holds what an operator looks at.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub mod metrics;

use self::metrics::{DeliveryLabels, EventLabels, OutcomeLabels, PollLabels};
pub use self::metrics::{EndpointLabels, Metrics, SourceLabels, BUCKETS};

/// One instance's polling status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Shared by every instance of the source (see [`Status::intern`]).
    pub source: Arc<str>,
    pub instance: String,
    /// Shared by every instance of the connector.
    pub connector: Arc<str>,
    /// The least time between polls that the API asked for
    /// (`X-Poll-Interval`, `Cache-Control: max-age`, `Expires`), when it
    /// did, and which header said so: why the interval is longer than the
    /// schedule's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_floor_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_reason: Option<String>,
    /// In a cluster: the node holding the instance's lease now (it polls
    /// it and delivers its events); `None` when no node does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the last poll ended (ms since the epoch).
    pub last_poll_ms: Option<i64>,
    /// When the last successful poll ended (a `304` included: the upstream
    /// answered, and said nothing changed).
    pub last_ok_ms: Option<i64>,
    /// When the next poll is due.
    pub next_poll_ms: Option<i64>,
    /// Why the last poll failed, when it did (secrets masked).
    pub last_error: Option<String>,
    /// A poll that succeeded but not entirely as configured (the page cap
    /// reached, a paging loop): what happened, until a poll without it.
    pub last_warning: Option<String>,
    /// `detect: new`: ids forgotten because of `seen_limit` / `seen_ttl`.
    pub seen_evicted: u64,
    /// Time between the starts of the last two polls: the schedule's
    /// interval, or longer when a host quota is scarce.
    pub effective_interval_ms: Option<u64>,
    /// Adaptive schedules: the current interval.
    pub interval_ms: Option<u64>,
    /// Failed polls in a row; the instance backs off while this grows.
    pub consecutive_failures: u32,
    /// Polls that read an answer (a `304` is not one: see
    /// `polls_not_modified`). The three poll counters are disjoint and
    /// match `pollhook_polls_total`'s three outcomes.
    pub polls_ok: u64,
    pub polls_failed: u64,
    /// Polls answered `304 Not Modified` to a conditional request.
    pub polls_not_modified: u64,
    pub events: u64,
    pub cursor: Option<String>,
}

/// What [`Status`] keeps of an instance's status between updates: an
/// [`InstanceStatus`] packed. At 100,000 instances the status was the
/// largest thing each instance kept at rest (about 420 bytes: six
/// optional times of 16 bytes each, five optional strings of 24 almost
/// always empty, the instance's name a second copy of the map's key).
/// Here the times are plain integers with [`NONE`] for "not yet", the
/// names are shared (the instance's is the key's tail, the node's
/// interned, the source's and connector's one pair per source), the
/// counters are 32 bits, and what is rarely set waits behind one box
/// (128 bytes, 152 with its lock and `Arc`: the allocator's 160-byte
/// class rather than the 208-byte one of 168). Writers and
/// readers still see an [`InstanceStatus`] ([`Packed::unpack`] before,
/// [`Packed::pack`] after): the `/status` format is defined once.
#[derive(Debug)]
struct Packed {
    /// One pair for every instance of the source (see [`Status::pair`]).
    names: Arc<Names>,
    /// Interned: a cluster has a few node names for every instance.
    node: Option<Arc<str>>,
    cursor: Option<Box<str>>,
    rare: Option<Box<Rare>>,
    last_poll_ms: i64,
    last_ok_ms: i64,
    next_poll_ms: i64,
    interval_floor_ms: i64,
    effective_interval_ms: i64,
    interval_ms: i64,
    seen_evicted: u64,
    /// The counters stop at `u32::MAX` ([`narrow`]): 136 years of polls
    /// a second, and 16 bytes less for each of 100,000 instances.
    polls_ok: u32,
    polls_failed: u32,
    polls_not_modified: u32,
    events: u32,
    consecutive_failures: u32,
    /// Where the instance's name starts in the key (`source/name`), or
    /// `u32::MAX` when it is not the key's tail (then it is in `rare`).
    name_at: u32,
}

/// The source's and connector's names of an instance.
#[derive(Debug)]
struct Names {
    source: Arc<str>,
    connector: Arc<str>,
}

/// Interned [`Names`], by the (interned) names they pair.
type Pairs = std::collections::HashMap<(Arc<str>, Arc<str>), Arc<Names>>;

/// A counter kept in 32 bits, stopping at its largest value.
fn narrow(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// [`Packed`]'s fields that are almost always empty.
#[derive(Debug)]
struct Rare {
    instance: String,
    interval_reason: Option<String>,
    last_error: Option<String>,
    last_warning: Option<String>,
}

/// A [`Packed`] time or interval not known yet.
const NONE: i64 = i64::MIN;

fn pack_time(t: Option<i64>) -> i64 {
    t.unwrap_or(NONE)
}

fn unpack_time(t: i64) -> Option<i64> {
    (t != NONE).then_some(t)
}

/// Intervals are `u64` outside; one past `i64::MAX` ms is never one.
fn pack_interval(t: Option<u64>) -> i64 {
    t.map_or(NONE, |t| i64::try_from(t).unwrap_or(i64::MAX))
}

fn unpack_interval(t: i64) -> Option<u64> {
    u64::try_from(t).ok()
}

impl Packed {
    /// Packs `s`, the status of the instance `key`; `node` and `pair` are
    /// the packed node name and names before the update (kept when they
    /// did not change, so that an update allocates and looks up nothing).
    fn pack(
        key: &str,
        s: InstanceStatus,
        node: Option<Arc<str>>,
        pair: Option<Arc<Names>>,
        names: &Status,
    ) -> Packed {
        let name_at = key
            .len()
            .checked_sub(s.instance.len())
            .filter(|&at| key[at..] == s.instance)
            .and_then(|at| u32::try_from(at).ok())
            .unwrap_or(u32::MAX);
        let node = match (s.node, node) {
            (None, _) => None,
            (Some(n), Some(old)) if *old == *n => Some(old),
            (Some(n), _) => Some(names.intern(&n)),
        };
        let rare = (name_at == u32::MAX
            || s.interval_reason.is_some()
            || s.last_error.is_some()
            || s.last_warning.is_some())
        .then(|| {
            Box::new(Rare {
                instance: if name_at == u32::MAX {
                    s.instance
                } else {
                    String::new()
                },
                interval_reason: s.interval_reason,
                last_error: s.last_error,
                last_warning: s.last_warning,
            })
        });
        let names = match pair {
            Some(p)
                if Arc::ptr_eq(&p.source, &s.source) && Arc::ptr_eq(&p.connector, &s.connector) =>
            {
                p
            }
            _ => names.pair(s.source, s.connector),
        };
        Packed {
            names,
            node,
            cursor: s.cursor.map(String::into_boxed_str),
            rare,
            last_poll_ms: pack_time(s.last_poll_ms),
            last_ok_ms: pack_time(s.last_ok_ms),
            next_poll_ms: pack_time(s.next_poll_ms),
            interval_floor_ms: pack_interval(s.interval_floor_ms),
            effective_interval_ms: pack_interval(s.effective_interval_ms),
            interval_ms: pack_interval(s.interval_ms),
            seen_evicted: s.seen_evicted,
            polls_ok: narrow(s.polls_ok),
            polls_failed: narrow(s.polls_failed),
            polls_not_modified: narrow(s.polls_not_modified),
            events: narrow(s.events),
            consecutive_failures: s.consecutive_failures,
            name_at,
        }
    }

    /// The status of the instance `key` as writers and readers see it.
    fn unpack(&self, key: &str) -> InstanceStatus {
        let rare = self.rare.as_deref();
        let instance = match key.get(self.name_at as usize..) {
            Some(name) if self.name_at != u32::MAX => name.to_string(),
            _ => rare.map(|r| r.instance.clone()).unwrap_or_default(),
        };
        InstanceStatus {
            source: self.names.source.clone(),
            instance,
            connector: self.names.connector.clone(),
            interval_floor_ms: unpack_interval(self.interval_floor_ms),
            interval_reason: rare.and_then(|r| r.interval_reason.clone()),
            node: self.node.as_deref().map(str::to_string),
            last_poll_ms: unpack_time(self.last_poll_ms),
            last_ok_ms: unpack_time(self.last_ok_ms),
            next_poll_ms: unpack_time(self.next_poll_ms),
            last_error: rare.and_then(|r| r.last_error.clone()),
            last_warning: rare.and_then(|r| r.last_warning.clone()),
            seen_evicted: self.seen_evicted,
            effective_interval_ms: unpack_interval(self.effective_interval_ms),
            interval_ms: unpack_interval(self.interval_ms),
            consecutive_failures: self.consecutive_failures,
            polls_ok: self.polls_ok.into(),
            polls_failed: self.polls_failed.into(),
            polls_not_modified: self.polls_not_modified.into(),
            events: self.events.into(),
            cursor: self.cursor.as_deref().map(str::to_string),
        }
    }
}

/// One endpoint's delivery status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// Why the endpoint is disabled (a `410 Gone`, or failing longer than
    /// `circuit.disable_after`); nothing is sent to it until
    /// `pollhook endpoint enable` (kept in the store across restarts).
    pub disabled: Option<String>,
    /// Failed attempts in a row opened the circuit: only probes go out.
    pub circuit_open: bool,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dead_lettered: u64,
    pub last_error: Option<String>,
    pub last_success_ms: Option<i64>,
    /// Events in the outbox waiting for this endpoint. Kept in memory
    /// (pollers add what they commit, the worker removes what it delivers
    /// or dead-letters, and sets it from the store when it starts or
    /// rescans) so that `/status` and `/metrics` never scan the store.
    pub queue_depth: u64,
    /// When the oldest of those events was detected (ms since the epoch).
    pub oldest_pending_ms: Option<i64>,
    /// Events of this endpoint in the dead-letter tree (same upkeep).
    pub dead_letters: u64,
}

/// An endpoint's status and, beside it, what its `oldest_pending_ms` is
/// derived from.
#[derive(Debug, Default)]
struct EndpointEntry {
    status: EndpointStatus,
    /// Detection times of the waiting events, with how many events share
    /// each (a commit's events share one): the oldest is the first key, and
    /// stays exact as events leave in any order.
    pending: BTreeMap<i64, u64>,
}

impl EndpointEntry {
    fn add_pending(&mut self, created_ms: i64, n: u64) {
        if n == 0 {
            return;
        }
        *self.pending.entry(created_ms).or_default() += n;
        self.status.queue_depth += n;
        self.status.oldest_pending_ms = self.pending.keys().next().copied();
    }

    fn remove_pending(&mut self, created_ms: i64) {
        if let Some(n) = self.pending.get_mut(&created_ms) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&created_ms);
            }
        }
        self.status.queue_depth = self.status.queue_depth.saturating_sub(1);
        if self.status.queue_depth == 0 {
            self.pending.clear();
        }
        self.status.oldest_pending_ms = self.pending.keys().next().copied();
    }
}

/// How a poll ended, for `/status` and `pollhook_polls_total` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// The upstream answered and the answer was read.
    Ok,
    /// `304 Not Modified`: nothing was read.
    NotModified,
    Failed,
}

/// How a delivery attempt ended, for `/status` and
/// `pollhook_deliveries_total` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Delivered: the event left the outbox.
    Delivered,
    /// Failed; it will be tried again.
    Failed,
    /// Failed for the last time: the event moved to the dead letters.
    DeadLettered,
}

/// Everything the admin server shows.
#[derive(Default)]
pub struct Status {
    /// Instances by key. Each entry has its own lock, so `/status` and
    /// `/metrics` hold the map's lock only to copy the `Arc`s, and read
    /// each instance while its poller may update another.
    instances: Mutex<BTreeMap<Arc<str>, Arc<Mutex<Packed>>>>,
    /// Source, connector and node names (see [`Status::intern`]).
    names: Mutex<std::collections::HashSet<Arc<str>>>,
    /// Source and connector pairs (see [`Status::pair`]).
    pairs: Mutex<Pairs>,
    endpoints: Mutex<BTreeMap<String, EndpointEntry>>,
    discovery: Mutex<BTreeMap<String, DiscoveryStatus>>,
    config: Mutex<ConfigStatus>,
    metrics: Metrics,
    ready: AtomicBool,
    /// Whether the store takes writes (see [`StoreHealth`]).
    store: Mutex<StoreHealth>,
    /// Delivery workers running now (see [`AliveGuard`]).
    workers_alive: std::sync::atomic::AtomicUsize,
    /// Poll tasks running now. With the parked instances, the instances
    /// polled here: one per instance this node holds the lease of, none
    /// for the others (see `poll::Roster`).
    poll_tasks: std::sync::atomic::AtomicUsize,
    /// Instances parked: waiting for a poll a while away with no task
    /// (see `poll::Parked`).
    parked: std::sync::atomic::AtomicUsize,
    /// Polls, events and deliveries per minute over the last hour, for the
    /// dashboard's chart.
    activity: Mutex<std::collections::VecDeque<Minute>>,
}

/// What happened in one minute (the dashboard's chart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Minute {
    /// Minutes since the epoch.
    pub minute: i64,
    pub polls: u64,
    pub events: u64,
    pub deliveries: u64,
}

/// Whether the store takes writes, as the last writes found it: a failed
/// commit or outcome sets it, the next successful one clears it. `/readyz`
/// is not ready while it fails, `/status` shows why (a full disk), and the
/// daemon gives up after a while (see `daemon::run`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreHealth {
    /// Why the last write failed, while writes fail.
    pub error: Option<String>,
    /// When the current run of failures began (ms since the epoch).
    pub failing_since_ms: Option<i64>,
    /// Failed writes since the start.
    pub failures: u64,
}

/// Counts a task as alive until dropped: when it ends, panics included,
/// the count has one fewer (delivery workers: `/readyz` compares them with
/// the endpoints; poll tasks: `/status` shows them beside the leases held).
pub struct AliveGuard {
    status: std::sync::Arc<Status>,
    count: fn(&Status) -> &std::sync::atomic::AtomicUsize,
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        (self.count)(&self.status).fetch_sub(1, Ordering::SeqCst);
    }
}

/// The configuration's reloads (SIGHUP).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// Reloads applied since the start.
    pub reloads: u64,
    /// Reloads refused (an invalid file): the running configuration stayed.
    pub reloads_failed: u64,
    /// When the last reload was tried (ms since the epoch).
    pub last_reload_ms: Option<i64>,
    /// Whether the last reload was applied.
    pub last_reload_ok: Option<bool>,
    /// Why the last reload was refused (file, line, field).
    pub last_reload_error: Option<String>,
    /// What the last applied reload warned about (changes that need a
    /// restart, or that will emit events again).
    pub last_reload_warnings: Vec<String>,
}

/// A `for_each: discover` source's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    /// Instances running now.
    pub instances: usize,
    /// Instances that left the list and whose state is kept until retention.
    pub removed: usize,
    pub last_ok_ms: Option<i64>,
    pub last_error: Option<String>,
    pub next_ms: Option<i64>,
}

impl Status {
    /// A store write failed with `error`.
    pub fn store_failed(&self, error: &str) {
        let mut h = self.store.lock();
        h.failures += 1;
        h.failing_since_ms.get_or_insert_with(crate::now_ms);
        h.error = Some(error.to_string());
    }

    /// A store write succeeded.
    pub fn store_ok(&self) {
        let mut h = self.store.lock();
        if h.error.is_some() {
            h.error = None;
            h.failing_since_ms = None;
            drop(h);
            tracing::info!("the store takes writes again");
        }
    }

    pub fn store_health(&self) -> StoreHealth {
        self.store.lock().clone()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// A delivery worker starts; alive until the guard drops.
    pub fn worker_alive(self: &std::sync::Arc<Self>) -> AliveGuard {
        self.alive(|s| &s.workers_alive)
    }

    pub fn workers_alive(&self) -> usize {
        self.workers_alive.load(Ordering::SeqCst)
    }

    /// A poll task starts; counted until the guard drops.
    pub fn poll_task(self: &std::sync::Arc<Self>) -> AliveGuard {
        self.alive(|s| &s.poll_tasks)
    }

    /// Instances polled here now: a task running, or parked.
    pub fn poll_tasks(&self) -> usize {
        self.poll_tasks.load(Ordering::SeqCst) + self.parked()
    }

    /// An instance is parked; counted until the guard drops.
    pub fn parked_instance(self: &std::sync::Arc<Self>) -> AliveGuard {
        self.alive(|s| &s.parked)
    }

    /// Instances parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn alive(
        self: &std::sync::Arc<Self>,
        count: fn(&Status) -> &std::sync::atomic::AtomicUsize,
    ) -> AliveGuard {
        count(self).fetch_add(1, Ordering::SeqCst);
        AliveGuard {
            status: self.clone(),
            count,
        }
    }

    /// The counter families of `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Adds an instance that starts polling. One restarted by a reload
    /// keeps its counters, so `/status` counters never go backwards while
    /// the instance runs (`/metrics` counters never do: see [`Metrics`]).
    pub fn register_instance(&self, key: &Arc<str>, f: impl FnOnce(&mut InstanceStatus)) {
        let mut s = InstanceStatus::default();
        let old = self.entry(key);
        if let Some(old) = &old {
            let old = old.lock();
            s.polls_ok = old.polls_ok.into();
            s.polls_failed = old.polls_failed.into();
            s.polls_not_modified = old.polls_not_modified.into();
            s.events = old.events.into();
            s.seen_evicted = old.seen_evicted;
        }
        f(&mut s);
        s.source = self.intern(&s.source);
        s.connector = self.intern(&s.connector);
        // Every outcome's series exists from the first poll on, at zero.
        for outcome in ["ok", "not_modified", "error"] {
            self.metrics
                .polls
                .get_or_create(&PollLabels {
                    source: s.source.to_string(),
                    connector: s.connector.to_string(),
                    outcome,
                })
                .inc_by(0);
        }
        self.metrics
            .seen_evicted
            .get_or_create(&SourceLabels {
                source: s.source.to_string(),
                connector: s.connector.to_string(),
            })
            .inc_by(0);
        let packed = Packed::pack(key, s, None, None, self);
        match old {
            // Replaced in place: a copy taken by a scrape stays consistent.
            Some(old) => *old.lock() = packed,
            None => {
                self.instances
                    .lock()
                    .insert(key.clone(), Arc::new(Mutex::new(packed)));
            }
        }
    }

    /// The one copy of a source's or connector's name that every
    /// instance's status shares: 100,000 instances of one source held
    /// 200,000 copies of two names otherwise. Names are few and are kept
    /// for the daemon's life (a reload's new ones join them).
    pub fn intern(&self, name: &str) -> Arc<str> {
        let mut names = self.names.lock();
        if let Some(n) = names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        names.insert(n.clone());
        n
    }

    /// The one pair of a source's and connector's (interned) names that
    /// every instance of the source shares.
    fn pair(&self, source: Arc<str>, connector: Arc<str>) -> Arc<Names> {
        self.pairs
            .lock()
            .entry((source.clone(), connector.clone()))
            .or_insert_with(|| Arc::new(Names { source, connector }))
            .clone()
    }

    fn entry(&self, key: &str) -> Option<Arc<Mutex<Packed>>> {
        self.instances.lock().get(key).cloned()
    }

    /// When the instance `key` is due next, as its poll task last showed
    /// (none for a key that is not an instance, or not scheduled here
    /// yet): what a node giving leases back orders them by, one key at a
    /// time without unpacking the rest.
    pub fn next_poll_ms(&self, key: &str) -> Option<i64> {
        self.entry(key)
            .and_then(|e| unpack_time(e.lock().next_poll_ms))
    }

    /// Updates one instance's status. An instance that was removed (it left
    /// a discovered list while a poll was in flight) is not brought back.
    pub fn instance(&self, key: &str, f: impl FnOnce(&mut InstanceStatus)) {
        if let Some(e) = self.entry(key) {
            let mut packed = e.lock();
            let mut s = packed.unpack(key);
            f(&mut s);
            let (node, pair) = (packed.node.take(), Some(packed.names.clone()));
            *packed = Packed::pack(key, s, node, pair, self);
        }
    }

    /// A poll of `key` (of `source`, by `connector`) ended with `outcome`:
    /// counted in the instance's status and in `pollhook_polls_total` at
    /// once, so the two always agree; then `f` updates the rest of the
    /// status. A `seen_evicted` that `f` raises is added to
    /// `pollhook_seen_evicted_total`.
    /// Counts into the current minute of the activity (an hour is kept).
    fn bump(&self, f: impl FnOnce(&mut Minute)) {
        let minute = crate::now_ms().div_euclid(60_000);
        let mut a = self.activity.lock();
        if a.back().is_none_or(|m| m.minute != minute) {
            a.push_back(Minute {
                minute,
                ..Minute::default()
            });
            while a.len() > 60 {
                a.pop_front();
            }
        }
        f(a.back_mut().expect("pushed above"));
    }

    /// The last hour's activity, oldest minute first.
    pub fn activity(&self) -> Vec<Minute> {
        self.activity.lock().iter().copied().collect()
    }

    pub fn polled(
        &self,
        key: &str,
        source: &str,
        connector: &str,
        outcome: PollOutcome,
        f: impl FnOnce(&mut InstanceStatus),
    ) {
        self.bump(|m| m.polls += 1);
        let label = match outcome {
            PollOutcome::Ok => "ok",
            PollOutcome::NotModified => "not_modified",
            PollOutcome::Failed => "error",
        };
        self.metrics
            .polls
            .get_or_create(&PollLabels {
                source: source.to_string(),
                connector: connector.to_string(),
                outcome: label,
            })
            .inc();
        let mut evicted = 0;
        self.instance(key, |s| {
            match outcome {
                PollOutcome::Ok => s.polls_ok += 1,
                PollOutcome::NotModified => s.polls_not_modified += 1,
                PollOutcome::Failed => s.polls_failed += 1,
            }
            let before = s.seen_evicted;
            f(s);
            evicted = s.seen_evicted.saturating_sub(before);
        });
        if evicted > 0 {
            self.metrics
                .seen_evicted
                .get_or_create(&SourceLabels {
                    source: source.to_string(),
                    connector: connector.to_string(),
                })
                .inc_by(evicted);
        }
    }

    /// Drops an instance that no longer runs (left a discovered list).
    pub fn remove_instance(&self, key: &str) {
        self.instances.lock().remove(key);
    }

    /// Drops everything shown about a source (removed by a reload).
    pub fn remove_source(&self, source: &str) {
        let prefix = format!("{source}/");
        self.instances.lock().retain(|k, _| !k.starts_with(&prefix));
        self.discovery.lock().remove(source);
    }

    /// Drops an endpoint removed by a reload.
    pub fn remove_endpoint(&self, name: &str) {
        self.endpoints.lock().remove(name);
    }

    /// Records a reload: applied with its warnings, or refused and why.
    ///
    /// The refusal stays text, not a typed error: it is only shown (the
    /// `/status` report's `last_reload_error`, a JSON string read back by
    /// `pollhook status`), and the supervisor builds it from errors of
    /// several kinds (configuration, reload refusals) already worded.
    pub fn reloaded(&self, outcome: Result<Vec<String>, String>) {
        let mut c = self.config.lock();
        c.last_reload_ms = Some(crate::now_ms());
        c.last_reload_ok = Some(outcome.is_ok());
        let label = if outcome.is_ok() {
            "applied"
        } else {
            "refused"
        };
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
        match outcome {
            Ok(warnings) => {
                c.reloads += 1;
                c.last_reload_error = None;
                c.last_reload_warnings = warnings;
            }
            Err(why) => {
                c.reloads_failed += 1;
                c.last_reload_error = Some(why);
            }
        }
    }

    /// A poll of a source's instance took `took`.
    pub fn observe_poll(&self, source: &str, connector: &str, took: std::time::Duration) {
        self.metrics
            .poll_duration
            .get_or_create(&SourceLabels {
                source: source.to_string(),
                connector: connector.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// An event of `kind` was committed for delivery.
    pub fn count_event(&self, source: &str, kind: &str) {
        self.bump(|m| m.events += 1);
        self.metrics
            .events
            .get_or_create(&EventLabels {
                source: source.to_string(),
                r#type: kind.to_string(),
            })
            .inc();
    }

    /// A delivery attempt took `took`; `lag` is detection → delivered when
    /// it succeeded.
    pub fn observe_delivery(
        &self,
        endpoint: &str,
        took: std::time::Duration,
        lag: Option<std::time::Duration>,
    ) {
        let l = EndpointLabels {
            endpoint: endpoint.to_string(),
        };
        self.metrics
            .attempt_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if let Some(lag) = lag {
            self.metrics
                .delivery_lag
                .get_or_create(&l)
                .observe(lag.as_secs_f64());
        }
    }

    pub fn config(&self) -> ConfigStatus {
        self.config.lock().clone()
    }

    /// Updates one discovering source's status.
    pub fn discovery(&self, source: &str, f: impl FnOnce(&mut DiscoveryStatus)) {
        let mut m = self.discovery.lock();
        f(m.entry(source.to_string()).or_default());
    }

    pub fn discoveries(&self) -> BTreeMap<String, DiscoveryStatus> {
        self.discovery.lock().clone()
    }

    /// Updates one endpoint's status (created at zero when new, with its
    /// delivery counters' series).
    pub fn endpoint(&self, name: &str, f: impl FnOnce(&mut EndpointStatus)) {
        let mut m = self.endpoints.lock();
        let e = match m.get_mut(name) {
            Some(e) => e,
            None => {
                for outcome in ["delivered", "failed", "dead_lettered"] {
                    self.metrics
                        .deliveries
                        .get_or_create(&DeliveryLabels {
                            endpoint: name.to_string(),
                            outcome,
                        })
                        .inc_by(0);
                }
                m.entry(name.to_string()).or_default()
            }
        };
        f(&mut e.status);
    }

    /// A delivery attempt of an event detected at `created_ms` ended with
    /// `outcome`: counted in the endpoint's status and in
    /// `pollhook_deliveries_total` at once; an event that left the outbox
    /// (delivered or dead-lettered) leaves `queue_depth`. Then `f` updates
    /// the rest of the status.
    pub fn delivery(
        &self,
        name: &str,
        created_ms: i64,
        outcome: DeliveryOutcome,
        f: impl FnOnce(&mut EndpointStatus),
    ) {
        let label = match outcome {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::DeadLettered => "dead_lettered",
        };
        self.metrics
            .deliveries
            .get_or_create(&DeliveryLabels {
                endpoint: name.to_string(),
                outcome: label,
            })
            .inc();
        let mut m = self.endpoints.lock();
        let e = m.entry(name.to_string()).or_default();
        if matches!(outcome, DeliveryOutcome::Delivered) {
            self.bump(|m| m.deliveries += 1);
        }
        match outcome {
            DeliveryOutcome::Delivered => {
                e.status.delivered += 1;
                e.remove_pending(created_ms);
            }
            DeliveryOutcome::Failed => e.status.failed_attempts += 1,
            DeliveryOutcome::DeadLettered => {
                e.status.dead_lettered += 1;
                e.status.dead_letters += 1;
                e.remove_pending(created_ms);
            }
        }
        f(&mut e.status);
    }

    /// A poller is about to commit `n` events detected at `created_ms` for
    /// `endpoint`. Counted before the commit, so that the worker can never
    /// deliver one before it was counted; [`Status::unqueued`] takes them
    /// back if the commit fails.
    pub fn queued(&self, endpoint: &str, n: u64, created_ms: i64) {
        let mut m = self.endpoints.lock();
        m.entry(endpoint.to_string())
            .or_default()
            .add_pending(created_ms, n);
    }

    /// The commit announced by [`Status::queued`] failed.
    pub fn unqueued(&self, endpoint: &str, n: u64, created_ms: i64) {
        let mut m = self.endpoints.lock();
        if let Some(e) = m.get_mut(endpoint) {
            for _ in 0..n {
                e.remove_pending(created_ms);
            }
        }
    }

    /// Sets an endpoint's backlog from the store: the detection time of
    /// every waiting event, and the dead letters. The worker calls this
    /// when it starts and when entries appeared that only a scan finds (a
    /// replay), never on a scrape.
    pub fn set_backlog(&self, endpoint: &str, pending: impl IntoIterator<Item = i64>, dead: u64) {
        let mut times: BTreeMap<i64, u64> = BTreeMap::new();
        let mut depth = 0;
        for t in pending {
            *times.entry(t).or_default() += 1;
            depth += 1;
        }
        let mut m = self.endpoints.lock();
        let e = m.entry(endpoint.to_string()).or_default();
        e.status.queue_depth = depth;
        e.status.oldest_pending_ms = times.keys().next().copied();
        e.status.dead_letters = dead;
        e.pending = times;
    }

    /// Counts the dead letters of every known endpoint in the store again,
    /// after some were deleted (`pollhook dlq drop`, retention): rare, so a
    /// scan per endpoint is fine there, where it would not be per scrape.
    pub async fn recount_dead_letters(&self, store: &crate::store::Store) {
        let names: Vec<String> = self.endpoints.lock().keys().cloned().collect();
        for name in names {
            if let Ok(dead) = store.dead_letters(Some(&name)).await {
                let n = dead.len() as u64;
                self.endpoint(&name, |s| s.dead_letters = n);
            }
        }
    }

    /// A copy of every instance's status. The map's lock is held only to
    /// copy its `Arc`s; each instance is then copied under its own lock.
    pub fn instances(&self) -> BTreeMap<String, InstanceStatus> {
        self.instance_entries()
            .into_iter()
            .map(|(k, e)| {
                let s = e.lock().unpack(&k);
                (k.to_string(), s)
            })
            .collect()
    }

    /// Reads every instance in turn (key order), each unpacked under its
    /// own lock and then handed to `f` (no map of copies is built): what
    /// `/metrics` aggregates per source. At 100,000 instances a scrape
    /// unpacks 100,000 statuses, a few short strings each.
    pub fn each_instance(&self, mut f: impl FnMut(&InstanceStatus)) {
        for (k, e) in self.instance_entries() {
            let s = e.lock().unpack(&k);
            f(&s);
        }
    }

    fn instance_entries(&self) -> Vec<(Arc<str>, Arc<Mutex<Packed>>)> {
        self.instances
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn endpoints(&self) -> BTreeMap<String, EndpointStatus> {
        self.endpoints
            .lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.status.clone()))
            .collect()
    }
}

/// `/status` body.
/// Shared with `pollhook status`, which reads it back (see
/// `operate::status`).
#[derive(Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub instances: BTreeMap<String, InstanceStatus>,
    /// Endpoints with their backlog (`queue_depth`, `oldest_pending_ms`,
    /// `dead_letters`), kept in memory: a scrape never scans the store.
    pub endpoints: BTreeMap<String, EndpointStatus>,
    /// `for_each: discover` sources.
    pub discovery: BTreeMap<String, DiscoveryStatus>,
    /// Upstream hosts: requests, throttling answers, pauses.
    pub hosts: BTreeMap<String, crate::quota::HostReport>,
    /// Configuration reloads.
    pub config: ConfigStatus,
    /// Whether the store takes writes.
    pub store: StoreHealth,
    /// Instances waiting for a poll at least 2 s away with no task of
    /// their own (parked: a timer starts their task when it is due), of
    /// all the instances this node polls.
    #[serde(default)]
    pub parked: usize,
    /// In a cluster (PostgreSQL store): this node, every node with its
    /// last heartbeat, and the leases (each instance's `node` says who
    /// holds it). Read from the store at each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterReport>,
}

/// The cluster as `/status` shows it.
#[derive(Serialize, serde::Deserialize, Debug, Clone, Default)]
pub struct ClusterReport {
    /// The node that answered.
    pub node: String,
    /// Instances polled by the node that answered: one per instance it
    /// holds (its task running, or parked), so it follows the node's
    /// share of the fleet, not the fleet.
    #[serde(default)]
    pub poll_tasks: usize,
    pub nodes: Vec<crate::store::NodeRow>,
    /// Leases that no node holds now (none in a healthy cluster, but for
    /// a lease time after a node died).
    pub unheld: Vec<String>,
    /// Why the cluster could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn the_backlog_follows_events_in_and_out_and_knows_the_oldest() {
        let s = Status::default();
        s.set_backlog("ep", [300, 100, 100], 2);
        let ep = |s: &Status| s.endpoints()["ep"].clone();
        assert_eq!(ep(&s).queue_depth, 3);
        assert_eq!(ep(&s).oldest_pending_ms, Some(100));
        assert_eq!(ep(&s).dead_letters, 2);
        s.queued("ep", 2, 400);
        s.queued("ep", 1, 50);
        s.unqueued("ep", 1, 50); // that commit failed
        assert_eq!(ep(&s).queue_depth, 5);
        assert_eq!(ep(&s).oldest_pending_ms, Some(100));
        // Out of order (ordering: none), then a dead letter.
        s.delivery("ep", 300, DeliveryOutcome::Delivered, |_| {});
        s.delivery("ep", 100, DeliveryOutcome::Delivered, |_| {});
        assert_eq!(ep(&s).oldest_pending_ms, Some(100), "one left at 100");
        s.delivery("ep", 100, DeliveryOutcome::Failed, |_| {});
        assert_eq!(ep(&s).queue_depth, 3, "a failed attempt stays queued");
        s.delivery("ep", 100, DeliveryOutcome::DeadLettered, |_| {});
        assert_eq!(ep(&s).oldest_pending_ms, Some(400));
        assert_eq!(ep(&s).dead_letters, 3);
        assert_eq!(
            (
                ep(&s).delivered,
                ep(&s).failed_attempts,
                ep(&s).dead_lettered
            ),
            (2, 1, 1)
        );
        s.delivery("ep", 400, DeliveryOutcome::Delivered, |_| {});
        s.delivery("ep", 400, DeliveryOutcome::Delivered, |_| {});
        assert_eq!(ep(&s).queue_depth, 0);
        assert_eq!(ep(&s).oldest_pending_ms, None);
    }

    fn exposition(s: &Status) -> String {
        let mut r = Registry::default();
        s.metrics().register_sources(&mut r);
        s.metrics().register_deliveries(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        out
    }

    /// Every field of an [`InstanceStatus`] comes back from its packed
    /// form, set or not, with the instance's name the key's tail or not.
    #[test]
    fn a_packed_status_unpacks_to_what_was_packed() {
        let names = Status::default();
        let full = InstanceStatus {
            source: "src".into(),
            instance: "acc-1".into(),
            connector: "bank".into(),
            interval_floor_ms: Some(60_000),
            interval_reason: Some("X-Poll-Interval".into()),
            node: Some("node-a".into()),
            last_poll_ms: Some(1_700_000_000_000),
            last_ok_ms: Some(0),
            next_poll_ms: Some(-5),
            last_error: Some("upstream 500".into()),
            last_warning: Some("page cap".into()),
            seen_evicted: 3,
            effective_interval_ms: Some(0),
            interval_ms: Some(u64::MAX),
            consecutive_failures: 2,
            polls_ok: 7,
            polls_failed: 1,
            polls_not_modified: 9,
            events: 4,
            cursor: Some("c-9".into()),
        };
        let json = |s: &InstanceStatus| serde_json::to_value(s).unwrap();
        let back = Packed::pack("src/acc-1", full.clone(), None, None, &names).unpack("src/acc-1");
        let mut want = json(&full);
        // One past i64::MAX milliseconds is kept as i64::MAX.
        want["interval_ms"] = serde_json::json!(i64::MAX);
        assert_eq!(json(&back), want);
        let empty = InstanceStatus {
            instance: "other".into(),
            ..InstanceStatus::default()
        };
        let packed = Packed::pack("src/acc-1", empty.clone(), None, None, &names);
        assert!(packed.rare.is_some(), "a name not the key's tail is kept");
        assert_eq!(json(&packed.unpack("src/acc-1")), json(&empty));
        let plain = InstanceStatus {
            instance: "acc-1".into(),
            node: Some("node-a".into()),
            ..InstanceStatus::default()
        };
        let packed = Packed::pack("src/acc-1", plain.clone(), None, None, &names);
        assert!(packed.rare.is_none(), "nothing rare, no box");
        let node = packed.node.clone().unwrap();
        let pair = packed.names.clone();
        let again = Packed::pack(
            "src/acc-1",
            packed.unpack("src/acc-1"),
            packed.node,
            Some(pair.clone()),
            &names,
        );
        assert!(
            Arc::ptr_eq(&node, again.node.as_ref().unwrap()),
            "the node's name is shared"
        );
        assert!(Arc::ptr_eq(&pair, &again.names), "so are the names");
        let other = InstanceStatus {
            instance: "acc-2".into(),
            ..plain.clone()
        };
        let sibling = Packed::pack("src/acc-2", other, None, None, &names);
        assert!(
            Arc::ptr_eq(&pair, &sibling.names),
            "one pair for the source"
        );
        // Counters stop at the largest 32-bit value rather than wrap.
        let busy = InstanceStatus {
            polls_ok: u64::from(u32::MAX) + 5,
            ..plain.clone()
        };
        let busy = Packed::pack("src/acc-1", busy, None, None, &names).unpack("src/acc-1");
        assert_eq!(busy.polls_ok, u64::from(u32::MAX));
        assert_eq!(json(&again.unpack("src/acc-1")), json(&plain));
    }

    /// What each instance keeps at rest (see [`Packed`]): a regression
    /// here is 100,000 times its size.
    #[test]
    fn a_packed_status_is_small() {
        assert!(
            std::mem::size_of::<Packed>() <= 128,
            "{}",
            std::mem::size_of::<Packed>()
        );
    }

    #[test]
    fn counters_outlive_the_instances_and_endpoints_they_counted() {
        let s = Status::default();
        s.register_instance(&Arc::from("src/a"), |i| {
            i.source = "src".into();
            i.connector = "c".into();
        });
        s.polled("src/a", "src", "c", PollOutcome::Ok, |i| i.seen_evicted = 4);
        s.polled("src/a", "src", "c", PollOutcome::NotModified, |_| {});
        s.endpoint("ep", |_| {});
        s.delivery("ep", 0, DeliveryOutcome::Failed, |_| {});
        let i = &s.instances()["src/a"];
        assert_eq!((i.polls_ok, i.polls_not_modified), (1, 1));
        s.remove_source("src");
        s.remove_endpoint("ep");
        let text = exposition(&s);
        for line in [
            r#"pollhook_polls_total{source="src",connector="c",outcome="ok"} 1"#,
            r#"pollhook_polls_total{source="src",connector="c",outcome="not_modified"} 1"#,
            r#"pollhook_polls_total{source="src",connector="c",outcome="error"} 0"#,
            r#"pollhook_seen_evicted_total{source="src",connector="c"} 4"#,
            r#"pollhook_deliveries_total{endpoint="ep",outcome="failed"} 1"#,
            r#"pollhook_deliveries_total{endpoint="ep",outcome="delivered"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
