//! The conformance suite of the coordination seam: what every
//! [`Coordination`] must do, written once, and run by `suite!` against
//! PostgreSQL and [`SingleNode`].
//!
//! Each check takes two handles on one coordination, as two nodes would:
//! on PostgreSQL two stores (two pools) on one schema; for the single
//! node two clones of the one process's coordination. The nodes are told
//! apart by their names, so exclusivity and fencing mean the same on both:
//! the single node's lease table has owners and epochs like PostgreSQL's
//! (with one node, it is the only owner there is: leases are always held).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// A fresh, empty coordination and handles on it.
pub trait CoordFixture: Sized {
    /// Whether it can run here (PostgreSQL needs its server).
    fn available(_check: &str) -> impl Future<Output = bool> {
        async { true }
    }
    fn open() -> impl Future<Output = Self>;
    /// One more handle on the same coordination (another node's).
    fn handle(&self) -> impl Future<Output = Coordinator>;
}

pub struct SingleNodeFixture(Arc<SingleNode>);

impl CoordFixture for SingleNodeFixture {
    async fn open() -> Self {
        SingleNodeFixture(Arc::new(SingleNode::default()))
    }
    async fn handle(&self) -> Coordinator {
        Coordinator::SingleNode(self.0.clone())
    }
}

/// A fresh schema of its own, dropped when the fixture goes (after every
/// handle: they are the check's locals, dropped first).
pub struct PgCoordFixture {
    schema: String,
}

impl CoordFixture for PgCoordFixture {
    async fn available(check: &str) -> bool {
        super::postgres::testing::available(check).await
    }
    async fn open() -> Self {
        PgCoordFixture {
            schema: super::postgres::testing::fresh_schema(),
        }
    }
    async fn handle(&self) -> Coordinator {
        let url = super::postgres::testing::url();
        Store::open_postgres(&url, &self.schema)
            .await
            .unwrap()
            .coordination()
    }
}

impl Drop for PgCoordFixture {
    fn drop(&mut self) {
        super::postgres::testing::drop_schema(&self.schema);
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("s/i{i}")).collect()
}

/// Two nodes claiming at once take different leases, together every free
/// one, and a third finds none left.
async fn leases_are_exclusive<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    a.ensure_leases(&crate::store::coordination::shared(&keys(6)))
        .await
        .unwrap();
    // Twice: a row that exists already is left alone.
    b.ensure_leases(&crate::store::coordination::shared(&keys(6)))
        .await
        .unwrap();
    assert_eq!(a.lease_count().await.unwrap(), 6);
    let (ga, gb) = tokio::join!(a.claim("a", 60_000, 4), b.claim("b", 60_000, 4));
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    assert_eq!(ga.len() + gb.len(), 6, "{ga:?} {gb:?}");
    let ka: BTreeSet<_> = ga.iter().map(|x| x.key.clone()).collect();
    let kb: BTreeSet<_> = gb.iter().map(|x| x.key.clone()).collect();
    assert!(ka.is_disjoint(&kb), "{ka:?} {kb:?}");
    assert!(a.claim("c", 60_000, 6).await.unwrap().is_empty());
    // The table says the same, and renewal returns each node its own.
    for l in b.leases().await.unwrap() {
        let owner = l.owner.clone().expect("every lease owned");
        let mine = if owner == "a" { &ka } else { &kb };
        assert!(mine.contains(&l.key), "{} held by {owner}", l.key);
        assert!(l.left_ms > 50_000, "{l:?}");
    }
    let renewed: BTreeSet<_> = b
        .renew("a", 60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(renewed, ka);
    // Given back, a lease is free for the next claim at once.
    let give: Vec<String> = ka.iter().take(1).cloned().collect();
    a.release("a", &give).await.unwrap();
    // Only by its holder: another node naming them frees nothing.
    let all_of_a: Vec<String> = ka.iter().cloned().collect();
    b.release("b", &all_of_a).await.unwrap();
    assert!(a.claim("c", 60_000, 6).await.unwrap().len() == 1);
    a.release("c", &give).await.unwrap();
    let got = b.claim("b", 60_000, 6).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, give[0]);
}

