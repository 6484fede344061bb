//! The node: who polls and delivers what, among the nodes sharing a store.
//!
//! Every daemon is a node, on whatever coordination its store gives
//! (`Store::coordination()`): several nodes on one PostgreSQL schema, or
//! one alone on sled through `SingleNode`, the trivial implementation (it
//! claims every lease at its first round and keeps it; its renewals cost
//! nothing per lease). The rest of the program has one code path: it asks
//! this node, never which store it runs on.
//!
//! Every node runs the same configuration. Each instance (and each
//! discovering source's listing) has a **lease** in the store: an owner, an
//! epoch raised at every claim, and a time it lapses unless renewed. A node
//! polls an instance, and delivers its outbox entries, only while it holds
//! that instance's lease; a poll's commit is **fenced** by the epoch it
//! started under (see [`crate::store::Fence`]), so a node that was paused
//! or cut off past its lease can never write a stale cursor or events.
//!
//! One task per node ([`Cluster::run`]) keeps the leases, every third of
//! the lease time: a heartbeat; renewal of what it holds; then claims (or
//! gives back) leases until it holds its share, `ceil(leases / nodes)`
//! ([`plan`], pure). Claims use `FOR UPDATE SKIP LOCKED`, so nodes claiming
//! at once take different rows; a node that dies stops renewing, and its
//! leases lapse and are claimed by the others within the lease time: once
//! its heartbeat is half a lease old, the others ask when its first lease
//! lapses (`Coordination::next_lapse`) and run an extra round just after,
//! rather than up to a third of the lease later; an instance taken over
//! that way whose run came due meanwhile is polled at once. A
//! node gives back only leases it is not using (no poll or delivery in
//! flight), so a joining node takes its share without a double poll.
//!
//! The lease rows of instances removed by a reload or by discovery (their
//! tasks ended while the daemon runs) are pruned by the node that had
//! them once nobody uses them and their outbox is empty
//! ([`Cluster::unwant`]); a node whose configuration still wants one (not
//! reloaded yet) hears of the pruning and adds it back. A stop prunes
//! nothing.
//!
//! What the node believes it holds is kept here with a *local* expiry,
//! measured from before the renewal was sent and shortened by a margin:
//! a node that was stopped (SIGSTOP, a VM pause) and wakes up finds its
//! leases expired by its own clock before it asks anything, so it never
//! starts a poll on a lease that another node may have taken meanwhile.
//!
//! Delivery follows the instance's lease: the holder delivers its lanes,
//! so per-instance order holds across nodes (only the head is in flight,
//! anywhere), and a dead node's in-flight delivery is retried by the next
//! holder with the same `webhook-id`. New outbox entries are announced by
//! `NOTIFY` at commit; the listener wakes the local worker if this node
//! holds the lane. A lane with entries that no task wants (operational
//! events; an instance removed while its events wait) is adopted by the
//! worker that finds it ([`Cluster::adopt`]): it gets a lease row, so some
//! node delivers it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::quota::HostGates;
use crate::status::Status;
use crate::store::{Coordination, Coordinator, Fence, Notice};
use crate::wake::Wakes;

/// What a node does with its leases in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Claim up to this many more.
    Claim(usize),
    /// Give back this many (a node joined).
    Release(usize),
    Hold,
}

/// The node's share of `total` leases among `nodes` live nodes is
/// `ceil(total / nodes)`: the shares cover every lease, and no node holds
/// more than one above another's. Pure.
pub fn plan(held: usize, total: usize, nodes: usize) -> Plan {
    let share = total.div_ceil(nodes.max(1));
    if held < share {
        Plan::Claim(share - held)
    } else if held > share {
        Plan::Release(held - share)
    } else {
        Plan::Hold
    }
}

/// Which `n` leases a node gives back for another node's share: those it
/// chose before and could not give back yet (`draining`: busy then),
/// then, of the rest (`held`), those whose instances are due last by
/// `due` (as their poll tasks last showed), and last those with no known
/// run (a discovery's listing, a lane, an instance not polled here yet:
/// it may be due now). Pure.
///
/// Why: a lease given back is polled by nobody until the newcomer's
/// claim commits and it has read the instance's state. A node joining
/// three at 100,000 instances claims 25,000 rows in one statement (1–2 s)
/// and reads as many states: given back in any order, the instances due
/// in those seconds were late by as much (1,188 up to 4.6 s in the scale
/// bench). Given back due last first, the first of them is due most of an
/// interval later.
pub fn give_back_order(
    held: impl Iterator<Item = Arc<str>>,
    draining: impl Iterator<Item = Arc<str>>,
    due: impl Fn(&str) -> Option<i64>,
    n: usize,
) -> Vec<Arc<str>> {
    let mut order: Vec<Arc<str>> = draining.take(n).collect();
    let mut rest: Vec<(std::cmp::Reverse<Option<i64>>, Arc<str>)> =
        held.map(|k| (std::cmp::Reverse(due(&k)), k)).collect();
    rest.sort_unstable();
    order.extend(rest.into_iter().map(|(_, k)| k).take(n - order.len()));
    order
}

