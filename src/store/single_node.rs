//! The coordination of a store that no other process opens (sled): the
//! same lease table, bookings and wake-ups as PostgreSQL's, kept in this
//! process's memory. With one node, it claims every lease and nobody takes
//! one from it (leases are always held); bookings are local GCRA
//! ([`crate::gcra::reserve`]); wake-ups go through a tokio broadcast
//! channel to every listener of this process.
//!
//! What a node keeps every round costs nothing per lease here: a renewal
//! extends the node's own time (every lease it owns lapses with it, unless
//! claimed later), and [`Coordination::renew_changed`] answers "the same
//! as last time" until a claim, a release or a pruning changed an owner.
//! Bookings and shared paces are shared *between nodes*: while fewer than
//! two take part (the daemon alone), the node's own limiter and pauses are
//! all there is, and booking or sharing costs nothing.
//!
//! Times are milliseconds on this process's monotonic clock (from the
//! coordination's creation), so a wall-clock step never lapses a lease.
//! Nothing here is persisted: a restart starts with no leases and no
//! bookings, which for one node is what PostgreSQL's rows amount to too
//! (its leases were given back at stop, a booking's slot has passed).

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};

use super::coordination::{Booked, Claimed, Coordination, HostPace, LeaseRow, NodeRow, Notice};
use super::{Fence, Result, StoreError};

/// How many wake-ups a slow listener may fall behind before it is told to
/// rescan (as after a lost `LISTEN` connection).
const WAKE_BACKLOG: usize = 1024;

/// Nodes silent this long are forgotten (as PostgreSQL's `nodes` rows).
const FORGET_MS: f64 = 3_600_000.0;

#[derive(Debug, Clone)]
struct Lease {
    /// Shared by every lease one claim took (one node's name, not a copy
    /// per lease: 100,000 leases held by one node).
    owner: Option<Arc<str>>,
    epoch: i64,
    until_ms: f64,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    started_ms: i64,
    heartbeat_ms: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Quota {
    tat_ms: f64,
    paused_until_ms: f64,
    gap_ms: f64,
    gap_until_ms: f64,
}

/// A node's last renewal: every lease it owned then is extended to
/// `until_ms`; `generation` is the table's at that renewal.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    until_ms: f64,
    generation: u64,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<String, Node>,
    /// Keyed by the cluster's own keys (shared, not copied).
    leases: BTreeMap<Arc<str>, Lease>,
    quota: HashMap<String, Quota>,
    renewals: HashMap<String, Renewal>,
    /// Raised whenever a lease changes owner or epoch, or goes: a renewal
    /// at the same generation as the node's last has nothing new to say.
    generation: u64,
}

impl Table {
    /// When `l` lapses: its own time (from its claim) or its owner's last
    /// renewal, whichever is later.
    fn until(&self, l: &Lease) -> f64 {
        let renewed = l
            .owner
            .as_deref()
            .and_then(|o| self.renewals.get(o))
            .map_or(f64::MIN, |r| r.until_ms);
        l.until_ms.max(renewed)
    }

    /// Fewer than two nodes: nobody to share a booking or a pace with.
    fn alone(&self) -> bool {
        self.nodes.len() < 2
    }

    /// Extends every lease `node` owns to `until_ms`; returns whether any
    /// changed since its last renewal.
    fn renew(&mut self, node: &str, until_ms: f64) -> bool {
        let generation = self.generation;
        let last = self.renewals.insert(
            node.to_string(),
            Renewal {
                until_ms,
                generation,
            },
        );
        last.is_none_or(|r| r.generation != generation)
    }

    fn owned_by(&self, node: &str) -> Vec<(String, i64)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.owner.as_deref() == Some(node))
            .map(|(k, l)| (k.to_string(), l.epoch))
            .collect()
    }
}

/// One process's coordination (see the module doc).
pub struct SingleNode {
    origin: Instant,
    table: Mutex<Table>,
    wake: broadcast::Sender<Notice>,
}

impl Default for SingleNode {
    fn default() -> Self {
        SingleNode {
            origin: Instant::now(),
            table: Mutex::new(Table::default()),
            wake: broadcast::Sender::new(WAKE_BACKLOG),
        }
    }
}

