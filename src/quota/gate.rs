//! The gate of each host: a FIFO turn, governor's limiter, a cap on
//! requests in flight, and the pauses and spacing learned from the host's
//! answers; each request booked through the coordination and pauses
//! shared with the other nodes (see the module doc of `quota`). Alone
//! (the single node's coordination), booking and sharing cost nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use governor::DefaultDirectRateLimiter;
use reqwest::header::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{advice, limiter, HostQuota, HostReport, HostStats, PauseListener, Rate, MAX_PAUSE};
use crate::store::{Coordination, Coordinator};

/// Pause after a `429` that says nothing about when to come back: doubles per
/// consecutive `429` up to [`MAX_BLIND_PAUSE`], reset by any other answer.
const FIRST_BLIND_PAUSE: Duration = Duration::from_secs(1);
const MAX_BLIND_PAUSE: Duration = Duration::from_secs(60);

/// How long a pace shared through the cluster holds unless renewed by
/// another throttling answer.
const SHARED_PACE_FOR: Duration = Duration::from_secs(60);

/// A host this busy (requests sent by this node in the last second) has
/// its bookings gathered: the request that finds no slot booked ahead
/// waits [`GATHER`] for others to queue behind it, then books one run of
/// slots for all of them (see [`HostGate::book`]).
const GATHER_FROM: usize = 100;
/// How long a request that books for others waits for them to queue: at
/// most this much added to a poll of a busy host, in exchange for one
/// statement for several polls instead of one each.
const GATHER: Duration = Duration::from_millis(20);
/// The most slots one run books.
const MAX_RUN: u32 = 64;
/// Runs are booked for hosts of at least 100 requests a second (an
/// interval of at most 10 ms): below that, one statement per request is
/// little and a host cannot be busy.
const RUN_BELOW_MS: f64 = 10.0;
/// How late a slot of a run may still be taken, at most and at least.
/// The hand-off from one queued request to the next (a timer of 1 ms
/// ticks, a task to wake on a shared core) takes longer than slots 0.5 ms
/// apart: dropping every slot passed by 1 ms wasted a fifth of a
/// 2,000/s quota in a 3-node run, and the nodes fell behind.
const MAX_SLACK_MS: f64 = 10.0;
const MIN_SLACK_MS: f64 = 1.0;

/// How a host's bookings go, from its interval (ms) and burst: `None`,
/// one slot a request (a host under 100/s); or runs, each slot taken up
/// to `slack` late, booked with a burst `slack` smaller. A send late by
/// at most `slack` is one that a burst `slack / interval` larger would
/// have let go on time; taking that much off the booked burst keeps the
/// configured one whole. The slack is half the burst's tolerance, 1 to
/// 10 ms.
fn run_policy(interval_ms: f64, burst: u32) -> Option<(Duration, u32)> {
    if !runs_for(interval_ms) {
        return None;
    }
    let tolerance = interval_ms * f64::from(burst.max(1) - 1);
    let slack_ms = (tolerance / 2.0).clamp(MIN_SLACK_MS, MAX_SLACK_MS);
    let kept = (slack_ms / interval_ms).ceil() as u32;
    let booked = burst.saturating_sub(kept).max(1);
    Some((Duration::from_secs_f64(slack_ms / 1000.0), booked))
}

/// Whether a host of this interval (ms) books runs: 100/s and more.
fn runs_for(interval_ms: f64) -> bool {
    interval_ms > 0.0 && interval_ms <= RUN_BELOW_MS
}

/// What to do about a request's slot of the cluster's quota (see
/// [`take_slot`]).
#[derive(Debug, PartialEq)]
enum Slot {
    /// A slot booked ahead: go at this time.
    At(Instant),
    /// None left: book (a run, gathering the queued requests first, if
    /// `gather`; else one slot).
    Book { gather: bool },
}

/// Slots booked ahead in one run, not yet taken.
#[derive(Debug, Default)]
struct Run {
    /// The next slot, and how many are left from it.
    next: Option<Instant>,
    left: u32,
    every: Duration,
    /// How late a slot may still be taken (see [`run_policy`]).
    slack: Duration,
    /// The interval the run was booked for (a change of pace voids it).
    interval_ms: f64,
}

/// Takes the next usable slot of `run` at `now` for a request whose
/// interval is `interval_ms` (pure: the policy of [`HostGate::book`]).
/// Slots passed by more than the run's slack are dropped (their time went
/// unused; using one later would crowd the next); a run booked for
/// another interval is dropped whole. With none left, a host that may
/// book runs and sent `recent` requests in the last second gathers before
/// booking when that is at least [`GATHER_FROM`].
fn take_slot(run: &mut Run, now: Instant, interval_ms: f64, recent: usize) -> Slot {
    if run.interval_ms != interval_ms {
        run.left = 0;
    }
    while run.left > 0 {
        let Some(at) = run.next else { break };
        run.left -= 1;
        run.next = Some(at + run.every);
        if at + run.slack >= now {
            return Slot::At(at);
        }
    }
    run.next = None;
    run.left = 0;
    Slot::Book {
        gather: recent >= GATHER_FROM && runs_for(interval_ms),
    }
}

