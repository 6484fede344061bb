//! The coordination seam: what the nodes sharing a store agree on, beside
//! the storage seam ([`super::Backend`]).
//!
//! [`Coordination`] is written once as a trait, in the shape of the
//! storage seam (async operations, static dispatch, one enum handle):
//! - **membership**: heartbeats, leaving, the nodes alive;
//! - **leases** with fencing tokens: rows made to exist, claimed (the
//!   epoch, the fencing token, raised at every claim), renewed, given
//!   back, pruned, and the epoch check ([`Coordination::fence_holds`], the
//!   same test a fenced commit makes under the lease row's lock);
//! - **quota bookings**: GCRA reservations ([`crate::gcra`]) of host quotas
//!   shared by every node, and hosts' shared pauses and paces;
//! - **wake-ups** ([`Notice`]): new outbox entries, host paces, endpoint
//!   flags, pruned or freed leases.
//!
//! Two implementations: PostgreSQL (`postgres/coordination.rs`: the
//! database's clock, `FOR UPDATE`, `LISTEN/NOTIFY`) for nodes sharing a
//! schema, and [`SingleNode`] (`single_node.rs`) for a store no other
//! process opens (sled): a lease table, bookings and wake-ups in this
//! process's memory. [`Coordinator`] is the handle; [`Store::coordination`]
//! gives the one that fits the store. The conformance suite
//! (`coordination_conformance.rs`) runs the same checks on both.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Keys as [`Coordination::ensure_leases`] takes them (tests).
#[cfg(test)]
pub(crate) fn shared(keys: &[String]) -> Vec<Arc<str>> {
    keys.iter().map(|k| Arc::from(k.as_str())).collect()
}

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::single_node::SingleNode;
use super::{postgres, Fence, Result, Store};

/// A node as the coordination has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRow {
    pub node: String,
    pub started_ms: i64,
    /// Milliseconds since its last heartbeat, by the coordination's clock.
    pub heartbeat_age_ms: i64,
    /// Leases it holds now (instances and discoveries).
    pub leases: i64,
}

/// A lease as the coordination has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRow {
    pub key: String,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Milliseconds until it lapses (negative: lapsed).
    pub left_ms: i64,
}

/// A lease a claim took: the fencing token it now holds, and whether a
/// live node had just given it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub key: String,
    /// The lease's new epoch (the fencing token).
    pub epoch: i64,
    /// How long ago a node gave it back ([`Coordination::release`]: a
    /// node leaving, or shedding leases for another's share), by the
    /// coordination's clock; `None` for a lease that lapsed, or that
    /// nobody held yet. The new holder treats a run that came due while
    /// the lease moved as put off by the move, not as missed by a
    /// stopped daemon (see `schedule::first_due_handed_over`).
    pub released_ago: Option<Duration>,
    /// It was another node's, whose lease lapsed (a silent node: dead,
    /// stopped, cut off): taken over. A run that came due while the lease
    /// lapsed was only put off (see `schedule::first_due_taken_over`).
    pub lapsed: bool,
    /// When its instance is due next, as its last holder stored it
    /// (milliseconds since the epoch), where the coordination keeps
    /// that beside the lease (PostgreSQL's `next_run`): the new holder
    /// reads the states of what it claimed soonest due first, so that a
    /// node gaining thousands of leases at once polls the instances
    /// whose runs come first, not whichever its queue held first.
    pub next_run_ms: Option<i64>,
}

/// A run of a quota's slots, as [`Coordination::book`] booked it: slot
/// `i` (from 0) is `wait + i * every` from the booking's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Booked {
    /// Until the first slot.
    pub wait: Duration,
    /// Between two slots: the interval asked for, or the host's shared
    /// pace when that is wider (the quota's row knows it, the node may
    /// not yet). Zero when the coordination books nothing (one node
    /// alone: its own limiter is the quota).
    pub every: Duration,
}

impl Booked {
    /// A run booked from the quota's row: `start - now` and the interval
    /// used, in milliseconds (a negative wait is none).
    pub fn from_ms(wait_ms: f64, every_ms: f64) -> Self {
        Booked {
            wait: Duration::from_secs_f64(wait_ms.max(0.0) / 1000.0),
            every: Duration::from_secs_f64(every_ms.max(0.0) / 1000.0),
        }
    }
}