impl SingleNode {
    fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    fn table(&self) -> parking_lot::MutexGuard<'_, Table> {
        // A panic under this lock leaves plain values behind, each
        // consistent on its own: going on is safe.
        self.table.lock()
    }

    /// Wakes every listener of this process (none listening: nothing to
    /// wake).
    pub fn notify(&self, notice: Notice) {
        let _ = self.wake.send(notice);
    }
}

impl Coordination for SingleNode {
    async fn heartbeat(&self, node: &str, started_ms: i64, alive_ms: i64) -> Result<i64> {
        let now = self.now_ms();
        let mut t = self.table();
        t.nodes.retain(|_, n| n.heartbeat_ms >= now - FORGET_MS);
        t.nodes
            .entry(node.to_string())
            .and_modify(|n| n.heartbeat_ms = now)
            .or_insert(Node {
                started_ms,
                heartbeat_ms: now,
            });
        Ok(t.nodes
            .values()
            .filter(|n| n.heartbeat_ms > now - alive_ms as f64)
            .count() as i64)
    }

    /// Never a lapse to wait for: one process alone has no other node
    /// that could fall silent while it runs (when it dies, so does every
    /// lease), so it never needs an early claim.
    async fn next_lapse(&self, _node: &str, _silent_ms: i64) -> Result<Option<Duration>> {
        Ok(None)
    }

    async fn leave(&self, node: &str) -> Result<()> {
        self.table().nodes.remove(node);
        self.notify(Notice::Freed);
        Ok(())
    }