/// The gate of one host.
pub struct HostGate {
    /// `host` or `host:port`, for status and metrics.
    pub name: String,
    limiter: Option<DefaultDirectRateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
    /// Requests pass one at a time, in arrival order (see the module doc).
    turn: tokio::sync::Mutex<()>,
    /// Throttling learned from the host's answers.
    throttle: Mutex<Throttle>,
    /// Slots of the cluster's quota booked ahead for requests queued
    /// behind the one that booked them.
    run: Mutex<Run>,
    /// Requests waiting for their turn: how many slots a run books.
    queued: std::sync::atomic::AtomicU32,
    /// The last booking's answer said that the coordination books
    /// nothing (one node alone): no point gathering for it.
    alone: std::sync::atomic::AtomicBool,
    /// Bookings made (round trips to the coordination), for the tests.
    #[cfg(test)]
    bookings: std::sync::atomic::AtomicU32,
    /// Counters for status and metrics; shared with every gate this host
    /// had (see [`HostGates`]).
    pub stats: Arc<HostStats>,
    /// The configured rate and burst, booked in the cluster's store so
    /// that the nodes together keep them (see [`crate::gcra`]).
    shared_rate: Option<(Rate, u32)>,
    /// The coordination of the nodes this one is part of (itself alone on
    /// sled): quota bookings and shared pauses.
    cluster: Coordinator,
    /// Where a long pause is announced (`pollhook.quota.throttled`).
    ops: Option<Arc<dyn PauseListener>>,
}

#[derive(Default)]
struct Throttle {
    /// No request before this.
    paused_until: Option<Instant>,
    /// At least this long between requests (from `RateLimit-*`), and when
    /// the last one left.
    spacing: Option<Duration>,
    last_sent: Option<Instant>,
    /// Consecutive `429`s without a `Retry-After`.
    blind_429s: u32,
    /// A pace learned from refusals when the host publishes no limit
    /// (requests/s, and when it was learned): after a `429` the pace drops
    /// to 90% of the last second's, then grows again by 2% (at least one
    /// request/s) per second, so pollhook settles just under an unknown
    /// quota instead of hitting it every second (AIMD, as TCP does).
    learned: Option<(f64, Instant)>,
    /// Send times within the last second, to know the pace at a refusal.
    recent: std::collections::VecDeque<Instant>,
    /// A pace another node of the cluster learned, and until when it holds.
    shared_gap: Option<(Duration, Instant)>,
}

impl Throttle {
    /// The learned pace now (requests/s), `None` once it is no constraint.
    fn learned_rate(&self) -> Option<f64> {
        let (rate, at) = self.learned?;
        let grown = rate + at.elapsed().as_secs_f64() * (rate * 0.02).max(1.0);
        (grown < 100_000.0).then_some(grown)
    }

    /// Requests sent within the last second (`recent` is trimmed only
    /// as requests go, so after a quiet spell it holds older ones).
    fn sent_last_second(&self) -> usize {
        let stale = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .map_or(0, |s| self.recent.partition_point(|at| *at < s));
        self.recent.len() - stale
    }

    fn learned_gap(&self) -> Option<Duration> {
        self.learned_rate()
            .map(|r| Duration::from_secs_f64(1.0 / r))
    }

    /// The least time between requests: the host's `RateLimit-*` spacing,
    /// the pace learned from its refusals, or one shared by another node.
    fn gap(&self) -> Option<Duration> {
        let shared = self
            .shared_gap
            .filter(|(_, until)| *until > Instant::now())
            .map(|(g, _)| g);
        self.spacing
            .into_iter()
            .chain(self.learned_gap())
            .chain(shared)
            .max()
    }
}
/// Sleeps until `at`, if that is still to come. A sleep whose time has
/// come is not free: tokio's timer rounds it up to its next 1 ms tick, and
/// under a host's turn that capped a node alone (whose bookings all answer
/// "now") at about 840 requests a second.
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