/// A host's shared pause and pace, by the coordination's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPace {
    pub host: String,
    pub paused_for: Duration,
    pub gap: Option<Duration>,
}

/// A wake-up: what one node tells the others (and itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// New outbox entries of `instance` for `endpoint` (a commit, a replay).
    Outbox { endpoint: String, instance: String },
    /// A host's shared pause or pace changed (see
    /// [`Coordination::share_pace`]).
    Pace(String),
    /// An endpoint was disabled or enabled again: every node's worker
    /// reads which it is now.
    Endpoint(String),
    /// Lease rows of removed instances were pruned: a node whose
    /// configuration still has one adds it back.
    Leases,
    /// A node gave leases back or left: the others claim at once, not at
    /// their next round, so instances move in milliseconds rather than up
    /// to a third of a lease.
    Freed,
}

/// What nodes agree on. Every operation is async; times are the
/// implementation's own clock (the database's for PostgreSQL), never the
/// caller's.
pub trait Coordination: Send + Sync {
    /// Records that `node` is alive, and returns how many nodes are (a
    /// heartbeat younger than `alive_ms`). Nodes silent for an hour are
    /// forgotten. `alive_ms` is the lease: a coordination may let the
    /// heartbeat keep every lease of `node` for that long (PostgreSQL
    /// does: one row written per round, not one per lease), so a node
    /// counts its leases from before the heartbeat was sent.
    fn heartbeat(
        &self,
        node: &str,
        started_ms: i64,
        alive_ms: i64,
    ) -> impl Future<Output = Result<i64>> + Send;
    /// A node that stops says so: the others count one node fewer at once
    /// (and hear of it, [`Notice::Freed`]: their shares grew).
    fn leave(&self, node: &str) -> impl Future<Output = Result<()>> + Send;
    /// A node that has settled (it claims from now on) says so: the
    /// others hear of it ([`Notice::Freed`]: their shares shrank) and give
    /// back what is now its share at once, rather than at their next round.
    fn settled(&self, node: &str) -> impl Future<Output = Result<()>> + Send;
    /// The nodes, newest heartbeat first, with the leases each holds.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRow>>> + Send;