/// The lease key of a discovering source's listing: one node per cluster
/// lists it. (Instance keys are `source/instance`; no source name holds a
/// colon.)
pub fn discover_key(source: &str) -> String {
    format!("discover:{source}")
}

/// A lease this node holds, as it believes.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// When it lapses by this node's clock, with a margin (see the module doc).
    expires: Instant,
}

#[derive(Default)]
struct Leases {
    /// Keyed by the key [`Cluster::want`] was given (the roster's, shared
    /// with the instance's configuration) where there is one: see
    /// [`Cluster::shared_keys`].
    held: HashMap<Arc<str>, Held>,
    /// When every lease held at the last renewal lapses by this node's
    /// clock: a renewal that changed nothing moves only this.
    renewed_until: Option<Instant>,
    /// Polls and deliveries in flight per key: these are never given back.
    busy: HashMap<Arc<str>, u32>,
    /// Leases to give back once their poll or delivery in flight is done
    /// (a node joined and every lease here was busy: an instance waiting
    /// on a scarce host quota is in a poll most of the time). Nothing new
    /// starts under them.
    draining: std::collections::HashSet<Arc<str>>,
    /// Leases claimed with something their first poll here should know
    /// (see [`Arrived`]), until their poll task asks.
    arrived: HashMap<Arc<str>, Arrived>,
}

/// What a claim told about a lease, kept for its instance's first poll
/// here.
#[derive(Debug, Clone, Copy, Default)]
struct Arrived {
    /// How it came free (see [`Cluster::arrival`]), when that matters.
    how: Option<Arrival>,
    /// When its instance is due next, as its last holder stored it (see
    /// [`Cluster::due_hint`]).
    next_run_ms: Option<i64>,
}

/// How a lease this node claimed came free, when that matters to the
/// instance's first poll here (see [`Cluster::arrival`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Taken over from a silent node (dead, stopped, cut off) as its lease
    /// lapsed; that node has been silent at least this long.
    TakenOver(Duration),
    /// Given back by a live node (leaving, or shedding leases for another
    /// node's share) less than a lease ago.
    HandedOver,
}

impl Leases {
    /// When `h` lapses by this node's clock: from its claim, or from the
    /// last renewal, whichever is later.
    fn expires(&self, h: &Held) -> Instant {
        self.renewed_until.map_or(h.expires, |r| r.max(h.expires))
    }
}

/// The share of the lease a node counts on: renewal starts the clock
/// before the request leaves, and this keeps a fifth for clock-rate
/// differences and scheduling delays.
const LOCAL_SHARE: f64 = 0.8;

/// How long after a silent node's lease lapses (by the coordination's
/// clock, as this node measures it) the extra claim round runs: time for
/// the lapse to have come whatever the round trip and the timer's
/// rounding, without putting the takeover off noticeably.
const AFTER_LAPSE: Duration = Duration::from_millis(50);

/// The keys a node's configuration has, and those not yet given a lease
/// row (see [`Cluster::want`]).
type Wants = (BTreeSet<Arc<str>>, Vec<Arc<str>>);

/// One node of a cluster.
pub struct Cluster {
    /// This node's name: host, process id and a random suffix (or
    /// `POLLHOOK_NODE_NAME`), unique per process so that a restarted node
    /// never inherits leases it cannot know it held.
    pub node: String,
    store: Coordinator,
    /// How long a lease lasts without renewal (`store.lease`).
    pub lease: Duration,
    started_ms: i64,
    /// When this node started (see [`Cluster::settling`]).
    started: Instant,
    /// Whether this node has told the others it settled (see
    /// [`Cluster::round`]).
    announced: std::sync::atomic::AtomicBool,
    leases: Mutex<Leases>,
    /// Raised whenever the held set changes: poll loops waiting for their
    /// lease look again.
    changed: watch::Sender<u64>,
    /// Keys this node's configuration has (instances, discoveries), and
    /// those not yet given a lease row. Locked before `gone` and
    /// `leases`, never while either is held (see [`Cluster::shared_keys`]).
    wanted: Mutex<Wants>,
    /// Keys of outbox lanes no task wants (see [`Cluster::adopt`]), given
    /// a lease row once.
    adopted: Mutex<std::collections::HashSet<String>>,
    /// Keys no longer wanted (an instance removed by a reload or by
    /// discovery, a source removed), since when: their lease rows are
    /// pruned (see [`Cluster::prune`]).
    gone: Mutex<HashMap<String, Instant>>,
    /// The daemon's shutdown: tasks that end then are not removed, and
    /// their rows are kept for the next start and the other nodes.
    shutdown: CancellationToken,
    /// Rounds since the last prune.
    since_prune: std::sync::atomic::AtomicU32,
    /// Asks for a round now (new keys).
    kick: Notify,
}