/// A lease its holder stopped renewing is claimed by another node once it
/// lapsed, never before; the old holder's renewal no longer returns it.
async fn a_lapsed_lease_is_taken_over<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    a.ensure_leases(&crate::store::coordination::shared(&keys(1)))
        .await
        .unwrap();
    let got = a.claim("a", 300, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    let e1 = got[0].epoch;
    assert!(b.claim("b", 60_000, 1).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got = b.claim("b", 60_000, 1).await.unwrap();
    assert_eq!(got.len(), 1, "lapsed, yet not taken over");
    assert_eq!(got[0].released_ago, None, "lapsed, not given back");
    assert!(got[0].lapsed, "taken from a silent holder");
    assert!(
        got[0].epoch > e1,
        "the epoch rises at a claim: {e1} then {}",
        got[0].epoch
    );
    assert!(a.renew("a", 60_000).await.unwrap().is_empty());
    let l = &a.leases().await.unwrap()[0];
    assert_eq!(l.owner.as_deref(), Some("b"));
    assert_eq!(l.epoch, got[0].epoch);
}

/// A fencing token is good only for the holder at its epoch: after a
/// takeover, the old holder's token is refused, and so is its own older
/// token once it holds the lease again.
async fn a_stale_fencing_token_is_refused<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    let key = "s/fenced";
    a.ensure_leases(&[key.into()]).await.unwrap();
    let e1 = a.claim("a", 200, 1).await.unwrap()[0].epoch;
    let fence = |owner: &str, epoch| Fence {
        owner: owner.into(),
        epoch,
    };
    assert!(b.fence_holds(key, &fence("a", e1)).await.unwrap());
    assert!(!b.fence_holds(key, &fence("b", e1)).await.unwrap());
    assert!(!b.fence_holds("s/unknown", &fence("a", e1)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e2 = b.claim("b", 60_000, 1).await.unwrap()[0].epoch;
    assert!(!a.fence_holds(key, &fence("a", e1)).await.unwrap());
    assert!(!a.fence_holds(key, &fence("b", e1)).await.unwrap());
    assert!(a.fence_holds(key, &fence("b", e2)).await.unwrap());
    b.release("b", &[key.to_string()]).await.unwrap();
    let e3 = a.claim("a", 60_000, 1).await.unwrap()[0].epoch;
    assert!(e3 > e2);
    assert!(!b.fence_holds(key, &fence("a", e1)).await.unwrap());
    assert!(b.fence_holds(key, &fence("a", e3)).await.unwrap());
}

/// Bookings of one quota from two handles at once keep its rate and
/// burst together: no window holds more slots than the quota allows.
/// (The waits are only computed, never slept: one slot a second costs the
/// check no time, and leaves a wide margin for measuring.)
async fn bookings_never_exceed_the_quota<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    // Two nodes take part (bookings are shared between nodes: see
    // `SingleNode`, where one node alone books nothing).
    a.heartbeat("a", 1, 60_000).await.unwrap();
    b.heartbeat("b", 2, 60_000).await.unwrap();
    const N: usize = 12;
    const BURST: u32 = 2;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            let before = t0.elapsed();
            let w = c
                .book("host:q", 1000.0, BURST, 1, false)
                .await
                .unwrap()
                .wait;
            (before + w, t0.elapsed() + w)
        });
    }
    let mut slots: Vec<(Duration, Duration)> = Vec::new();
    while let Some(s) = tasks.join_next().await {
        slots.push(s.unwrap());
    }
    slots.sort();
    // The j-th slot after the i-th is at least (j - i - burst + 1)
    // intervals later; each slot is known between the booking's start and
    // its answer, and 200 ms more is kept for the clocks' steps.
    for i in 0..N {
        for j in i + 1..N {
            let gap = (j - i + 1).saturating_sub(BURST as usize) as f64;
            let apart = slots[j].1.as_secs_f64() - slots[i].0.as_secs_f64();
            assert!(
                apart >= gap - 0.2,
                "slots {i} and {j} {apart:.3}s apart (quota: {gap}s): {slots:?}"
            );
        }
    }
    assert!(slots[N - 1].0 >= Duration::from_secs((N - BURST as usize) as u64 - 1));
    // A host's shared pause holds the next booking on every handle.
    a.share_pace("p", Some(Duration::from_secs(30)), None)
        .await
        .unwrap();
    let w = b.book("host:p", 10.0, 1, 1, false).await.unwrap().wait;
    assert!(w >= Duration::from_secs(29), "{w:?}");
    let paces = b.paces().await.unwrap();
    assert_eq!(paces.len(), 1, "{paces:?}");
    assert_eq!(paces[0].host, "p");
    assert!(paces[0].paused_for >= Duration::from_secs(29));
    assert_eq!(paces[0].gap, None);
    // A pace widens the interval while it holds.
    a.share_pace(
        "g",
        None,
        Some((Duration::from_secs(5), Duration::from_secs(60))),
    )
    .await
    .unwrap();
    assert_eq!(
        b.book("host:g", 10.0, 1, 1, false).await.unwrap().wait,
        Duration::ZERO
    );
    let w = b.book("host:g", 10.0, 1, 1, false).await.unwrap().wait;
    assert!(w >= Duration::from_secs(4), "{w:?}");
    // A run of slots takes its whole length off the quota, spaced by the
    // interval (or the shared pace, when wider); the other node's next
    // slot comes after it.
    let run = a.book("host:r", 1000.0, 1, 3, false).await.unwrap();
    assert!(run.wait < Duration::from_millis(200), "{run:?}");
    assert_eq!(run.every, Duration::from_secs(1));
    let w = b.book("host:r", 1000.0, 1, 1, false).await.unwrap().wait;
    assert!(
        w > Duration::from_millis(2_700) && w <= Duration::from_secs(3),
        "{w:?}"
    );
    let paced = b.book("host:g", 10.0, 1, 2, false).await.unwrap();
    assert_eq!(paced.every, Duration::from_secs(5));
    assert!(paced.wait >= Duration::from_secs(9), "{paced:?}");
}