    /// Makes sure every key has a lease (unowned when new).
    fn ensure_leases(&self, keys: &[Arc<str>]) -> impl Future<Output = Result<()>> + Send;
    /// How many leases there are.
    fn lease_count(&self) -> impl Future<Output = Result<i64>> + Send;
    /// Extends every lease `node` holds by `lease_ms`; returns them with
    /// their epochs. A lease that lapsed but that nobody claimed is still
    /// the node's (same epoch).
    fn renew(
        &self,
        node: &str,
        lease_ms: i64,
    ) -> impl Future<Output = Result<Vec<(String, i64)>>> + Send;
    /// Renews as [`Coordination::renew`], but may answer `None` when the
    /// node's leases and epochs are exactly those it was last told of:
    /// its previous renewal's, and what its claims returned since
    /// (nothing given back, taken over or pruned): the caller keeps what
    /// it has, and a coordination that can tell spares building the list
    /// every round. After a release, or a claim or release that failed,
    /// the answer is the list.
    fn renew_changed(
        &self,
        node: &str,
        lease_ms: i64,
    ) -> impl Future<Output = Result<Option<Vec<(String, i64)>>>> + Send {
        async move { self.renew(node, lease_ms).await.map(Some) }
    }
    /// Claims up to `n` leases that nobody holds or that lapsed, raising
    /// their epochs (the fencing token); nodes claiming at once take
    /// different ones. Each says whether it was given back, and when.
    fn claim(
        &self,
        node: &str,
        lease_ms: i64,
        n: i64,
    ) -> impl Future<Output = Result<Vec<Claimed>>> + Send;
    /// Gives leases back: the next claim by any node takes them at once,
    /// and learns when they were given back ([`Claimed::released_ago`]).
    /// Every node hears of it ([`Notice::Freed`]).
    fn release(&self, node: &str, keys: &[String]) -> impl Future<Output = Result<()>> + Send;
    /// Deletes the leases of `keys` (no longer configured) that no other
    /// node holds (and, where the coordination shares the outbox, that have
    /// no entries left), and tells every node. Returns how many went, and
    /// the keys whose leases stay.
    fn prune_leases(
        &self,
        node: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(u64, BTreeSet<String>)>> + Send;
    /// Every lease.
    fn leases(&self) -> impl Future<Output = Result<Vec<LeaseRow>>> + Send;
    /// How long until the first lease held by a *silent* node (not
    /// `node`, no heartbeat for `silent_ms`: dead, stopped or cut off)
    /// lapses, by the coordination's clock; `None` when no such lease is
    /// still to lapse. A node claims once that time has come rather than
    /// at its next regular round, so a dead node's instances are taken
    /// over as soon as they can be. Live nodes' leases are left out: they
    /// keep being renewed, and their lapse times say nothing.
    fn next_lapse(
        &self,
        node: &str,
        silent_ms: i64,
    ) -> impl Future<Output = Result<Option<Duration>>> + Send;
    /// Whether `key`'s lease is still `fence.owner`'s at `fence.epoch`:
    /// the check a fenced commit makes. A stale token (a lower epoch, or
    /// another owner) is refused.
    fn fence_holds(&self, key: &str, fence: &Fence) -> impl Future<Output = Result<bool>> + Send;

    /// Books a run of `n` slots (at least one) of the quota `key` (see
    /// [`crate::gcra::reserve_run`]) and says when they are; the host's
    /// shared pause and pace (`key` `host:<host>`, see
    /// [`Coordination::share_pace`]) hold the run back and widen the
    /// interval. `durable`: the booking must survive a crash.
    fn book(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
        n: u32,
        durable: bool,
    ) -> impl Future<Output = Result<Booked>> + Send;
    /// Shares what one node learned of a host: a pause and a pace (least
    /// time between requests) valid for `gap.1`; every node hears
    /// [`Notice::Pace`].
    fn share_pace(
        &self,
        host: &str,
        pause: Option<Duration>,
        gap: Option<(Duration, Duration)>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Hosts paused or paced now, as any node shared them.
    fn paces(&self) -> impl Future<Output = Result<Vec<HostPace>>> + Send;

    /// Sends every wake-up to `tx` until the source fails (an error: the
    /// caller listens again and rescans, as wake-ups sent meanwhile are
    /// gone) or `tx` closes (`Ok`).
    fn listen(&self, tx: mpsc::Sender<Notice>) -> impl Future<Output = Result<()>> + Send;
}

/// The coordination handle the daemon holds: cheap to clone, dispatching
/// to the implementation that fits the store.
#[derive(Clone)]
pub enum Coordinator {
    /// Nodes sharing a PostgreSQL schema.
    Postgres(postgres::PgStore),
    /// This process alone.
    SingleNode(Arc<SingleNode>),
}

impl Coordinator {
    /// Whether other processes may take part (several nodes). Only what is
    /// *reported* differs (`/status` shows a cluster section for a shared
    /// one): a node runs the same path on both, [`SingleNode`] being the
    /// trivial implementation.
    pub fn is_shared(&self) -> bool {
        matches!(self, Coordinator::Postgres(_))
    }

    /// A coordination of this process alone, for what runs without a
    /// daemon's store (`pollhook test`, a bare set of host gates).
    pub fn alone() -> Coordinator {
        Coordinator::SingleNode(Arc::new(SingleNode::default()))
    }
}

impl Store {
    /// The coordination that fits this store: PostgreSQL's for a
    /// PostgreSQL store (nodes may share it), a fresh [`SingleNode`] for
    /// sled (no other process opens it). Take it once and clone it.
    pub fn coordination(&self) -> Coordinator {
        match self {
            Store::Postgres(p) => Coordinator::Postgres(p.clone()),
            Store::Sled(_) => Coordinator::SingleNode(Arc::new(SingleNode::default())),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $c:ident => $call:expr) => {
        match $self {
            Coordinator::Postgres($c) => $call,
            Coordinator::SingleNode($c) => $call,
        }
    };
}

impl Coordination for Coordinator {
    async fn heartbeat(&self, node: &str, started_ms: i64, alive_ms: i64) -> Result<i64> {
        dispatch!(self, c => c.heartbeat(node, started_ms, alive_ms).await)
    }
    async fn leave(&self, node: &str) -> Result<()> {
        dispatch!(self, c => c.leave(node).await)
    }
    async fn settled(&self, node: &str) -> Result<()> {
        dispatch!(self, c => c.settled(node).await)
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        dispatch!(self, c => c.nodes().await)
    }
    async fn ensure_leases(&self, keys: &[Arc<str>]) -> Result<()> {
        dispatch!(self, c => c.ensure_leases(keys).await)
    }
    async fn lease_count(&self) -> Result<i64> {
        dispatch!(self, c => c.lease_count().await)
    }
    async fn renew(&self, node: &str, lease_ms: i64) -> Result<Vec<(String, i64)>> {
        dispatch!(self, c => c.renew(node, lease_ms).await)
    }
    async fn renew_changed(&self, node: &str, lease_ms: i64) -> Result<Option<Vec<(String, i64)>>> {
        dispatch!(self, c => c.renew_changed(node, lease_ms).await)
    }
    async fn claim(&self, node: &str, lease_ms: i64, n: i64) -> Result<Vec<Claimed>> {
        dispatch!(self, c => c.claim(node, lease_ms, n).await)
    }
    async fn release(&self, node: &str, keys: &[String]) -> Result<()> {
        dispatch!(self, c => c.release(node, keys).await)
    }
    async fn prune_leases(&self, node: &str, keys: &[String]) -> Result<(u64, BTreeSet<String>)> {
        dispatch!(self, c => c.prune_leases(node, keys).await)
    }
    async fn leases(&self) -> Result<Vec<LeaseRow>> {
        dispatch!(self, c => c.leases().await)
    }
    async fn next_lapse(&self, node: &str, silent_ms: i64) -> Result<Option<Duration>> {
        dispatch!(self, c => c.next_lapse(node, silent_ms).await)
    }
    async fn fence_holds(&self, key: &str, fence: &Fence) -> Result<bool> {
        dispatch!(self, c => c.fence_holds(key, fence).await)
    }
    async fn book(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
        n: u32,
        durable: bool,
    ) -> Result<Booked> {
        dispatch!(self, c => c.book(key, interval_ms, burst, n, durable).await)
    }
    async fn share_pace(
        &self,
        host: &str,
        pause: Option<Duration>,
        gap: Option<(Duration, Duration)>,
    ) -> Result<()> {
        dispatch!(self, c => c.share_pace(host, pause, gap).await)
    }
    async fn paces(&self) -> Result<Vec<HostPace>> {
        dispatch!(self, c => c.paces().await)
    }
    async fn listen(&self, tx: mpsc::Sender<Notice>) -> Result<()> {
        dispatch!(self, c => c.listen(tx).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sled store is opened by this process alone: its coordination is
    /// the single node's, which nobody else takes part in.
    #[tokio::test]
    async fn a_sled_store_coordinates_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = store.coordination();
        assert!(matches!(c, Coordinator::SingleNode(_)));
        assert!(!c.is_shared());
        // Fresh at each call: take it once and clone it.
        c.ensure_leases(&["s/i".into()]).await.unwrap();
        assert_eq!(c.clone().lease_count().await.unwrap(), 1);
        assert_eq!(store.coordination().lease_count().await.unwrap(), 0);
    }

    /// A PostgreSQL store may be shared by several nodes.
    #[tokio::test]
    async fn a_postgres_store_coordinates_with_other_nodes() {
        let t = "a_postgres_store_coordinates_with_other_nodes";
        if !postgres::testing::available(t).await {
            return;
        }
        let schema = postgres::testing::fresh_schema();
        let store = Store::open_postgres(&postgres::testing::url(), &schema)
            .await
            .unwrap();
        let c = store.coordination();
        let shared = c.is_shared();
        drop((c, store));
        postgres::testing::drop_schema(&schema);
        assert!(shared);
    }
}