/// A task's claim on its key: dropped when the task ends.
pub struct Wanted {
    cluster: Arc<Cluster>,
    key: Arc<str>,
}

impl Drop for Wanted {
    fn drop(&mut self) {
        self.cluster.unwant(&self.key);
    }
}

/// What [`Cluster::begin`] found.
pub enum Begin {
    /// Held, with time to spare: go ahead while holding the guard.
    Held(Busy),
    /// Held, but the local lease is (nearly) out: renewal is late (the
    /// database is slow or away). Wait and ask again.
    Lapsing,
    /// Not this node's.
    NotHeld,
}

/// A poll or delivery in flight under a lease: the lease is not given
/// back while one exists.
pub struct Busy {
    cluster: Arc<Cluster>,
    key: Arc<str>,
    pub epoch: i64,
}

impl Busy {
    /// The fence of a commit made under this lease.
    pub fn fence(&self) -> Fence {
        Fence {
            owner: self.cluster.node.clone(),
            epoch: self.epoch,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut l = self.cluster.leases.lock();
        if let Some(n) = l.busy.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                l.busy.remove(&self.key);
            }
        }
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, and its last
    // byte stays 0, so the name is terminated even if truncated.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return None;
    }
    let name = std::ffi::CStr::from_bytes_until_nul(&buf).ok()?;
    let name = name.to_str().ok()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