/// `listener` listening, once a wake-up `sender` sent after it started
/// arrived (a pace of host `h`): the task and what it receives.
async fn listening(
    listener: &Coordinator,
    sender: &Coordinator,
) -> (
    tokio::task::JoinHandle<Result<()>>,
    tokio::sync::mpsc::Receiver<Notice>,
) {
    let (tx, mut notices) = tokio::sync::mpsc::channel(16);
    let task = {
        let l = listener.clone();
        tokio::spawn(async move { l.listen(tx).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no wake-up arrived");
        sender.share_pace("h", None, None).await.unwrap();
        if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(200), notices.recv()).await
        {
            assert_eq!(n, Notice::Pace("h".into()));
            return (task, notices);
        }
    }
}

/// A wake-up sent through one handle reaches the other's listener; a
/// listener whose receiver is gone ends.
async fn a_wake_up_is_delivered<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    // Two nodes take part (a pace is shared with the other nodes).
    a.heartbeat("a", 1, 60_000).await.unwrap();
    b.heartbeat("b", 2, 60_000).await.unwrap();
    let (listener, mut notices) = listening(&a, &b).await;
    // Pruning the lease of a removed key tells every node.
    b.ensure_leases(&crate::store::coordination::shared(&keys(2)))
        .await
        .unwrap();
    let (pruned, kept) = b.prune_leases("b", &keys(1)).await.unwrap();
    assert_eq!((pruned, kept.len()), (1, 0));
    let n = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), notices.recv())
            .await
            .expect("the pruning's wake-up")
            .unwrap();
        if n != Notice::Pace("h".into()) {
            break n;
        }
    };
    assert_eq!(n, Notice::Leases);
    assert_eq!(a.lease_count().await.unwrap(), 1);
    drop(notices);
    // The next wake-up finds the receiver gone: the listener ends well.
    b.share_pace("h", None, None).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), listener)
        .await
        .expect("the listener ends once nobody receives");
    assert!(ended.unwrap().is_ok());
}