    async fn settled(&self, _node: &str) -> Result<()> {
        self.notify(Notice::Freed);
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let now = self.now_ms();
        let t = self.table();
        let mut rows: Vec<(f64, NodeRow)> = t
            .nodes
            .iter()
            .map(|(name, n)| {
                let leases = t
                    .leases
                    .values()
                    .filter(|l| l.owner.as_deref() == Some(name) && t.until(l) > now)
                    .count() as i64;
                (
                    n.heartbeat_ms,
                    NodeRow {
                        node: name.clone(),
                        started_ms: n.started_ms,
                        heartbeat_age_ms: (now - n.heartbeat_ms) as i64,
                        leases,
                    },
                )
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.node.cmp(&b.1.node)));
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    async fn ensure_leases(&self, keys: &[Arc<str>]) -> Result<()> {
        let mut t = self.table();
        for k in keys {
            t.leases.entry(k.clone()).or_insert(Lease {
                owner: None,
                epoch: 0,
                until_ms: 0.0,
            });
        }
        Ok(())
    }

    async fn lease_count(&self) -> Result<i64> {
        Ok(self.table().leases.len() as i64)
    }

    async fn renew(&self, node: &str, lease_ms: i64) -> Result<Vec<(String, i64)>> {
        let until = self.now_ms() + lease_ms as f64;
        let mut t = self.table();
        t.renew(node, until);
        Ok(t.owned_by(node))
    }

    /// No work per lease: the node's renewal time moves, and the list is
    /// built only when an owner changed since the node's last renewal.
    async fn renew_changed(&self, node: &str, lease_ms: i64) -> Result<Option<Vec<(String, i64)>>> {
        let until = self.now_ms() + lease_ms as f64;
        let mut t = self.table();
        Ok(t.renew(node, until).then(|| t.owned_by(node)))
    }

    async fn claim(&self, node: &str, lease_ms: i64, n: i64) -> Result<Vec<Claimed>> {
        let now = self.now_ms();
        let mut t = self.table();
        // The order PostgreSQL's claim takes: the longest lapsed first.
        let mut free: Vec<(f64, Arc<str>)> = t
            .leases
            .iter()
            .filter(|(_, l)| l.owner.is_none() || t.until(l) < now)
            .map(|(k, l)| (t.until(l), k.clone()))
            .collect();
        free.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut got = Vec::new();
        let owner: Arc<str> = Arc::from(node);
        for (_, k) in free.into_iter().take(n.max(0) as usize) {
            let l = t.leases.get_mut(&k).expect("a key just listed");
            // Given back: no owner, and the time it was (see `release`).
            let released_ago = (l.owner.is_none() && l.until_ms > 0.0)
                .then(|| Duration::from_millis((now - l.until_ms).max(0.0) as u64));
            let lapsed = l.owner.is_some();
            l.owner = Some(owner.clone());
            l.epoch += 1;
            l.until_ms = now + lease_ms as f64;
            got.push(Claimed {
                key: k.to_string(),
                epoch: l.epoch,
                released_ago,
                lapsed,
                // Kept by the store, not this table: the order the leases
                // come in stands.
                next_run_ms: None,
            });
        }
        if !got.is_empty() {
            t.generation += 1;
        }
        Ok(got)
    }

    async fn release(&self, node: &str, keys: &[String]) -> Result<()> {
        let now = self.now_ms();
        let changed = {
            let mut t = self.table();
            let mut changed = false;
            for k in keys {
                if let Some(l) = t.leases.get_mut(k.as_str()) {
                    if l.owner.as_deref() == Some(node) {
                        // Unowned, with the time it was given back (a
                        // lease nobody held yet has 0).
                        l.owner = None;
                        l.until_ms = now;
                        changed = true;
                    }
                }
            }
            if changed {
                t.generation += 1;
            }
            changed
        };
        if changed {
            self.notify(Notice::Freed);
        }
        Ok(())
    }

    /// Without the outbox test PostgreSQL makes: this coordination does
    /// not see the store's outbox, and with one node the worker of a
    /// pruned key is this process's, which delivers every lane anyway.
    async fn prune_leases(&self, node: &str, keys: &[String]) -> Result<(u64, BTreeSet<String>)> {
        let now = self.now_ms();
        let mut pruned = 0;
        let mut kept = BTreeSet::new();
        {
            let mut t = self.table();
            for k in keys {
                let Some(l) = t.leases.get(k.as_str()) else {
                    continue;
                };
                let free =
                    l.owner.is_none() || l.owner.as_deref() == Some(node) || t.until(l) < now;
                if free {
                    t.leases.remove(k.as_str());
                    pruned += 1;
                } else {
                    kept.insert(k.clone());
                }
            }
            if pruned > 0 {
                t.generation += 1;
            }
        }
        if pruned > 0 {
            self.notify(Notice::Leases);
        }
        Ok((pruned, kept))
    }

    async fn leases(&self) -> Result<Vec<LeaseRow>> {
        let now = self.now_ms();
        let t = self.table();
        Ok(t.leases
            .iter()
            .map(|(k, l)| LeaseRow {
                key: k.to_string(),
                owner: l.owner.as_deref().map(str::to_string),
                epoch: l.epoch,
                left_ms: (t.until(l) - now) as i64,
            })
            .collect())
    }

    async fn fence_holds(&self, key: &str, fence: &Fence) -> Result<bool> {
        Ok(self
            .table()
            .leases
            .get(key)
            .is_some_and(|l| l.owner.as_deref() == Some(&fence.owner) && l.epoch == fence.epoch))
    }

    /// Alone (see the module doc), the slot is now: the node's own
    /// limiter already keeps the quota, and a second count of it would
    /// only add waits.
    async fn book(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
        n: u32,
        _durable: bool,
    ) -> Result<Booked> {
        let now = self.now_ms();
        let mut t = self.table();
        if t.alone() {
            return Ok(Booked::from_ms(0.0, 0.0));
        }
        let q = t.quota.entry(key.to_string()).or_default();
        let gap = if q.gap_until_ms > now { q.gap_ms } else { 0.0 };
        let every = interval_ms.max(gap);
        let (start, next) =
            crate::gcra::reserve_run(now, q.tat_ms, q.paused_until_ms, every, burst, n);
        q.tat_ms = next;
        Ok(Booked::from_ms(start - now, every))
    }

    async fn share_pace(
        &self,
        host: &str,
        pause: Option<Duration>,
        gap: Option<(Duration, Duration)>,
    ) -> Result<()> {
        let now = self.now_ms();
        {
            let mut t = self.table();
            if t.alone() {
                // Nobody to tell: the node applied it to its own gate.
                return Ok(());
            }
            let q = t.quota.entry(format!("host:{host}")).or_default();
            let pause_ms = pause.map_or(0, |p| p.as_millis() as i64) as f64;
            q.paused_until_ms = q.paused_until_ms.max(now + pause_ms);
            if let Some((g, f)) = gap.filter(|(g, _)| g.as_millis() > 0) {
                q.gap_ms = g.as_millis() as f64;
                q.gap_until_ms = now + f.as_millis() as f64;
            }
        }
        self.notify(Notice::Pace(host.to_string()));
        Ok(())
    }

    async fn paces(&self) -> Result<Vec<HostPace>> {
        let now = self.now_ms();
        let t = self.table();
        Ok(t.quota
            .iter()
            .filter_map(|(k, q)| Some((k.strip_prefix("host:")?, q)))
            .filter(|(_, q)| q.paused_until_ms > now || q.gap_until_ms > now)
            .map(|(host, q)| HostPace {
                host: host.to_string(),
                paused_for: Duration::from_millis((q.paused_until_ms - now).max(0.0) as u64),
                gap: Some(q.gap_ms)
                    .filter(|g| q.gap_until_ms > now && *g > 0.0)
                    .map(|g| Duration::from_millis(g as u64)),
            })
            .collect())
    }

    async fn listen(&self, tx: mpsc::Sender<Notice>) -> Result<()> {
        let mut rx = self.wake.subscribe();
        loop {
            match rx.recv().await {
                Ok(n) => {
                    if tx.send(n).await.is_err() {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(StoreError::Backend {
                        op: "listen",
                        source: format!("{missed} wake-ups missed").into(),
                    })
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a claim took, as (key, epoch).
    fn pairs(got: Vec<Claimed>) -> Vec<(String, i64)> {
        got.into_iter().map(|c| (c.key, c.epoch)).collect()
    }

    /// A listener that fell more than the backlog behind is told so (an
    /// error: its caller rescans), as after a lost `LISTEN` connection.
    #[tokio::test]
    async fn a_listener_too_far_behind_fails_and_is_not_left_waiting() {
        let c = std::sync::Arc::new(SingleNode::default());
        let (tx, mut rx) = mpsc::channel(1);
        let listener = {
            let c = c.clone();
            tokio::spawn(async move { c.listen(tx).await })
        };
        while c.wake.receiver_count() == 0 {
            tokio::task::yield_now().await;
        }
        for i in 0..WAKE_BACKLOG + 10 {
            c.notify(Notice::Pace(format!("h{i}")));
        }
        let ended = loop {
            if listener.is_finished() {
                break listener.await.unwrap();
            }
            let _ = tokio::time::timeout(Duration::from_millis(10), rx.recv()).await;
        };
        assert!(ended.is_err(), "{ended:?}");
    }

    /// A round's renewal costs nothing per lease while nothing changed: the
    /// second renewal in a row answers "unchanged", and the leases still
    /// last from the latest one.
    #[tokio::test]
    async fn an_unchanged_renewal_lists_nothing_and_still_extends() {
        let c = SingleNode::default();
        let keys: Vec<String> = (0..3).map(|i| format!("s/{i}")).collect();
        c.ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        assert_eq!(c.claim("a", 100, 3).await.unwrap().len(), 3);
        assert_eq!(c.renew_changed("a", 100).await.unwrap().unwrap().len(), 3);
        assert_eq!(c.renew_changed("a", 60_000).await.unwrap(), None);
        std::thread::sleep(Duration::from_millis(200));
        assert!(c.leases().await.unwrap().iter().all(|l| l.left_ms > 50_000));
        assert!(c.claim("b", 60_000, 3).await.unwrap().is_empty());
    }

    /// One node alone books nothing and shares no pace: its own limiter
    /// and pauses hold (a second count would only add waits).
    #[tokio::test]
    async fn alone_a_node_books_and_shares_nothing() {
        let c = SingleNode::default();
        c.heartbeat("a", 1, 60_000).await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                c.book("host:h", 1000.0, 1, 1, false).await.unwrap().wait,
                Duration::ZERO
            );
        }
        c.share_pace("h", Some(Duration::from_secs(30)), None)
            .await
            .unwrap();
        assert!(c.paces().await.unwrap().is_empty());
        c.heartbeat("b", 2, 60_000).await.unwrap();
        assert_eq!(
            c.book("host:h", 1000.0, 1, 1, false).await.unwrap().wait,
            Duration::ZERO
        );
        assert!(
            c.book("host:h", 1000.0, 1, 1, false).await.unwrap().wait > Duration::from_millis(900)
        );
    }

    /// Nodes silent for an hour are forgotten at the next heartbeat.
    #[tokio::test]
    async fn silent_nodes_are_forgotten() {
        let c = SingleNode::default();
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.table().nodes.get_mut("a").unwrap().heartbeat_ms -= FORGET_MS + 1.0;
        assert_eq!(c.heartbeat("b", 1, i64::MAX / 2).await.unwrap(), 1);
        assert_eq!(c.nodes().await.unwrap().len(), 1);
    }
    /// A coordination made `ms` ago: its clock reads far from zero, so
    /// that sums and products of times cannot pass for differences.
    fn aged(ms: u64) -> SingleNode {
        SingleNode {
            origin: Instant::now() - Duration::from_millis(ms),
            ..SingleNode::default()
        }
    }

    /// Moves the coordination's clock `ms` forward (its origin back).
    fn advance(c: &mut SingleNode, ms: u64) {
        c.origin -= Duration::from_millis(ms);
    }

    #[test]
    fn the_clock_counts_milliseconds_since_the_coordination_was_made() {
        let c = aged(5_000);
        let before = c.origin.elapsed().as_secs_f64() * 1000.0;
        let now = c.now_ms();
        let after = c.origin.elapsed().as_secs_f64() * 1000.0;
        assert!((before..=after).contains(&now), "{before} {now} {after}");
    }

    #[tokio::test]
    async fn a_claimed_or_renewed_lease_runs_for_its_length_from_now() {
        let mut c = aged(100_000);
        c.ensure_leases(&["s/i".into()]).await.unwrap();
        assert_eq!(c.claim("a", 1_000, 1).await.unwrap().len(), 1);
        let left = c.leases().await.unwrap()[0].left_ms;
        assert!((900..=1_000).contains(&left), "{left}");
        advance(&mut c, 2_000);
        let left = c.leases().await.unwrap()[0].left_ms;
        assert!((-1_100..=-1_000).contains(&left), "lapsed: {left}");
        // A lapsed lease nobody claimed is still its holder's to renew.
        assert_eq!(
            c.renew("a", 60_000).await.unwrap(),
            vec![("s/i".to_string(), 1)]
        );
        let left = c.leases().await.unwrap()[0].left_ms;
        assert!((59_900..=60_000).contains(&left), "{left}");
    }

    #[tokio::test]
    async fn nodes_report_their_heartbeat_age() {
        let mut c = aged(100_000);
        c.heartbeat("a", 7, 60_000).await.unwrap();
        advance(&mut c, 10_000);
        let nodes = c.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!((nodes[0].node.as_str(), nodes[0].started_ms), ("a", 7));
        let age = nodes[0].heartbeat_age_ms;
        assert!((10_000..=10_100).contains(&age), "{age}");
        // Heard again: young again, and the only one alive.
        assert_eq!(c.heartbeat("a", 7, 60_000).await.unwrap(), 1);
        assert!(c.nodes().await.unwrap()[0].heartbeat_age_ms < 100);
    }

    #[tokio::test]
    async fn a_booking_waits_from_now_and_a_shared_pause_holds_only_its_length() {
        let c = aged(100_000);
        // Bookings and pauses are shared only once two nodes take part.
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.heartbeat("b", 2, 60_000).await.unwrap();
        assert_eq!(
            c.book("q", 1_000.0, 1, 1, false).await.unwrap().wait,
            Duration::ZERO
        );
        let w = c.book("q", 1_000.0, 1, 1, false).await.unwrap().wait;
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_secs(1),
            "{w:?}"
        );
        c.share_pace("p", Some(Duration::from_secs(30)), None)
            .await
            .unwrap();
        let paces = c.paces().await.unwrap();
        assert_eq!(paces.len(), 1, "{paces:?}");
        let paused = paces[0].paused_for;
        assert!(
            paused > Duration::from_secs(29) && paused <= Duration::from_secs(30),
            "{paused:?}"
        );
        assert_eq!(paces[0].gap, None);
    }

    #[tokio::test]
    async fn a_shared_pace_holds_for_its_time_then_goes() {
        let mut c = aged(100_000);
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.heartbeat("b", 2, 60_000).await.unwrap();
        // A zero gap is no pace: nothing to list.
        c.share_pace("z", None, Some((Duration::ZERO, Duration::from_secs(60))))
            .await
            .unwrap();
        assert_eq!(c.paces().await.unwrap(), vec![]);
        // A pace of 5 s for 1 s, on a host paused for 3 s.
        c.share_pace(
            "g",
            Some(Duration::from_secs(3)),
            Some((Duration::from_secs(5), Duration::from_secs(1))),
        )
        .await
        .unwrap();
        let paces = c.paces().await.unwrap();
        assert_eq!(paces.len(), 1, "{paces:?}");
        assert_eq!(paces[0].gap, Some(Duration::from_secs(5)));
        // The pace's second is over, the pause still runs.
        advance(&mut c, 2_000);
        let paces = c.paces().await.unwrap();
        assert_eq!(paces.len(), 1, "{paces:?}");
        assert_eq!(paces[0].gap, None, "the pace ended");
        assert!(paces[0].paused_for <= Duration::from_secs(1), "{paces:?}");
        // Both over: the host is no longer listed.
        advance(&mut c, 2_000);
        assert_eq!(c.paces().await.unwrap(), vec![]);
        // A pace alone is listed while it holds.
        c.share_pace(
            "h",
            None,
            Some((Duration::from_secs(2), Duration::from_secs(1))),
        )
        .await
        .unwrap();
        let paces = c.paces().await.unwrap();
        assert_eq!(paces.len(), 1, "{paces:?}");
        assert_eq!(
            (paces[0].paused_for, paces[0].gap),
            (Duration::ZERO, Some(Duration::from_secs(2)))
        );
        advance(&mut c, 1_500);
        assert_eq!(c.paces().await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn pruning_nothing_wakes_nobody() {
        let c = SingleNode::default();
        let mut rx = c.wake.subscribe();
        c.ensure_leases(&["s/kept".into()]).await.unwrap();
        let (pruned, kept) = c.prune_leases("a", &["s/gone".to_string()]).await.unwrap();
        assert_eq!((pruned, kept.len()), (0, 0));
        assert!(rx.try_recv().is_err(), "a wake-up for nothing pruned");
        let (pruned, _) = c.prune_leases("a", &["s/kept".to_string()]).await.unwrap();
        assert_eq!(pruned, 1);
        assert_eq!(rx.try_recv().unwrap(), Notice::Leases);
    }
    /// A node heard 100 s ago is not silent for an hour: it stays listed.
    #[tokio::test]
    async fn nodes_heard_within_the_hour_are_kept() {
        let c = aged(100_000);
        c.heartbeat("a", 1, 60_000).await.unwrap();
        // Heard when the coordination was made.
        c.table().nodes.get_mut("a").unwrap().heartbeat_ms = 0.0;
        assert_eq!(c.heartbeat("b", 2, 60_000).await.unwrap(), 1);
        let names: Vec<String> = c
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        assert_eq!(names, ["b", "a"]);
    }

    /// A coordination whose clock stands at zero while the test runs (its
    /// origin an hour ahead: `elapsed` saturates), so that a time can be
    /// exactly "now".
    fn frozen() -> SingleNode {
        SingleNode {
            origin: Instant::now() + Duration::from_secs(3_600),
            ..SingleNode::default()
        }
    }

    #[tokio::test]
    async fn a_frozen_clock_stands_at_zero() {
        let c = frozen();
        assert_eq!(c.now_ms(), 0.0);
    }

    /// A lease whose time ends at this very instant has not lapsed: no
    /// other node claims or prunes it (and it is no longer counted as its
    /// holder's).
    #[tokio::test]
    async fn a_lease_ending_at_this_instant_has_not_lapsed() {
        let c = frozen();
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.ensure_leases(&["s/i".into()]).await.unwrap();
        assert_eq!(
            pairs(c.claim("a", 0, 1).await.unwrap()),
            vec![("s/i".to_string(), 1)]
        );
        assert_eq!(c.nodes().await.unwrap()[0].leases, 0);
        assert!(c.claim("b", 60_000, 1).await.unwrap().is_empty());
        let (pruned, kept) = c.prune_leases("b", &["s/i".to_string()]).await.unwrap();
        assert_eq!((pruned, kept), (0, ["s/i".to_string()].into()));
        // A lease that runs on is counted as its holder's.
        c.ensure_leases(&["s/j".into()]).await.unwrap();
        assert_eq!(c.claim("a", 1, 1).await.unwrap().len(), 1);
        assert_eq!(c.nodes().await.unwrap()[0].leases, 1);
    }

    /// A heartbeat keeps its node alive for `alive_ms` after it, not at
    /// its end.
    #[tokio::test]
    async fn a_heartbeat_counts_for_alive_ms_after_it() {
        let c = frozen();
        assert_eq!(c.heartbeat("a", 1, 0).await.unwrap(), 0);
        assert_eq!(c.heartbeat("a", 1, 1).await.unwrap(), 1);
    }

    /// A pace that ends at this instant no longer widens a booking; one
    /// that runs on does.
    #[tokio::test]
    async fn a_pace_widens_bookings_only_while_it_runs() {
        let c = frozen();
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.heartbeat("b", 2, 60_000).await.unwrap();
        let gap = Duration::from_secs(5);
        c.share_pace("ended", None, Some((gap, Duration::ZERO)))
            .await
            .unwrap();
        c.share_pace("runs", None, Some((gap, Duration::from_secs(60))))
            .await
            .unwrap();
        for (host, wait) in [("ended", 100), ("runs", 5_000)] {
            let key = format!("host:{host}");
            assert_eq!(
                c.book(&key, 100.0, 1, 1, false).await.unwrap().wait,
                Duration::ZERO
            );
            assert_eq!(
                c.book(&key, 100.0, 1, 1, false).await.unwrap().wait,
                Duration::from_millis(wait),
                "{host}"
            );
        }
    }

    /// A pause or pace that ends at this instant is no longer listed.
    #[tokio::test]
    async fn a_pace_ending_at_this_instant_is_not_listed() {
        let c = frozen();
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.heartbeat("b", 2, 60_000).await.unwrap();
        c.share_pace("p", Some(Duration::ZERO), None).await.unwrap();
        assert_eq!(c.paces().await.unwrap(), vec![]);
        // Paused on, with a pace that ended: the pause alone.
        c.share_pace(
            "q",
            Some(Duration::from_secs(30)),
            Some((Duration::from_secs(5), Duration::ZERO)),
        )
        .await
        .unwrap();
        let paces = c.paces().await.unwrap();
        assert_eq!(
            paces,
            vec![HostPace {
                host: "q".into(),
                paused_for: Duration::from_secs(30),
                gap: None
            }]
        );
    }

    /// A node's renewal says "changed" whenever its leases differ from
    /// what its last renewal returned, however many claims and releases
    /// came between.
    #[tokio::test]
    async fn a_renewal_after_a_claim_and_a_release_lists_the_new_leases() {
        let c = aged(100_000);
        let keys: Vec<String> = ["s/x", "s/y"].iter().map(|k| k.to_string()).collect();
        c.ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        assert_eq!(
            pairs(c.claim("a", 60_000, 1).await.unwrap()),
            vec![("s/x".to_string(), 1)]
        );
        assert_eq!(
            c.renew_changed("a", 60_000).await.unwrap(),
            Some(vec![("s/x".to_string(), 1)])
        );
        assert_eq!(
            pairs(c.claim("a", 60_000, 1).await.unwrap()),
            vec![("s/y".to_string(), 1)]
        );
        c.release("a", &keys[..1]).await.unwrap();
        assert_eq!(
            c.renew_changed("a", 60_000).await.unwrap(),
            Some(vec![("s/y".to_string(), 1)])
        );
        // Pruning nothing changes nothing; pruning a lease it held does.
        c.prune_leases("a", &["s/none".to_string()]).await.unwrap();
        assert_eq!(c.renew_changed("a", 60_000).await.unwrap(), None);
        assert_eq!(c.prune_leases("a", &keys[1..]).await.unwrap().0, 1);
        assert_eq!(c.renew_changed("a", 60_000).await.unwrap(), Some(vec![]));
    }
}