fn node_name() -> String {
    if let Ok(n) = std::env::var("POLLHOOK_NODE_NAME") {
        if !n.trim().is_empty() {
            return format!("{}-{:04x}", n.trim(), rand::random::<u16>());
        }
    }
    // gethostname(2) rather than /proc/sys/kernel/hostname, which the
    // packaged unit's `ProcSubset=pid` hides.
    let host = hostname().unwrap_or_else(|| "node".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl Cluster {
    pub fn new(store: Coordinator, lease: Duration, shutdown: CancellationToken) -> Arc<Cluster> {
        Arc::new(Cluster {
            node: node_name(),
            store,
            lease,
            started_ms: crate::now_ms(),
            started: Instant::now(),
            announced: Default::default(),
            leases: Mutex::new(Leases::default()),
            changed: watch::Sender::new(0),
            wanted: Mutex::new((BTreeSet::new(), Vec::new())),
            adopted: Mutex::default(),
            gone: Mutex::new(HashMap::new()),
            shutdown,
            since_prune: Default::default(),
            kick: Notify::new(),
        })
    }

    /// This configuration has `key` (an instance, a discovery): give it a
    /// lease row so that some node claims it. The key is kept as given
    /// (shared, not copied), and the held lease is keyed by it too.
    pub fn want(&self, key: &Arc<str>) {
        let mut w = self.wanted.lock();
        self.gone.lock().remove(&**key);
        if w.0.insert(key.clone()) {
            w.1.push(key.clone());
            self.kick.notify_one();
        }
    }

    /// Wants `key` (see [`Cluster::want`]) until the guard drops (see
    /// [`Cluster::unwant`]).
    pub fn want_while(self: &Arc<Self>, key: &str) -> Wanted {
        let key: Arc<str> = Arc::from(key);
        self.want(&key);
        Wanted {
            cluster: self.clone(),
            key,
        }
    }

    /// An outbox lane `key` has entries to deliver, though no task of this
    /// node wants it (operational events, or an instance removed while
    /// its events wait): it gets a lease row, once, so that some node
    /// holds it and delivers them. A coordination that keeps lease rows
    /// (PostgreSQL) has one already; the single node's starts empty.
    pub fn adopt(&self, key: &str) {
        let mut w = self.wanted.lock();
        if w.0.contains(key) || !self.adopted.lock().insert(key.to_string()) {
            return;
        }
        w.1.push(Arc::from(key));
        self.kick.notify_one();
    }

    /// `key`'s task ended: unless the daemon is stopping, the
    /// configuration no longer has it (removed by a reload, by
    /// discovery, or with its source), and its lease row is pruned once
    /// its outbox is empty.
    pub fn unwant(&self, key: &str) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let mut w = self.wanted.lock();
        if w.0.remove(key) {
            w.1.retain(|k| &**k != key);
            self.gone.lock().insert(key.to_string(), Instant::now());
        }
    }

    /// Deletes the lease rows of keys gone for at least a round (a task
    /// restarted by a reload wants its key again at once: its row stays)
    /// that nobody else holds, that this node is not using, and that have
    /// no outbox entries left (those are still delivered under the lease,
    /// and tried again every 30 rounds). Tells the other nodes, which add
    /// back rows they still want (a node not yet reloaded).
    async fn prune(&self) -> crate::store::Result<()> {
        let round = self.lease / 3;
        let due: Vec<String> = {
            let gone = self.gone.lock();
            let l = self.leases.lock();
            let fresh = gone.values().any(|t| t.elapsed() < round * 3);
            let rounds = self
                .since_prune
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if gone.is_empty() || (!fresh && rounds < 30) {
                return Ok(());
            }
            gone.iter()
                .filter(|(k, t)| t.elapsed() >= round && !l.busy.contains_key(k.as_str()))
                .map(|(k, _)| k.clone())
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        self.since_prune
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let (pruned, kept) = self.store.prune_leases(&self.node, &due).await?;
        let mut gone = self.gone.lock();
        let mut adopted = self.adopted.lock();
        for k in &due {
            if !kept.contains(k) {
                gone.remove(k);
                // Entries left (a coordination that does not see the
                // outbox pruned it): the worker adopts it again.
                adopted.remove(k);
            }
        }
        if pruned > 0 {
            info!(node = %self.node, pruned, waiting = kept.len(), "lease rows of removed instances pruned");
        }
        Ok(())
    }

    /// The key [`Cluster::want`] was given for each of `keys` (so that
    /// the held set shares the one allocation of an instance's key with
    /// the roster, the status and the configuration), or a new one for a
    /// key not wanted here (an adopted outbox lane).
    fn shared_keys(&self, keys: impl IntoIterator<Item = String>) -> Vec<Arc<str>> {
        let w = self.wanted.lock();
        keys.into_iter()
            .map(|k| w.0.get(k.as_str()).cloned().unwrap_or_else(|| Arc::from(k)))
            .collect()
    }

    /// Whether this node holds `key` now (by its own clock).
    pub fn holds(&self, key: &str) -> bool {
        let l = self.leases.lock();
        l.held
            .get(key)
            .is_some_and(|h| l.expires(h) > Instant::now())
    }

    /// The epoch this node holds `key` under, if it does and is not
    /// giving it back.
    pub fn epoch(&self, key: &str) -> Option<i64> {
        let l = self.leases.lock();
        if l.draining.contains(key) {
            return None;
        }
        l.held.get(key).map(|h| h.epoch)
    }

    /// Starts a poll or delivery of `key` under its lease, if this node
    /// holds it with at least a quarter of the lease left.
    pub fn begin(self: &Arc<Self>, key: &str) -> Begin {
        let mut l = self.leases.lock();
        let Some((key, h)) = l.held.get_key_value(key).map(|(k, h)| (k.clone(), *h)) else {
            return Begin::NotHeld;
        };
        if l.draining.contains(&key) {
            return Begin::NotHeld;
        }
        if l.expires(&h).saturating_duration_since(Instant::now()) < self.lease / 4 {
            return Begin::Lapsing;
        }
        *l.busy.entry(key.clone()).or_default() += 1;
        Begin::Held(Busy {
            cluster: self.clone(),
            key,
            epoch: h.epoch,
        })
    }

    /// Waits until this node holds `key`; returns the epoch.
    pub async fn until_held(&self, key: &str) -> i64 {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(epoch) = self.epoch(key) {
                return epoch;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for the next change of the held set (or `max`).
    pub async fn next_change(&self, max: Duration) {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(max, rx.changed()).await;
    }

    /// Sees each change of the held set (gained, lost, given back).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The keys this node holds and is not giving back (see
    /// [`Cluster::epoch`]).
    pub fn held_keys(&self) -> Vec<String> {
        let l = self.leases.lock();
        l.held
            .keys()
            .filter(|k| !l.draining.contains(*k))
            .map(|k| k.to_string())
            .collect()
    }

    /// How many leases this node holds.
    pub fn held_count(&self) -> usize {
        self.leases.lock().held.len()
    }

    /// How this node came to hold `key`, if the instance's first poll
    /// here should know; asked once, by the instance's poll task when it
    /// starts polling under the lease. A run that came due while the lease
    /// moved was only put off by the move, and is due at once
    /// (`schedule::first_due_taken_over`, `schedule::first_due_handed_over`)
    /// rather than spread or skipped as after a stop.
    /// - [`Arrival::TakenOver`]: claimed from a silent node once its lease
    ///   lapsed (by the round run at the lapse, see [`Cluster::run`], or
    ///   any later one), with how long that node has at least been
    ///   silent: it renewed last one lease before the lapse, and would
    ///   have renewed again a third of a lease later.
    /// - [`Arrival::HandedOver`]: given back by a live node less than a
    ///   lease before the claim. A lease given back longer ago was left by
    ///   a cluster that stopped (nobody claimed it for a lease's time): its
    ///   instance starts as after a stop.
    pub fn arrival(&self, key: &str) -> Option<Arrival> {
        self.leases.lock().arrived.remove(key).and_then(|a| a.how)
    }

    /// When the instance of a lease this node just claimed is due next,
    /// as its last holder stored it, if the coordination said (see
    /// [`crate::store::Claimed::next_run_ms`]); read, not taken, until
    /// [`Cluster::arrival`]. The roster reads the states of what a claim
    /// brought soonest due first: a node gaining a third of 100,000
    /// instances took seconds to read their states, and an instance
    /// whose run came while it waited its turn in a queue of the claim's
    /// order was polled that late.
    pub fn due_hint(&self, key: &str) -> Option<i64> {
        self.leases
            .lock()
            .arrived
            .get(key)
            .and_then(|a| a.next_run_ms)
    }

    /// One round: heartbeat, renew, then claim or give back towards the
    /// node's share. Returns whether it gained leases (or stopped giving
    /// some back). Also run just after a silent node's leases lapse (see
    /// [`Cluster::next_lapse`]): what it claims then is taken over.
    async fn round(&self, status: &Status) -> crate::store::Result<bool> {
        let lease_ms = self.lease.as_millis() as i64;
        self.ensure_new().await;
        // The heartbeat may be what keeps the leases (PostgreSQL): they
        // are counted from before it was sent.
        let sent = Instant::now();
        let nodes = self
            .store
            .heartbeat(&self.node, self.started_ms, lease_ms)
            .await?;
        if !self.shutdown.is_cancelled() {
            if let Err(e) = self.prune().await {
                warn!(node = %self.node, error = %format!("{e:#}"), "cannot prune the leases of removed instances (tried again next round)");
            }
        }
        if self.store.is_shared()
            && !self.settling()
            && !self
                .announced
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // Settled: the others give back this node's share now (they
            // wait for it, see `claiming_nodes`), and it claims what they
            // give back as the release wakes it.
            if let Err(e) = self.store.settled(&self.node).await {
                tracing::debug!(node = %self.node, error = %e, "cannot announce this node; the others give back at their next round");
            }
        }
        let (mut gained, mut lost) = self.renew(lease_ms, sent).await?;
        let total = self.store.lease_count().await?;
        let draining_before = self.leases.lock().draining.clone();
        match plan(self.held_count(), total as usize, nodes as usize) {
            Plan::Claim(_) if self.settling() => {}
            Plan::Claim(n) => gained |= self.claim(n, lease_ms).await?,
            Plan::Release(n) => {
                // Only towards the nodes that claim: a joining node claims
                // nothing while it settles, and what was given back to it
                // meanwhile was polled by nobody until it did (a node
                // joining three others at 100,000 instances: thousands of
                // instances up to 9 s late). Given back once it has
                // settled, a lease is claimed at once (the release wakes it).
                let claiming = self.claiming_nodes(nodes as usize).await;
                if let Plan::Release(m) = plan(self.held_count(), total as usize, claiming) {
                    lost += self.give_back(n.min(m), status).await?;
                }
            }
            Plan::Hold => {
                // At its share again (a node left): nothing to give back.
                self.leases.lock().draining.clear();
            }
        }
        let draining_changed = {
            // Whatever is no longer held needs no draining.
            let mut l = self.leases.lock();
            let Leases { held, draining, .. } = &mut *l;
            draining.retain(|k| held.contains_key(k));
            *draining != draining_before
        };
        if gained || lost > 0 || draining_changed {
            self.changed.send_modify(|g| *g += 1);
        }
        if lost > 0 {
            info!(node = %self.node, lost, held = self.held_count(), "leases lost or given back");
        }
        Ok(gained || draining_changed)
    }

    /// Of the `live` nodes, how many claim leases: those that are not
    /// settling (see [`Cluster::settling`]), by their start times and this
    /// node's clock. Read only when this node has more than its share
    /// (a node joined): `live` if the nodes cannot be read.
    async fn claiming_nodes(&self, live: usize) -> usize {
        let settle_ms = (self.lease / 3).as_millis() as i64;
        let lease_ms = self.lease.as_millis() as i64;
        let now = crate::now_ms();
        match self.store.nodes().await {
            Ok(nodes) => nodes
                .iter()
                .filter(|n| n.heartbeat_age_ms < lease_ms && n.started_ms + settle_ms <= now)
                .count()
                .max(1),
            Err(e) => {
                tracing::debug!(node = %self.node, error = %e, "cannot read the nodes: sharing with every live one");
                live
            }
        }
    }

    /// Whether this node started less than a round ago with other
    /// processes possibly about: it claims nothing yet. Nodes started
    /// together (a cluster's first start, every machine rebooted) then
    /// see each other's heartbeats before claiming, and each takes its
    /// share, instead of the first one up taking the whole fleet (loading
    /// every state, its memory peaking at the fleet's size) and giving
    /// two thirds back a round later. Alone (`SingleNode`) there is no
    /// one to wait for.
    fn settling(&self) -> bool {
        self.store.is_shared() && self.started.elapsed() < self.lease / 3
    }

    /// Gives the keys wanted since the last round a lease row.
    async fn ensure_new(&self) {
        let new: Vec<Arc<str>> = std::mem::take(&mut self.wanted.lock().1);
        if new.is_empty() || self.store.ensure_leases(&new).await.is_ok() {
            return;
        }
        // One by one: a key the database refuses must not hold up the
        // others, nor the renewal of every lease this node holds.
        let mut again = Vec::new();
        for k in new {
            if let Err(e) = self.store.ensure_leases(std::slice::from_ref(&k)).await {
                let start: String = k.chars().take(64).collect();
                warn!(node = %self.node, key = %start, bytes = k.len(), error = %format!("{e:#}"), "cannot add this lease: it is not polled until it can be (tried again every round)");
                again.push(k);
            }
        }
        self.wanted.lock().1.extend(again);
    }

    /// Renews what this node holds; returns whether it gained leases (an
    /// epoch it did not know) and how many it lost. When the coordination
    /// says nothing changed since the last renewal, nothing is done per
    /// lease: the renewal's time covers them all. `sent`: when the
    /// round's heartbeat left, which may be what renews them.
    async fn renew(&self, lease_ms: i64, sent: Instant) -> crate::store::Result<(bool, usize)> {
        let renewed = self.store.renew_changed(&self.node, lease_ms).await?;
        let expires = sent + self.lease.mul_f64(LOCAL_SHARE);
        let renewed = renewed.map(|r| {
            let (keys, epochs): (Vec<String>, Vec<i64>) = r.into_iter().unzip();
            self.shared_keys(keys).into_iter().zip(epochs)
        });
        let mut l = self.leases.lock();
        l.renewed_until = Some(expires);
        let Some(renewed) = renewed else {
            return Ok((false, 0));
        };
        let next: HashMap<Arc<str>, Held> = renewed
            .map(|(k, epoch)| (k, Held { epoch, expires }))
            .collect();
        let differs = |a: &HashMap<Arc<str>, Held>, b: &HashMap<Arc<str>, Held>| {
            a.iter()
                .filter(|(k, h)| b.get(*k).is_none_or(|o| o.epoch != h.epoch))
                .count()
        };
        let gained = differs(&next, &l.held) > 0;
        let lost = differs(&l.held, &next);
        l.held = next;
        let Leases { held, arrived, .. } = &mut *l;
        arrived.retain(|k, _| held.contains_key(k));
        Ok((gained, lost))
    }

    /// Claims up to `n` more leases; returns whether it got any, and
    /// notes how each came (see [`Cluster::arrival`]).
    async fn claim(&self, n: usize, lease_ms: i64) -> crate::store::Result<bool> {
        self.leases.lock().draining.clear();
        let sent = Instant::now();
        let mut got = self.store.claim(&self.node, lease_ms, n as i64).await?;
        let expires = sent + self.lease.mul_f64(LOCAL_SHARE);
        let keys = self.shared_keys(got.iter_mut().map(|c| std::mem::take(&mut c.key)));
        let mut l = self.leases.lock();
        let gained = !got.is_empty();
        for (c, key) in got.into_iter().zip(keys) {
            let how = match c.released_ago {
                Some(ago) if ago <= self.lease => Some(Arrival::HandedOver),
                Some(_) => None,
                None if c.lapsed => Some(Arrival::TakenOver(self.lease.mul_f64(2.0 / 3.0))),
                None => None,
            };
            let arrived = Arrived {
                how,
                next_run_ms: c.next_run_ms,
            };
            if how.is_some() || c.next_run_ms.is_some() {
                l.arrived.insert(key.clone(), arrived);
            } else {
                // Claimed again as after a stop: an older mark is stale.
                l.arrived.remove(&key);
            }
            l.held.insert(
                key,
                Held {
                    epoch: c.epoch,
                    expires,
                },
            );
        }
        Ok(gained)
    }

    /// Gives back `n` leases for another node's share, those due last
    /// first (see [`give_back_order`]; `status` says when each is due):
    /// idle ones now, busy ones once their poll or delivery ends (nothing
    /// new starts under them meanwhile). Returns how many went back now.
    async fn give_back(&self, n: usize, status: &Status) -> crate::store::Result<usize> {
        let give: Vec<String> = {
            let mut l = self.leases.lock();
            let order = give_back_order(
                l.held.keys().filter(|k| !l.draining.contains(*k)).cloned(),
                l.draining.iter().cloned(),
                |k| status.next_poll_ms(k),
                n,
            );
            let mut idle = Vec::new();
            let mut drain = Vec::new();
            for k in order {
                if l.busy.contains_key(&k) {
                    drain.push(k);
                } else {
                    idle.push(k);
                }
            }
            for k in &idle {
                l.held.remove(k);
                l.draining.remove(k);
            }
            let fresh = drain.iter().filter(|k| !l.draining.contains(*k)).count();
            if fresh > 0 {
                info!(node = %self.node, leases = fresh, "leases busy (a poll or delivery in flight): given back once it ends, nothing new starts under them");
            }
            l.draining.extend(drain);
            idle.iter().map(|k| k.to_string()).collect()
        };
        if !give.is_empty() {
            info!(node = %self.node, leases = give.len(), "giving leases back for another node's share");
            self.store.release(&self.node, &give).await?;
        }
        Ok(give.len())
    }

    /// When to run the next extra round: just after the first lease of a
    /// silent node lapses, so its instances are taken over then rather
    /// than at the next regular round (up to a third of the lease later).
    /// A node is silent once its heartbeat is half a lease old: some
    /// round (a third of the lease apart) sees it before its leases lapse.
    /// `None`: no silent node's lease is still to lapse (or the
    /// coordination does not answer: the regular rounds go on).
    async fn next_lapse(&self) -> Option<Instant> {
        let sent = Instant::now();
        let silent_ms = (self.lease / 2).as_millis() as i64;
        match self.store.next_lapse(&self.node, silent_ms).await {
            Ok(left) => left.map(|d| sent + d + AFTER_LAPSE),
            Err(e) => {
                tracing::debug!(node = %self.node, error = %e, "cannot read when a silent node's leases lapse");
                None
            }
        }
    }

    /// Keeps this node's leases until `stop`, then gives them all back and
    /// leaves (the others take over at once rather than after the lease
    /// time). Also listens for the other nodes' notices: new outbox
    /// entries wake the local worker; a host's shared pause or pace is
    /// applied to the local gate.
    pub async fn run(
        self: Arc<Self>,
        live: Arc<Wakes>,
        hosts: Arc<HostGates>,
        status: Arc<Status>,
        stop: CancellationToken,
    ) {
        info!(node = %self.node, lease = %humantime::format_duration(self.lease), "node started: keeping its leases");
        let (tx, mut notices) = mpsc::channel::<Notice>(1024);
        let listener = {
            let store = self.store.clone();
            let live = live.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = store.listen(tx.clone()).await {
                        warn!(error = %e, "cluster notices: listening again in 1s (new entries are found by a rescan meanwhile)");
                    }
                    rescan_all(&live);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        // The extra round at a silent node's lapse, if one is to come.
        let mut lapse: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep_until(lapse.unwrap_or_else(Instant::now)), if lapse.is_some() => {}
                Some(n) = notices.recv() => {
                    self.on_notice(n, &live, &hosts).await;
                    continue;
                }
            }
            match self.round(&status).await {
                Ok(gained) => {
                    if failing {
                        info!(node = %self.node, "cluster store answers again; leases kept");
                        status.store_ok();
                        failing = false;
                    }
                    if gained {
                        rescan_all(&live);
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    warn!(node = %self.node, error = %msg, "cannot keep the leases: polls and deliveries pause as they lapse, and resume when the database answers");
                    status.store_failed(&msg);
                    failing = true;
                }
            }
            lapse = self.next_lapse().await;
            self.apply_paces(&hosts).await;
        }
        listener.abort();
        let all: Vec<String> = {
            let mut l = self.leases.lock();
            l.arrived.clear();
            l.held.drain().map(|(k, _)| k.to_string()).collect()
        };
        self.changed.send_modify(|g| *g += 1);
        if let Err(e) = self.store.release(&self.node, &all).await {
            warn!(error = %e, "cannot give the leases back; they lapse after the lease time");
        }
        let _ = self.store.leave(&self.node).await;
        info!(node = %self.node, leases = all.len(), "node left: leases given back");
    }

    /// What another node (or this one) announced: new outbox entries wake
    /// the local worker if this node holds the lane; a host's shared pause
    /// or pace is applied to the local gate.
    async fn on_notice(&self, n: Notice, live: &Wakes, hosts: &HostGates) {
        match n {
            Notice::Outbox { endpoint, instance } => {
                if self.holds(&instance) {
                    if let Some(w) = live.wake(&endpoint) {
                        w.instance(&instance);
                    }
                }
            }
            Notice::Pace(_) => self.apply_paces(hosts).await,
            Notice::Endpoint(name) => {
                if let Some(w) = live.wake(&name) {
                    w.recheck();
                }
            }
            // A node gave leases back or left: claim them now.
            Notice::Freed => self.kick.notify_one(),
            Notice::Leases => {
                // Another node pruned rows: add back any this node still
                // wants (its configuration differs until it is reloaded
                // too).
                let mut w = self.wanted.lock();
                let all: Vec<Arc<str>> = w.0.iter().cloned().collect();
                w.1 = all;
                drop(w);
                self.kick.notify_one();
            }
        }
    }

    /// Applies the hosts' shared pauses and paces to the local gates.
    async fn apply_paces(&self, hosts: &HostGates) {
        match self.store.paces().await {
            Ok(paces) => {
                for p in paces {
                    hosts.apply_shared(&p.host, p.paused_for, p.gap);
                }
            }
            Err(e) => warn!(error = %e, "cannot read the hosts' shared pauses"),
        }
    }

    /// The coordination, for the cluster's shared quotas.
    pub fn store(&self) -> &Coordinator {
        &self.store
    }
}

/// Every local worker looks at its whole queue again (leases gained, or
/// notices possibly missed).
fn rescan_all(live: &Wakes) {
    for ep in live.endpoints() {
        if let Some(w) = live.wake(&ep) {
            w.rescan();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_aims_at_its_share_rounded_up() {
        assert_eq!(plan(0, 10, 1), Plan::Claim(10));
        assert_eq!(plan(0, 10, 3), Plan::Claim(4));
        assert_eq!(plan(4, 10, 3), Plan::Hold);
        // Holding some already: only the rest of the share.
        assert_eq!(plan(2, 10, 3), Plan::Claim(2));
        // A node joined: the one holding everything gives back the excess.
        assert_eq!(plan(10, 10, 2), Plan::Release(5));
        assert_eq!(plan(5, 10, 2), Plan::Hold);
        assert_eq!(plan(6, 10, 2), Plan::Release(1));
        // No live node counted yet (its own heartbeat is the first): as one.
        assert_eq!(plan(0, 3, 0), Plan::Claim(3));
        assert_eq!(plan(0, 0, 2), Plan::Hold);
    }

    fn alone() -> Arc<Cluster> {
        Cluster::new(
            Coordinator::alone(),
            Duration::from_secs(15),
            CancellationToken::new(),
        )
    }

    /// Alone, a node holds every key it wants from its first round, and
    /// a round with nothing new changes nothing; an adopted lane (entries
    /// no task wants) is held at the next round.
    #[tokio::test]
    async fn alone_a_node_holds_every_key_from_its_first_round() {
        let c = alone();
        for i in 0..3 {
            c.want(&Arc::from(format!("s/{i}")));
        }
        assert!(c.round(&Status::default()).await.unwrap(), "gained");
        assert_eq!(c.held_count(), 3);
        assert!(matches!(c.begin("s/0"), Begin::Held(_)));
        assert!(!c.round(&Status::default()).await.unwrap(), "nothing new");
        assert_eq!(c.held_count(), 3);
        c.adopt("pollhook/ops");
        c.adopt("s/1");
        assert!(c.round(&Status::default()).await.unwrap());
        assert_eq!(c.held_count(), 4);
        assert!(c.holds("pollhook/ops"));
    }

    /// Under tokio's paused clock (hours pass at once), the rounds keep
    /// the leases: a poll never finds its lease lapsing.
    #[tokio::test(start_paused = true)]
    async fn alone_leases_hold_while_the_paused_clock_runs_hours() {
        let c = alone();
        c.want(&Arc::from("s/0"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(c.clone().run(
            Arc::new(Wakes::default()),
            Arc::new(HostGates::new(&Default::default())),
            Arc::new(Status::default()),
            stop.clone(),
        ));
        assert!(c.until_held("s/0").await > 0);
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(97)).await;
            assert!(matches!(c.begin("s/0"), Begin::Held(_)));
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(c.held_count(), 0, "given back when it stops");
    }

    /// Those chosen before go first; then the instances due last; those
    /// with no known run (maybe due now) last of all.
    #[test]
    fn leases_are_given_back_due_last_first() {
        let keys = |v: &[&str]| v.iter().map(|k| Arc::<str>::from(*k)).collect::<Vec<_>>();
        let due = |k: &str| match k {
            "soon" => Some(10),
            "later" => Some(50),
            "last" => Some(90),
            _ => None,
        };
        let held = keys(&["soon", "unknown", "last", "later"]);
        let order = |n, draining: &[&str]| {
            give_back_order(held.clone().into_iter(), keys(draining).into_iter(), due, n)
        };
        assert_eq!(order(2, &[]), keys(&["last", "later"]));
        assert_eq!(order(4, &[]), keys(&["last", "later", "soon", "unknown"]));
        assert_eq!(order(2, &["busy"]), keys(&["busy", "last"]));
        assert_eq!(order(1, &["busy", "other"]), keys(&["busy"]));
        assert_eq!(order(0, &[]), keys(&[]));
    }

    #[test]
    fn discovery_keys_never_collide_with_instance_keys() {
        assert_eq!(discover_key("accounts"), "discover:accounts");
        assert!(!discover_key("a").contains('/'));
    }
}