/// Heartbeats count the live nodes; a node that leaves is gone at once;
/// each node is listed with the leases it holds.
async fn membership_follows_heartbeats<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    assert_eq!(a.heartbeat("a", 1, 60_000).await.unwrap(), 1);
    // (Apart by more than the clock's millisecond.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.heartbeat("b", 2, 60_000).await.unwrap(), 2);
    b.ensure_leases(&crate::store::coordination::shared(&keys(3)))
        .await
        .unwrap();
    b.claim("b", 60_000, 2).await.unwrap();
    let nodes = a.nodes().await.unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    // Newest heartbeat first.
    assert_eq!(nodes[0].node, "b");
    assert_eq!((nodes[0].started_ms, nodes[0].leases), (2, 2));
    assert_eq!((nodes[1].started_ms, nodes[1].leases), (1, 0));
    assert!(nodes
        .iter()
        .all(|n| (0..30_000).contains(&n.heartbeat_age_ms)));
    a.leave("a").await.unwrap();
    assert_eq!(b.heartbeat("b", 2, 60_000).await.unwrap(), 1);
    // A node whose heartbeat is older than `alive_ms` is not counted.
    assert_eq!(a.heartbeat("a", 1, 60_000).await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.heartbeat("b", 2, 200).await.unwrap(), 1);
}

/// Pruning deletes the leases of removed keys that nobody else holds
/// (free, its own, or lapsed) and keeps one another node holds.
async fn pruning_keeps_leases_held_by_another_node<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    let k = keys(5);
    a.ensure_leases(&crate::store::coordination::shared(&k))
        .await
        .unwrap();
    // Two live leases of b's, one of a's, one of c's that lapses, one free.
    let held_by_b: BTreeSet<String> = b
        .claim("b", 60_000, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.key)
        .collect();
    assert_eq!(a.claim("a", 60_000, 1).await.unwrap().len(), 1);
    assert_eq!(b.claim("c", 200, 1).await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (pruned, kept) = a.prune_leases("a", &k).await.unwrap();
    assert_eq!(pruned, 3);
    assert_eq!(kept, held_by_b);
    let left: BTreeSet<String> = b
        .leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(left, held_by_b);
}

/// A renewal that may answer "unchanged" (`renew_changed`) lists the
/// node's leases at its first renewal and after a release of its own;
/// otherwise (another node's claim, or its own, whose answer it has) it
/// answers with the same list or `None`. A claim of its own taken over
/// before the next round is the PostgreSQL store's test
/// (`a_claim_taken_over_before_the_next_round_is_seen_lost`): it needs
/// a node to fall silent.
async fn a_renewal_says_what_changed<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    a.ensure_leases(&crate::store::coordination::shared(&keys(3)))
        .await
        .unwrap();
    let set = |l: Vec<(String, i64)>| l.into_iter().map(|x| x.0).collect::<BTreeSet<_>>();
    let claimed = |l: Vec<Claimed>| l.into_iter().map(|x| x.key).collect::<BTreeSet<_>>();
    let mut mine = claimed(a.claim("a", 60_000, 2).await.unwrap());
    let listed = a.renew_changed("a", 60_000).await.unwrap();
    assert_eq!(
        listed.map(set),
        Some(mine.clone()),
        "the first renewal lists"
    );
    let again = a.renew_changed("a", 60_000).await.unwrap();
    assert!(again.is_none_or(|l| set(l) == mine));
    mine.extend(claimed(a.claim("a", 60_000, 1).await.unwrap()));
    assert_eq!(mine.len(), 3);
    let listed = a.renew_changed("a", 60_000).await.unwrap();
    assert!(listed.is_none_or(|l| set(l) == mine), "after a claim");
    let give = mine.pop_first().unwrap();
    a.release("a", std::slice::from_ref(&give)).await.unwrap();
    let listed = a.renew_changed("a", 60_000).await.unwrap();
    assert_eq!(listed.map(set), Some(mine.clone()), "after a release");
    // Another node's claim leaves this node's leases as they were.
    assert_eq!(b.claim("b", 60_000, 1).await.unwrap().len(), 1);
    let again = a.renew_changed("a", 60_000).await.unwrap();
    assert!(again.is_none_or(|l| set(l) == mine));
    assert_eq!(set(a.renew("a", 60_000).await.unwrap()), mine);
}