/// One request counted in [`HostGate::queued`] while it waits for its
/// turn (a cancelled wait is uncounted too).
struct Queued<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Queued<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicU32) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Queued(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HostGate {
    fn new(
        name: String,
        quota: Option<&HostQuota>,
        stats: Arc<HostStats>,
        cluster: Coordinator,
        ops: Option<Arc<dyn PauseListener>>,
    ) -> Self {
        let rate = quota.and_then(|q| q.rate.map(|r| (r, q.burst)));
        HostGate {
            name,
            limiter: rate.map(|(r, b)| limiter(r, b)),
            in_flight: quota
                .and_then(|q| q.max_in_flight)
                .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
            turn: tokio::sync::Mutex::new(()),
            throttle: Mutex::new(Throttle::default()),
            run: Mutex::new(Run::default()),
            queued: std::sync::atomic::AtomicU32::new(0),
            alone: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            bookings: Default::default(),
            stats,
            shared_rate: rate,
            cluster,
            ops,
        }
    }

    /// Books this request's slot of the host's quota through the
    /// coordination, so that no second carries more than the rate and
    /// burst whatever the number of nodes, and waits for it (alone, the
    /// slot is now: the coordination does no work). The interval is the
    /// configured rate's, widened by a pace the host imposed; a host with
    /// neither books nothing (no round trip). When the store does not
    /// answer, the node's own limiter is all that holds (the database
    /// being away, the node's leases lapse and its polls stop soon).
    ///
    /// A busy host's bookings go in runs. With one statement per request,
    /// the booking was a cluster's database work for every poll answered
    /// 304 (1,667 a second at 100,000 instances). The request that finds
    /// no slot booked ahead waits [`GATHER`] for the requests behind it to
    /// queue, then books one run of slots, `interval` apart, for itself
    /// and them; each takes the next at its turn. The slots are the
    /// quota's as single bookings' would be (`gcra::reserve_run`), and one
    /// taken late by more than a slack is dropped: the quota holds (the
    /// slack comes off the booked burst, see [`run_policy`]), and a slot a
    /// cancelled poll left only goes unused.
    async fn book(&self) {
        let cluster = &self.cluster;
        let gap = self.throttle.lock().gap();
        let rate = self
            .shared_rate
            .map(|(r, b)| (r.per.as_secs_f64() * 1000.0 / f64::from(r.count), b));
        let (interval, burst) = match (rate, gap) {
            (Some((iv, b)), g) => (iv.max(g.map_or(0.0, |g| g.as_secs_f64() * 1000.0)), b),
            (None, Some(g)) => (g.as_secs_f64() * 1000.0, 1),
            (None, None) => return,
        };
        // Alone, a booking costs nothing and waits for nothing: gathering
        // would only hold the requests back. Only a host that may book
        // runs needs its last second counted.
        let recent = if self.alone.load(Ordering::Relaxed) || !runs_for(interval) {
            0
        } else {
            self.throttle.lock().sent_last_second()
        };
        let policy = run_policy(interval, burst);
        let slot = take_slot(&mut self.run.lock(), Instant::now(), interval, recent);
        let gather = match slot {
            Slot::At(at) => {
                wait_until(at).await;
                return;
            }
            Slot::Book { gather } => gather,
        };
        let n = if gather {
            // A queue that fills a run already has nothing to wait for
            // (a backlog: the start's first polls, a host's pause ending).
            if self.queued.load(Ordering::Relaxed) + 1 < MAX_RUN {
                tokio::time::sleep(GATHER).await;
            }
            (self.queued.load(Ordering::Relaxed) + 1).min(MAX_RUN)
        } else {
            1
        };
        #[cfg(test)]
        self.bookings.fetch_add(1, Ordering::Relaxed);
        match cluster
            .book(
                &format!("host:{}", self.name),
                interval,
                policy.map_or(burst, |(_, b)| b),
                n,
                false,
            )
            .await
        {
            Ok(booked) => {
                self.alone.store(booked.every.is_zero(), Ordering::Relaxed);
                let first = Instant::now() + booked.wait;
                if let (Some((slack, _)), true) = (policy, n > 1 && !booked.every.is_zero()) {
                    *self.run.lock() = Run {
                        next: Some(first + booked.every),
                        left: n - 1,
                        every: booked.every,
                        slack,
                        interval_ms: interval,
                    };
                }
                wait_until(first).await;
            }
            Err(e) => {
                tracing::warn!(host = %self.name, error = %e, "cannot book the cluster's quota for this host; the node's own limit holds")
            }
        }
    }

    /// Applies a pause and pace that a node of the cluster shared (not
    /// counted as this node's pauses).
    pub fn apply_shared(&self, paused_for: Duration, gap: Option<Duration>) {
        let mut t = self.throttle.lock();
        let now = Instant::now();
        if !paused_for.is_zero() {
            let until = now + paused_for;
            if t.paused_until.is_none_or(|u| u < until) {
                t.paused_until = Some(until);
            }
        }
        if let Some(g) = gap {
            t.shared_gap = Some((g, now + SHARED_PACE_FOR));
        }
    }

    /// Waits for this request's turn: the host's pause, the spacing its
    /// headers asked for, the rate quota and a slot among the requests in
    /// flight. The permit (if the host caps requests in flight) must be held
    /// until the response body is read.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let _turn = {
            let _queued = Queued::enter(&self.queued);
            self.turn.lock().await
        };
        // A pause can be extended while we wait (another answer came in):
        // look again after each sleep.
        loop {
            let wait_until = {
                let t = self.throttle.lock();
                let gap = t.gap();
                let spaced = match (gap, t.last_sent) {
                    (Some(s), Some(last)) => Some(last + s),
                    _ => None,
                };
                t.paused_until.into_iter().chain(spaced).max()
            };
            match wait_until {
                Some(u) if u > Instant::now() => tokio::time::sleep_until(u).await,
                _ => break,
            }
        }
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
        self.book().await;
        let permit = match &self.in_flight {
            Some(s) => Some(s.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        {
            let mut t = self.throttle.lock();
            let now = Instant::now();
            t.last_sent = Some(now);
            t.recent.push_back(now);
            while t
                .recent
                .front()
                .is_some_and(|f| now.duration_since(*f) > Duration::from_secs(1))
            {
                t.recent.pop_front();
            }
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        permit
    }

    /// Learns from an answer: pauses and spacing for every later request.
    /// Returns the pause it imposed, if any.
    pub fn observe(&self, status: u16, headers: &HeaderMap) -> Option<Duration> {
        let a = advice(status, headers, SystemTime::now());
        let mut t = self.throttle.lock();
        if status == 429 || status == 503 {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        }
        if status == 429 {
            self.stats.too_many.fetch_add(1, Ordering::Relaxed);
        }
        if status == 429 {
            let mut pace = t.recent.len().max(1) as f64 * 0.9;
            if let Some(current) = t.learned_rate() {
                pace = pace.min(current * 0.9);
            }
            t.learned = Some((pace.max(0.1), Instant::now()));
        }
        let mut pause = a.pause;
        if status == 429 && pause.is_none() {
            // Refused without a hint: back off blindly, doubling.
            let d = FIRST_BLIND_PAUSE
                .saturating_mul(1 << t.blind_429s.min(10))
                .min(MAX_BLIND_PAUSE);
            t.blind_429s += 1;
            pause = Some(d);
        } else if status != 429 {
            t.blind_429s = 0;
        }
        if let Some(s) = a.spacing {
            t.spacing = Some(s);
        } else if a.clears_spacing {
            t.spacing = None;
        }
        let pause = pause.map(|p| p.min(MAX_PAUSE));
        // What one node learns, every node applies (at once, through the
        // coordination's notice; alone, there is nobody to tell).
        if pause.is_some() || a.spacing.is_some() || status == 429 {
            let gap = t.gap().map(|g| (g, SHARED_PACE_FOR));
            let (store, host) = (self.cluster.clone(), self.name.clone());
            tokio::spawn(async move {
                if let Err(e) = store.share_pace(&host, pause, gap).await {
                    tracing::warn!(host = %host, error = %e, "cannot share the host's pause with the cluster");
                }
            });
        }
        let pause = pause?;
        if let Some(ops) = &self.ops {
            if a.pause.is_some() {
                ops.host_paused(&self.name, status, pause);
            }
        }
        let until = Instant::now() + pause;
        if t.paused_until.is_none_or(|u| u < until) {
            let now = Instant::now();
            let added = match t.paused_until {
                Some(u) if u > now => until - u,
                _ => until - now,
            };
            self.stats
                .paused_ms
                .fetch_add(added.as_millis() as u64, Ordering::Relaxed);
            t.paused_until = Some(until);
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
        }
        Some(pause)
    }

    /// Time left in the current pause, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        let t = self.throttle.lock();
        t.paused_until
            .and_then(|u| u.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    pub fn report(&self) -> HostReport {
        HostReport {
            requests: self.stats.requests.load(Ordering::Relaxed),
            throttled: self.stats.throttled.load(Ordering::Relaxed),
            too_many_requests: self.stats.too_many.load(Ordering::Relaxed),
            pauses: self.stats.pauses.load(Ordering::Relaxed),
            paused_ms_total: self.stats.paused_ms.load(Ordering::Relaxed),
            paused_for_ms: self.paused_for().map(|d| d.as_millis() as u64),
            spacing_ms: {
                let t = self.throttle.lock();
                t.gap().map(|d| d.as_millis() as u64)
            },
        }
    }
}
/// Gates of every host: the configured ones, and one per other host met
/// (no quota, but its own pause, so a `Retry-After` is honoured everywhere).
pub struct HostGates {
    /// Configured gates with the quota each was built from (a reload
    /// replaces only the gates whose quota changed).
    configured: parking_lot::RwLock<BTreeMap<String, (HostQuota, Arc<HostGate>)>>,
    others: Mutex<HashMap<String, Arc<HostGate>>>,
    /// Every host's counters since the start, by name. A reload that
    /// changes a host's quota builds a new gate, and one that drops the
    /// host drops its gate; the counters stay here and go on, so
    /// `pollhook_upstream_*_total` never go backwards.
    stats: Mutex<BTreeMap<String, Arc<HostStats>>>,
    /// The coordination of the nodes: quotas and pauses hold for every
    /// node (alone: for this one).
    cluster: Coordinator,
    /// Operational events (long pauses).
    ops: Option<Arc<dyn PauseListener>>,
}

impl HostGates {
    /// Gates of this process alone (`pollhook test`): a coordination of
    /// its own, which books and shares nothing.
    pub fn new(hosts: &BTreeMap<String, HostQuota>) -> Self {
        Self::in_cluster(hosts, Coordinator::alone(), None)
    }

    /// Gates whose quotas and pauses are shared by the nodes of the
    /// coordination `cluster`.
    pub fn in_cluster(
        hosts: &BTreeMap<String, HostQuota>,
        cluster: Coordinator,
        ops: Option<Arc<dyn PauseListener>>,
    ) -> Self {
        let gates = HostGates {
            configured: Default::default(),
            others: Default::default(),
            stats: Default::default(),
            cluster,
            ops,
        };
        gates.reconfigure(hosts);
        gates
    }

    /// Applies a pause or pace another node shared to `host`'s gate.
    pub fn apply_shared(&self, host: &str, paused_for: Duration, gap: Option<Duration>) {
        let gate = {
            let configured = self.configured.read();
            configured.get(host).map(|(_, g)| g.clone())
        };
        let gate = gate.or_else(|| self.others.lock().get(host).cloned());
        if let Some(g) = gate {
            g.apply_shared(paused_for, gap);
        }
    }

    /// Applies the `hosts:` of a (re)loaded configuration: gates whose
    /// quota is unchanged keep their state (pauses, learned pace, queue);
    /// changed ones start afresh; requests already waiting at a replaced
    /// gate finish there.
    pub fn reconfigure(&self, hosts: &BTreeMap<String, HostQuota>) {
        let mut configured = self.configured.write();
        let mut next = BTreeMap::new();
        for (name, q) in hosts {
            let name = name.to_ascii_lowercase();
            let gate = match configured.remove(&name) {
                Some((old, gate)) if &old == q => gate,
                _ => Arc::new(HostGate::new(
                    name.clone(),
                    Some(q),
                    self.host_stats(&name),
                    self.cluster.clone(),
                    self.ops.clone(),
                )),
            };
            next.insert(name, (q.clone(), gate));
        }
        *configured = next;
    }

    /// The gate of a URL's host: a configured `host:port`, then `host`,
    /// else the host's own unlimited gate.
    pub fn for_url(&self, url: &reqwest::Url) -> Arc<HostGate> {
        // Asked at every request: two strings (the host lowercased and
        // its key), and a copy of the key only for a host seen first.
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let key = match url.port_or_known_default() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        {
            let configured = self.configured.read();
            if let Some((_, g)) = configured.get(&key).or_else(|| configured.get(&host)) {
                return g.clone();
            }
        }
        let mut others = self.others.lock();
        if let Some(g) = others.get(&key) {
            return g.clone();
        }
        others
            .entry(key.clone())
            .or_insert_with(|| {
                let stats = self.host_stats(&key);
                Arc::new(HostGate::new(
                    key,
                    None,
                    stats,
                    self.cluster.clone(),
                    self.ops.clone(),
                ))
            })
            .clone()
    }

    /// The counters of a host, created on first use.
    fn host_stats(&self, name: &str) -> Arc<HostStats> {
        self.stats
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every host's counters since the start (hosts no longer configured
    /// included), for `/metrics`.
    pub fn counters(&self) -> BTreeMap<String, Arc<HostStats>> {
        self.stats.lock().clone()
    }

    /// Every gate's report, by host.
    pub fn report(&self) -> BTreeMap<String, HostReport> {
        let mut out: BTreeMap<String, HostReport> = self
            .configured
            .read()
            .iter()
            .map(|(k, (_, g))| (k.clone(), g.report()))
            .collect();
        for (k, g) in self.others.lock().iter() {
            out.insert(k.clone(), g.report());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::advice::tests::headers;
    use crate::store::{HostPace, Notice};

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request_of_the_host_and_blind_429s_double() {
        let gate = HostGate::new(
            "h".into(),
            None,
            Default::default(),
            Coordinator::alone(),
            None,
        );
        let t0 = Instant::now();
        gate.acquire().await;
        assert_eq!(
            gate.observe(429, &headers(&[("retry-after", "3")])),
            Some(Duration::from_secs(3))
        );
        gate.acquire().await;
        assert!(Instant::now() - t0 >= Duration::from_secs(3));
        let t1 = Instant::now();
        assert_eq!(
            gate.observe(429, &HeaderMap::new()),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            gate.observe(429, &HeaderMap::new()),
            Some(Duration::from_secs(2))
        );
        gate.acquire().await;
        assert!(Instant::now() - t1 >= Duration::from_secs(2));
        assert_eq!(gate.observe(200, &HeaderMap::new()), None);
        assert_eq!(
            gate.observe(429, &HeaderMap::new()),
            Some(Duration::from_secs(1)),
            "reset by a success"
        );
        assert_eq!(gate.stats.throttled.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_without_published_limits_slows_the_pace_then_it_creeps_back() {
        let gate = HostGate::new(
            "h".into(),
            None,
            Default::default(),
            Coordinator::alone(),
            None,
        );
        // 20 requests within a second, then a 429.
        for _ in 0..20 {
            gate.acquire().await;
            tokio::time::advance(Duration::from_millis(40)).await;
        }
        gate.observe(429, &headers(&[("retry-after", "0")]));
        // 20 sent in the last second → 18/s from now on.
        let rate = gate.throttle.lock().learned_rate().unwrap();
        assert!((rate - 18.0).abs() < 1e-6, "{rate}");
        let t0 = Instant::now();
        gate.acquire().await;
        gate.acquire().await;
        assert!(
            Instant::now() - t0 >= Duration::from_secs_f64(1.0 / 18.0),
            "spaced"
        );
        // Five seconds later: one more request/s per second.
        tokio::time::advance(Duration::from_secs(5)).await;
        let rate = gate.throttle.lock().learned_rate().unwrap();
        assert!((23.0..23.2).contains(&rate), "{rate}");
        // Another refusal at that pace: down again, from the lower of the two.
        gate.observe(429, &headers(&[("retry-after", "0")]));
        let again = gate.throttle.lock().learned_rate().unwrap();
        assert!(again < 21.0, "{again}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_pass_in_arrival_order() {
        let quota = HostQuota {
            rate: Some(Rate::parse("10/s").unwrap()),
            burst: 1,
            max_in_flight: None,
        };
        let gate = Arc::new(HostGate::new(
            "h".into(),
            Some(&quota),
            Default::default(),
            Coordinator::alone(),
            None,
        ));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (g, o) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                g.acquire().await;
                o.lock().push(i);
            }));
            // Arrive one after the other.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn host_counters_survive_a_reload_that_replaces_or_drops_the_gate() {
        let quota = |max| {
            BTreeMap::from([(
                "api.example".to_string(),
                HostQuota {
                    rate: None,
                    burst: 1,
                    max_in_flight: Some(max),
                },
            )])
        };
        let gates = HostGates::new(&quota(2));
        let url = reqwest::Url::parse("https://api.example/x").unwrap();
        drop(gates.for_url(&url).acquire().await);
        gates.reconfigure(&quota(3)); // a new gate for the new quota
        let gate = gates.for_url(&url);
        drop(gate.acquire().await);
        gate.observe(429, &headers(&[("retry-after", "0")]));
        assert_eq!(gates.report()["api.example"].requests, 2);
        gates.reconfigure(&BTreeMap::new()); // no longer configured
        let c = &gates.counters()["api.example"];
        assert_eq!(c.requests.load(Ordering::Relaxed), 2);
        assert_eq!(c.too_many.load(Ordering::Relaxed), 1);
    }

    fn gate(quota: Option<&HostQuota>, cluster: Coordinator) -> HostGate {
        HostGate::new("h".into(), quota, Default::default(), cluster, None)
    }

    /// A coordination two nodes take part in (so that bookings and shared
    /// paces count, see `SingleNode`), and the handle gates hold.
    async fn two_nodes() -> (Arc<crate::store::SingleNode>, Coordinator) {
        let c = Arc::new(crate::store::SingleNode::default());
        c.heartbeat("a", 1, 60_000).await.unwrap();
        c.heartbeat("b", 2, 60_000).await.unwrap();
        (c.clone(), Coordinator::SingleNode(c))
    }

    fn quota(rate: &str) -> HostQuota {
        HostQuota {
            rate: Some(Rate::parse(rate).unwrap()),
            burst: 1,
            max_in_flight: None,
        }
    }

    /// How long `g.acquire()` waits (tokio's clock, paused in these tests).
    async fn waited(g: &HostGate) -> Duration {
        let t0 = Instant::now();
        g.acquire().await;
        Instant::now() - t0
    }

    /// The gates of two nodes book one quota: the second node's request
    /// waits for the slot after the first's (2/10s: 5 s), though its own
    /// limiter is fresh.
    #[tokio::test(start_paused = true)]
    async fn gates_of_two_nodes_book_the_host_rate_together() {
        let (_, cluster) = two_nodes().await;
        let (a, b) = (
            gate(Some(&quota("2/10s")), cluster.clone()),
            gate(Some(&quota("2/10s")), cluster),
        );
        assert_eq!(waited(&a).await, Duration::ZERO);
        let w = waited(&b).await;
        assert!(
            w > Duration::from_millis(4_900) && w <= Duration::from_secs(5),
            "{w:?}"
        );
    }

    /// A busy host's requests book runs of slots: one round trip for many
    /// requests, each still at or after its own slot of the quota. (Real
    /// time: the single node's coordination keeps the wall clock.)
    #[tokio::test]
    async fn a_busy_host_books_runs_and_keeps_the_rate() {
        let (_, cluster) = two_nodes().await;
        let g = Arc::new(gate(Some(&quota("2000/s")), cluster));
        // 2 000/s: 0.5 ms a slot. Enough requests to count as busy, then
        // more, all queued at once.
        async fn burst(g: &Arc<HostGate>, n: usize) -> Vec<Instant> {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..n {
                let g = g.clone();
                tasks.spawn(async move {
                    g.acquire().await;
                    Instant::now()
                });
            }
            let mut sent = Vec::new();
            while let Some(at) = tasks.join_next().await {
                sent.push(at.unwrap());
            }
            sent
        }
        let t0 = Instant::now();
        burst(&g, 120).await;
        let first = g.bookings.load(Ordering::Relaxed);
        assert!(first < 120, "{first} bookings for 120 requests");
        // Every request that waited has left the count.
        assert_eq!(g.queued.load(Ordering::Relaxed), 0);
        let sent = burst(&g, 200).await;
        assert_eq!(g.queued.load(Ordering::Relaxed), 0);
        let second = g.bookings.load(Ordering::Relaxed) - first;
        assert!(second <= 20, "{second} bookings for 200 busy requests");
        // No request went before its slot: 320 slots 0.5 ms apart.
        let last = sent.iter().max().unwrap();
        assert!(
            *last - t0 >= Duration::from_micros(319 * 500),
            "{:?}",
            *last - t0
        );
    }

    /// Alone, a busy host's requests are not held back to gather: the
    /// coordination books nothing, the node's own limiter paces them.
    #[tokio::test(start_paused = true)]
    async fn alone_a_busy_host_does_not_gather() {
        // 100 000/s with a burst of 1 000: the node's own limiter never
        // holds these 300, so any time that passes is the gate's.
        let q = HostQuota {
            burst: 1_000,
            ..quota("100000/s")
        };
        let g = gate(Some(&q), Coordinator::SingleNode(Default::default()));
        let t0 = Instant::now();
        let step = Duration::from_micros(100);
        for _ in 0..300 {
            // Off the timer's 1 ms ticks, where a sleep would be rounded
            // up to the next one.
            tokio::time::advance(step).await;
            g.acquire().await;
        }
        // No 20 ms for each run gathered, and no timer tick for a booking
        // that answered "now": the clock moved only by the steps.
        assert_eq!(Instant::now() - t0, step * 300);
        assert_eq!(g.bookings.load(Ordering::Relaxed), 300);
    }

    /// A request given up while it waits for its turn (its poll
    /// cancelled) leaves the count a run is sized by.
    #[tokio::test(start_paused = true)]
    async fn a_request_given_up_in_the_queue_is_not_counted() {
        let g = Arc::new(gate(Some(&quota("2000/s")), Coordinator::alone()));
        let turn = g.turn.lock().await;
        let waiting = {
            let g = g.clone();
            tokio::spawn(async move { g.acquire().await })
        };
        while g.queued.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(g.queued.load(Ordering::Relaxed), 0);
        drop(turn);
    }

    /// Runs only for hosts of 100/s and more; the slack is half the
    /// burst's tolerance within 1 to 10 ms, and comes off the burst booked.
    #[test]
    fn the_run_policy_keeps_the_burst_whole() {
        let ms = |m: f64| Duration::from_secs_f64(m / 1000.0);
        assert_eq!(run_policy(10.5, 50), None);
        assert_eq!(run_policy(0.0, 50), None);
        // 2 000/s, burst 50: tolerance 24.5 ms, slack 10 ms = 20 slots.
        assert_eq!(run_policy(0.5, 50), Some((ms(10.0), 30)));
        // 100/s, burst 3: tolerance 20 ms, slack 10 ms = 1 slot.
        assert_eq!(run_policy(10.0, 3), Some((ms(10.0), 2)));
        // 1 000/s, burst 5: tolerance 4 ms, slack 2 ms = 2 slots.
        assert_eq!(run_policy(1.0, 5), Some((ms(2.0), 3)));
        // Burst 1: the least slack, and a burst of one still.
        assert_eq!(run_policy(0.5, 1), Some((ms(1.0), 1)));
    }

    /// Which slot a request takes from a run booked ahead.
    #[test]
    fn a_run_hands_out_its_slots_in_order_and_drops_the_passed_ones() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // `left` slots from 10 ms, 5 ms apart, each good until 1 ms late.
        let run_of = |left| Run {
            next: Some(t0 + ms(10)),
            left,
            every: ms(5),
            slack: ms(1),
            interval_ms: 5.0,
        };
        let mut run = run_of(3);
        assert_eq!(take_slot(&mut run, t0, 5.0, 500), Slot::At(t0 + ms(10)));
        // The slot at 15 ms passed 2 ms ago, beyond the slack: dropped;
        // the one at 20 ms is still to come.
        assert_eq!(
            take_slot(&mut run, t0 + ms(17), 5.0, 500),
            Slot::At(t0 + ms(20))
        );
        assert_eq!(run.left, 0);
        // Empty: book, gathering only for a busy host.
        assert_eq!(
            take_slot(&mut run, t0, 5.0, 100),
            Slot::Book { gather: true }
        );
        assert_eq!(
            take_slot(&mut run, t0, 5.0, 99),
            Slot::Book { gather: false }
        );
        let mut run = run_of(2);
        assert_eq!(
            take_slot(&mut run, t0 + ms(21), 5.0, 0),
            Slot::Book { gather: false }
        );
        assert_eq!((run.left, run.next), (0, None));
        // A run booked for another interval (a pace came) is void.
        let mut run = run_of(2);
        assert_eq!(
            take_slot(&mut run, t0, 50.0, 0),
            Slot::Book { gather: false }
        );
        assert_eq!(run.left, 0);
    }

    /// A pace the host imposed widens the booked interval: beyond the
    /// configured rate's, and with no rate at all.
    #[tokio::test(start_paused = true)]
    async fn a_pace_widens_the_booked_interval() {
        for q in [Some(quota("10/s")), None] {
            let (_, cluster) = two_nodes().await;
            let (a, b) = (gate(q.as_ref(), cluster.clone()), gate(q.as_ref(), cluster));
            for g in [&a, &b] {
                g.apply_shared(Duration::ZERO, Some(Duration::from_secs(2)));
            }
            assert_eq!(waited(&a).await, Duration::ZERO);
            let w = waited(&b).await;
            assert!(
                w > Duration::from_millis(1_900) && w <= Duration::from_secs(2),
                "{q:?}: {w:?}"
            );
        }
    }

    /// A pause another node shared holds this gate, never shortens a
    /// longer one, and is not counted as this node's.
    #[tokio::test(start_paused = true)]
    async fn a_shared_pause_holds_the_gate_and_never_shortens_a_longer_one() {
        let g = gate(None, Coordinator::alone());
        g.apply_shared(Duration::ZERO, None);
        assert_eq!(g.paused_for(), None, "nothing shared");
        g.apply_shared(Duration::from_secs(5), None);
        assert_eq!(g.paused_for(), Some(Duration::from_secs(5)));
        g.apply_shared(Duration::from_secs(2), None);
        assert_eq!(g.paused_for(), Some(Duration::from_secs(5)), "shorter");
        g.apply_shared(Duration::from_secs(8), None);
        assert_eq!(g.paused_for(), Some(Duration::from_secs(8)));
        assert_eq!(waited(&g).await, Duration::from_secs(8));
        assert_eq!(g.paused_for(), None, "over");
        let r = g.report();
        assert_eq!((r.pauses, r.paused_ms_total, r.requests), (0, 0, 1));
    }

    /// A pace another node shared holds for `SHARED_PACE_FOR`, then goes.
    #[tokio::test(start_paused = true)]
    async fn a_shared_pace_holds_for_its_time() {
        let g = gate(None, Coordinator::alone());
        assert_eq!(g.report().spacing_ms, None);
        g.apply_shared(Duration::ZERO, Some(Duration::from_millis(250)));
        assert_eq!(g.report().spacing_ms, Some(250));
        tokio::time::advance(SHARED_PACE_FOR - Duration::from_millis(1)).await;
        assert_eq!(g.report().spacing_ms, Some(250));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(g.report().spacing_ms, None, "the shared pace ended");
    }

    /// Pauses that overlap count their time once; a pause that ends no
    /// later than the running one is no new pause.
    #[tokio::test(start_paused = true)]
    async fn overlapping_pauses_count_their_time_once() {
        let g = gate(None, Coordinator::alone());
        let retry = |s: &str| headers(&[("retry-after", s)]);
        g.observe(503, &retry("3"));
        tokio::time::advance(Duration::from_secs(1)).await;
        // 2 s of the first left: a 5 s pause adds 3 s.
        assert_eq!(g.observe(503, &retry("5")), Some(Duration::from_secs(5)));
        g.observe(503, &retry("5"));
        g.observe(503, &retry("1"));
        let r = g.report();
        assert_eq!(
            (r.pauses, r.paused_ms_total, r.paused_for_ms),
            (2, 6_000, Some(5_000))
        );
        // Once it is over, a new pause counts whole.
        tokio::time::advance(Duration::from_secs(10)).await;
        g.observe(503, &retry("2"));
        let r = g.report();
        assert_eq!((r.pauses, r.paused_ms_total), (3, 8_000));
        // 503s are throttling, not `429 Too Many Requests`.
        assert_eq!((r.throttled, r.too_many_requests), (5, 0));
    }

    /// The pace at a refusal counts the requests of the last second (its
    /// ends included), and a second refusal lowers the learned pace.
    #[tokio::test(start_paused = true)]
    async fn the_pace_at_a_refusal_is_that_of_the_last_second() {
        let g = gate(None, Coordinator::alone());
        let refused = || g.observe(429, &headers(&[("retry-after", "0")]));
        let learned = || g.throttle.lock().learned_rate().unwrap();
        g.acquire().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        g.acquire().await;
        refused();
        assert!((learned() - 1.8).abs() < 1e-9, "{}", learned());
        // Its gap is the time per request at that pace.
        assert_eq!(g.report().spacing_ms, Some(555));

        let g = gate(None, Coordinator::alone());
        let refused = || g.observe(429, &headers(&[("retry-after", "0")]));
        let learned = || g.throttle.lock().learned_rate().unwrap();
        for _ in 0..10 {
            g.acquire().await;
        }
        refused();
        assert!((learned() - 9.0).abs() < 1e-9, "{}", learned());
        // Again at once: 90% of the learned pace (below the last second's).
        refused();
        assert!((learned() - 8.1).abs() < 1e-9, "{}", learned());
    }

    /// A learned pace of 100,000 requests/s is no constraint any more;
    /// a fast one grows in proportion.
    #[tokio::test(start_paused = true)]
    async fn a_learned_pace_ends_once_it_is_no_constraint() {
        let g = gate(None, Coordinator::alone());
        g.throttle.lock().learned = Some((99_999.0, Instant::now()));
        assert_eq!(g.throttle.lock().learned_rate(), Some(99_999.0));
        g.throttle.lock().learned = Some((100_000.0, Instant::now()));
        assert_eq!(g.throttle.lock().learned_rate(), None);
        // Above 50/s it grows by 2% of itself per second.
        g.throttle.lock().learned = Some((100.0, Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        let grown = g.throttle.lock().learned_rate().unwrap();
        assert!((grown - 120.0).abs() < 1e-9, "{grown}");
    }

    /// What a node learns of a host, it shares: a pause alone, or a
    /// spacing alone; an answer that asks nothing shares nothing.
    #[tokio::test(start_paused = true)]
    async fn pauses_and_spacings_are_shared_with_the_other_nodes() {
        let (c, cluster) = two_nodes().await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let listener = {
            let c = c.clone();
            tokio::spawn(async move { c.listen(tx).await })
        };
        // Once the listener listens, every notice reaches it.
        loop {
            c.share_pace("ready", None, None).await.unwrap();
            if let Ok(n) = tokio::time::timeout(Duration::from_millis(10), rx.recv()).await {
                assert_eq!(n, Some(Notice::Pace("ready".into())));
                break;
            }
        }
        let pace_of_h = || async {
            let paces = c.paces().await.unwrap();
            let h: Vec<HostPace> = paces.into_iter().filter(|p| p.host == "h").collect();
            assert_eq!(h.len(), 1, "{h:?}");
            h[0].clone()
        };
        let g = gate(None, cluster);
        g.observe(200, &HeaderMap::new());
        g.observe(503, &headers(&[("retry-after", "3")]));
        let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(notice.unwrap(), Some(Notice::Pace("h".into())));
        // A marker: nothing was shared before it but the pause.
        c.share_pace("marker", None, None).await.unwrap();
        let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(notice.unwrap(), Some(Notice::Pace("marker".into())));
        let h = pace_of_h().await;
        assert!(
            h.paused_for > Duration::from_millis(2_900) && h.paused_for <= Duration::from_secs(3),
            "{h:?}"
        );
        assert_eq!(h.gap, None);

        let spacing = headers(&[("ratelimit-remaining", "10"), ("ratelimit-reset", "5")]);
        assert_eq!(g.observe(200, &spacing), None);
        let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(notice.unwrap(), Some(Notice::Pace("h".into())));
        assert_eq!(pace_of_h().await.gap, Some(Duration::from_millis(500)));
        listener.abort();
    }

    /// A shared pause reaches the host's gate, configured or met; a host
    /// with no gate has nothing to hold.
    #[tokio::test(start_paused = true)]
    async fn a_shared_pause_reaches_the_configured_gate_or_the_one_met() {
        let gates = HostGates::new(&BTreeMap::from([(
            "api.example".to_string(),
            quota("10/s"),
        )]));
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let met = gates.for_url(&url("https://other.example/x"));
        assert_eq!(met.name, "other.example:443");
        gates.apply_shared("api.example", Duration::from_secs(5), None);
        gates.apply_shared("other.example:443", Duration::from_secs(7), None);
        gates.apply_shared("nobody.example", Duration::from_secs(9), None);
        let configured = gates.for_url(&url("https://api.example/y"));
        assert_eq!(configured.paused_for(), Some(Duration::from_secs(5)));
        assert_eq!(met.paused_for(), Some(Duration::from_secs(7)));
        let report = gates.report();
        let paused: Vec<_> = report
            .iter()
            .map(|(k, r)| (k.as_str(), r.paused_for_ms))
            .collect();
        assert_eq!(
            paused,
            [
                ("api.example", Some(5_000)),
                ("other.example:443", Some(7_000))
            ]
        );
    }

    /// A URL's gate: the configured `host:port`, then the configured host
    /// (names compared without case), else one gate per host and port met.
    #[test]
    fn a_url_finds_its_gate_by_host_and_port() {
        let gates = HostGates::new(&BTreeMap::from([
            ("API.example".to_string(), quota("10/s")),
            ("api.example:8443".to_string(), quota("1/s")),
        ]));
        let name = |u: &str| gates.for_url(&reqwest::Url::parse(u).unwrap()).name.clone();
        assert_eq!(name("https://api.example:8443/x"), "api.example:8443");
        assert_eq!(name("https://Api.Example/x"), "api.example");
        assert_eq!(name("http://api.example:8080/x"), "api.example");
        assert_eq!(name("http://other.example:8080/x"), "other.example:8080");
        let url = reqwest::Url::parse("http://other.example:8080/y").unwrap();
        assert!(Arc::ptr_eq(&gates.for_url(&url), &gates.for_url(&url)));
        // A reload keeps the gate whose quota did not change.
        let api = reqwest::Url::parse("https://api.example/").unwrap();
        let before = gates.for_url(&api);
        gates.reconfigure(&BTreeMap::from([(
            "api.example".to_string(),
            quota("10/s"),
        )]));
        assert!(Arc::ptr_eq(&before, &gates.for_url(&api)));
        gates.reconfigure(&BTreeMap::from([("api.example".to_string(), quota("5/s"))]));
        assert!(!Arc::ptr_eq(&before, &gates.for_url(&api)));
    }
}