/// The first lapse among a silent node's leases is known to the others
/// (so they claim then, not at their next round): only another node's,
/// only a silent one's, only a lapse still to come. The single node has
/// none: no other process takes part, so none can fall silent.
async fn a_silent_nodes_next_lapse_is_known<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    a.ensure_leases(&crate::store::coordination::shared(&keys(3)))
        .await
        .unwrap();
    // Each node's heartbeat says its lease (which may keep its leases).
    a.heartbeat("a", 1, 8_000).await.unwrap();
    b.heartbeat("b", 2, 4_000).await.unwrap();
    let of_a = a.claim("a", 8_000, 2).await.unwrap();
    assert_eq!(of_a.len(), 2);
    // The other node's own lease lapses sooner: it is not waited for.
    assert_eq!(b.claim("b", 4_000, 1).await.unwrap().len(), 1);
    // Both heard from within a minute: nobody is silent.
    assert_eq!(b.next_lapse("b", 60_000).await.unwrap(), None);
    if !b.is_shared() {
        assert_eq!(b.next_lapse("b", 0).await.unwrap(), None);
        return;
    }
    // "a" says nothing more: after 100 ms it is silent to "b".
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        if let Some(left) = b.next_lapse("b", 100).await.unwrap() {
            break left;
        }
        assert!(
            Instant::now() < deadline,
            "a silent node's lapse never known"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        left > Duration::from_secs(5) && left <= Duration::from_secs(8),
        "a's leases lapse within 8 s (b's own within 4 s): {left:?}"
    );
    // A heartbeat again: not silent any more.
    a.heartbeat("a", 1, 8_000).await.unwrap();
    assert_eq!(b.next_lapse("b", 60_000).await.unwrap(), None);
    // Given back (no lapse to come), a silent node's leases are not waited for.
    let give: Vec<String> = of_a.into_iter().map(|x| x.key).collect();
    a.release("a", &give).await.unwrap();
    assert_eq!(b.next_lapse("b", 0).await.unwrap(), None);
}

/// A node's heartbeat keeps every lease it holds: past the time of its
/// claim, a lease whose holder keeps beating is not claimed by another
/// node, and the holder's renewals have nothing new to list; once the
/// holder has been silent for its lease, another node takes them all, and
/// the holder's next renewal says so. (The single node has no other
/// process to take them: nothing to check.)
async fn a_heartbeat_keeps_every_lease_of_its_node<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    if !b.is_shared() {
        return;
    }
    const LEASE: i64 = 2_000;
    a.ensure_leases(&crate::store::coordination::shared(&keys(3)))
        .await
        .unwrap();
    a.heartbeat("a", 1, LEASE).await.unwrap();
    b.heartbeat("b", 2, 60_000).await.unwrap();
    assert_eq!(a.claim("a", LEASE, 3).await.unwrap().len(), 3);
    assert_eq!(
        a.renew_changed("a", LEASE).await.unwrap().map(|l| l.len()),
        Some(3),
        "the first renewal lists"
    );
    // Beating every 200 ms for one and a half leases.
    let until = Instant::now() + Duration::from_millis(3 * LEASE as u64 / 2);
    while Instant::now() < until {
        a.heartbeat("a", 1, LEASE).await.unwrap();
        let taken = b.claim("b", 60_000, 3).await.unwrap();
        assert!(taken.is_empty(), "taken from a node that beats: {taken:?}");
        let again = a.renew_changed("a", LEASE).await.unwrap();
        assert!(again.is_none(), "nothing changed, yet listed: {again:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.heartbeat("a", 1, LEASE).await.unwrap();
    for l in b.leases().await.unwrap() {
        assert_eq!(l.owner.as_deref(), Some("a"));
        assert!(
            l.left_ms > 0,
            "held by the heartbeat, yet shown lapsed: {l:?}"
        );
    }
    let nodes = b.nodes().await.unwrap();
    assert_eq!(
        nodes.iter().find(|n| n.node == "a").map(|n| n.leases),
        Some(3)
    );
    // Silent for its lease: another node takes them all.
    tokio::time::sleep(Duration::from_millis(LEASE as u64 + 500)).await;
    assert_eq!(b.claim("b", 60_000, 3).await.unwrap().len(), 3);
    a.heartbeat("a", 1, LEASE).await.unwrap();
    assert_eq!(
        a.renew_changed("a", LEASE).await.unwrap().map(|l| l.len()),
        Some(0),
        "the silent node is told it lost them"
    );
}

/// The next wake-up other than a pace (sent to check that listening is in
/// place), within 10 s.
async fn next_notice(notices: &mut tokio::sync::mpsc::Receiver<Notice>, what: &str) -> Notice {
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), notices.recv())
            .await
            .unwrap_or_else(|_| panic!("no wake-up for {what}"))
            .expect("the listener is running");
        if !matches!(n, Notice::Pace(_)) {
            return n;
        }
    }
}

/// A lease given back is claimed with how long ago it was given back (the
/// new holder polls a run that came due meanwhile at once), and every
/// node hears of it, and of a node leaving, so that it claims at once; a
/// lease nobody held yet, or one that lapsed, says nothing.
async fn a_lease_given_back_is_announced_and_dated<F: CoordFixture>() {
    let f = F::open().await;
    let (a, b) = (f.handle().await, f.handle().await);
    a.heartbeat("a", 1, 60_000).await.unwrap();
    b.heartbeat("b", 2, 60_000).await.unwrap();
    a.ensure_leases(&crate::store::coordination::shared(&keys(3)))
        .await
        .unwrap();
    let got = a.claim("a", 60_000, 3).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|c| c.released_ago.is_none() && !c.lapsed),
        "nobody held them: {got:?}"
    );
    let (listener, mut notices) = listening(&b, &a).await;
    let give = vec![got[0].key.clone()];
    let before = Instant::now();
    a.release("a", &give).await.unwrap();
    assert_eq!(next_notice(&mut notices, "a release").await, Notice::Freed);
    let again = b.claim("b", 60_000, 3).await.unwrap();
    let since = before.elapsed();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].key, give[0]);
    let ago = again[0].released_ago.expect("given back: says when");
    assert!(!again[0].lapsed, "given back, not lapsed");
    // (The coordination's clock counts whole milliseconds.)
    assert!(
        ago <= since + Duration::from_millis(2),
        "{ago:?} > {since:?}"
    );
    // Given back again, and claimed a while later: the age grows.
    b.release("b", &give).await.unwrap();
    assert_eq!(next_notice(&mut notices, "a release").await, Notice::Freed);
    let wait = Duration::from_millis(300);
    tokio::time::sleep(wait).await;
    let third = a.claim("a", 60_000, 3).await.unwrap();
    assert_eq!(third.len(), 1, "{third:?}");
    let ago = third[0].released_ago.expect("given back: says when");
    assert!(ago >= wait - Duration::from_millis(2), "{ago:?}");
    // A release of nothing this node holds is no news.
    b.release("b", &give).await.unwrap();
    // Leaving is announced: the others' shares grew.
    a.leave("a").await.unwrap();
    assert_eq!(
        next_notice(&mut notices, "a node leaving").await,
        Notice::Freed
    );
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            next_notice(&mut notices, "nothing")
        )
        .await
        .is_err(),
        "one wake-up per event"
    );
    listener.abort();
}

/// Runs every check against one coordination's fixture.
macro_rules! suite {
    ($name:ident, $fixture:ty) => {
        mod $name {
            suite!(@checks $fixture;
                leases_are_exclusive,
                a_lapsed_lease_is_taken_over,
                a_stale_fencing_token_is_refused,
                bookings_never_exceed_the_quota,
                a_wake_up_is_delivered,
                membership_follows_heartbeats,
                pruning_keeps_leases_held_by_another_node,
                a_renewal_says_what_changed,
                a_silent_nodes_next_lapse_is_known,
                a_heartbeat_keeps_every_lease_of_its_node,
                a_lease_given_back_is_announced_and_dated
            );
        }
    };
    (@checks $fixture:ty; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                use super::CoordFixture as _;
                if !<$fixture>::available(stringify!($check)).await {
                    return;
                }
                super::$check::<$fixture>().await;
            }
        )*
    };
}

suite!(single_node, super::SingleNodeFixture);
suite!(postgres, super::PgCoordFixture);
