//! Politeness: per-host quotas (rate, burst, requests in flight) shared by
//! every source calling the host, per-instance connector rate limits, and
//! the host's own throttling signals (`Retry-After`, `RateLimit-*`).
//!
//! Rate limiting is governor's GCRA, which never lets more than `burst`
//! requests through at once and holds the rate over any window. Two things
//! are added around it, each for a reason:
//!
//! - **A FIFO turn per host.** governor's `until_ready` lets waiters race:
//!   whoever wakes first wins, so under scarcity some instances can lose
//!   again and again. Requests instead take a turn in a fair (FIFO) tokio
//!   mutex and pass the limiter one at a time in arrival order; an instance
//!   that was just served queues behind everyone already waiting, which
//!   makes scarcity round-robin and stretches every instance's effective
//!   interval evenly.
//! - **A host pause and a spacing.** A `429`/`503` with `Retry-After`, or
//!   `RateLimit-Remaining: 0`, pauses the host for every connector and
//!   instance until then; `RateLimit-Remaining`/`-Reset` also spread the
//!   remaining requests over the time to the reset, so that pollhook slows
//!   down before the upstream has to refuse anything.
//!
//! The header arithmetic ([`retry_after`], [`advice`]) is pure and tested
//! beside the code; time comes in as arguments.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::schedule::parse_duration;

/// A quota shared by everything calling one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostQuota {
    pub rate: Option<Rate>,
    pub burst: u32,
    pub max_in_flight: Option<u32>,
}

/// A rate such as `60/min`, `10/s`, `5/2s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per `per`.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/unit`, where unit is `s`, `min`, `h`, `day` or a duration.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let expected =
            || format!("expected a rate such as `10/s`, `60/min` or `1000/h`, got `{text}`");
        let (n, unit) = text.split_once('/').ok_or_else(expected)?;
        let count: u32 = n.trim().parse().map_err(|_| expected())?;
        if count == 0 {
            return Err(format!("{}: the count must be at least 1", expected()));
        }
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            other => parse_duration(other).map_err(|_| expected())?,
        };
        if per.is_zero() {
            return Err(expected());
        }
        Ok(Rate { count, per })
    }
}

/// The longest pause a host's headers can impose; a longer `Retry-After`
/// (or a reset an hour away) is capped here and re-learned on the next answer.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// Pause after a `429` that says nothing about when to come back: doubles per
/// consecutive `429` up to [`MAX_BLIND_PAUSE`], reset by any other answer.
const FIRST_BLIND_PAUSE: Duration = Duration::from_secs(1);
const MAX_BLIND_PAUSE: Duration = Duration::from_secs(60);

/// How long a pace shared through the cluster holds unless renewed by
/// another throttling answer.
const SHARED_PACE_FOR: Duration = Duration::from_secs(60);

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
    /// Counters for status and metrics; shared with every gate this host
    /// had (see [`HostGates`]).
    pub stats: Arc<HostStats>,
    /// The configured rate and burst, booked in the cluster's store so
    /// that the nodes together keep them (see [`crate::gcra`]).
    shared_rate: Option<(Rate, u32)>,
    /// The cluster this node is part of, if any: its quota bookings and
    /// shared pauses.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Where a long pause is announced (`pollhook.quota.throttled`).
    ops: Option<Arc<crate::opsevents::Ops>>,
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

/// What a host's gate counted.
#[derive(Default)]
pub struct HostStats {
    pub requests: AtomicU64,
    /// `429` and `503` answers.
    pub throttled: AtomicU64,
    /// Times the host was paused by its answers.
    pub pauses: AtomicU64,
    /// `429` answers alone.
    pub too_many: AtomicU64,
    /// Milliseconds of pause imposed in all (overlapping pauses counted once).
    pub paused_ms: AtomicU64,
}

/// A host's gate as `/status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HostReport {
    pub requests: u64,
    pub throttled: u64,
    /// `429 Too Many Requests` answers.
    pub too_many_requests: u64,
    pub pauses: u64,
    /// Time paused in all, in milliseconds.
    pub paused_ms_total: u64,
    /// Milliseconds until the pause ends, when paused.
    pub paused_for_ms: Option<u64>,
    /// Spacing imposed by the host's `RateLimit-*` headers or learned from
    /// its refusals, if any.
    pub spacing_ms: Option<u64>,
}

impl HostGate {
    fn new(
        name: String,
        quota: Option<&HostQuota>,
        stats: Arc<HostStats>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        ops: Option<Arc<crate::opsevents::Ops>>,
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
            stats,
            shared_rate: rate,
            cluster,
            ops,
        }
    }

    /// In a cluster: books this request's slot of the host's quota in the
    /// store, so that no second carries more than the rate and burst
    /// whatever the number of nodes, and waits for it. The interval is the
    /// configured rate's, widened by a pace the host imposed; a host with
    /// neither books nothing (no round trip). When the store does not
    /// answer, the node's own limiter is all that holds (the database
    /// being away, the node's leases lapse and its polls stop soon).
    async fn book(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let gap = self.throttle.lock().expect("throttle lock").gap();
        let rate = self
            .shared_rate
            .map(|(r, b)| (r.per.as_secs_f64() * 1000.0 / f64::from(r.count), b));
        let (interval, burst) = match (rate, gap) {
            (Some((iv, b)), g) => (iv.max(g.map_or(0.0, |g| g.as_secs_f64() * 1000.0)), b),
            (None, Some(g)) => (g.as_secs_f64() * 1000.0, 1),
            (None, None) => return,
        };
        match cluster
            .store()
            .book(&format!("host:{}", self.name), interval, burst, false)
            .await
        {
            Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(host = %self.name, error = %e, "cannot book the cluster's quota for this host; the node's own limit holds")
            }
        }
    }

    /// Applies a pause and pace that a node of the cluster shared (not
    /// counted as this node's pauses).
    pub fn apply_shared(&self, paused_for: Duration, gap: Option<Duration>) {
        let mut t = self.throttle.lock().expect("throttle lock");
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
        let _turn = self.turn.lock().await;
        // A pause can be extended while we wait (another answer came in):
        // look again after each sleep.
        loop {
            let wait_until = {
                let t = self.throttle.lock().expect("throttle lock");
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
            let mut t = self.throttle.lock().expect("throttle lock");
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
        let mut t = self.throttle.lock().expect("throttle lock");
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
        if let Some(c) = &self.cluster {
            // What one node learns, every node applies (at once, through
            // the store's notice).
            if pause.is_some() || a.spacing.is_some() || status == 429 {
                let gap = t.gap().map(|g| (g, SHARED_PACE_FOR));
                let (store, host) = (c.store().clone(), self.name.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.share_pace(&host, pause, gap).await {
                        tracing::warn!(host = %host, error = %e, "cannot share the host's pause with the cluster");
                    }
                });
            }
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
        let t = self.throttle.lock().expect("throttle lock");
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
                let t = self.throttle.lock().expect("throttle lock");
                t.gap().map(|d| d.as_millis() as u64)
            },
        }
    }
}

/// What a host's answer asks of its clients.
#[derive(Debug, Default, PartialEq)]
pub struct Advice {
    /// Send nothing for this long.
    pub pause: Option<Duration>,
    /// Leave at least this long between requests.
    pub spacing: Option<Duration>,
    /// The answer carried rate-limit headers that allow a normal pace.
    pub clears_spacing: bool,
}

/// Reads `Retry-After` (on `429`/`503`) and the rate-limit headers:
/// `RateLimit-Remaining`/`RateLimit-Reset` (IETF draft, reset in seconds),
/// the combined `RateLimit: …, remaining=N, reset=S` (or `r=`/`t=`) form,
/// and `X-RateLimit-Remaining`/`X-RateLimit-Reset` (GitHub style, reset as
/// an epoch time, or seconds when small). Pure.
pub fn advice(status: u16, headers: &HeaderMap, now: SystemTime) -> Advice {
    let mut out = Advice::default();
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if status == 429 || status == 503 {
        out.pause = get("retry-after").and_then(|v| retry_after(v, now));
    }
    let mut remaining = get("ratelimit-remaining")
        .or(get("x-ratelimit-remaining"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut reset = get("ratelimit-reset")
        .or(get("x-ratelimit-reset"))
        .and_then(|v| reset_delay(v, now));
    if let Some(combined) = get("ratelimit") {
        for part in combined.split([',', ';']) {
            let Some((k, v)) = part.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "remaining" | "r" => remaining = remaining.or(v.parse().ok()),
                "reset" | "t" => reset = reset.or(v.parse().ok().map(Duration::from_secs)),
                _ => {}
            }
        }
    }
    match (remaining, reset) {
        (Some(0), Some(r)) => {
            out.pause = Some(out.pause.map_or(r, |p| p.max(r)));
        }
        (Some(n), Some(r)) => {
            // Spread what is left evenly over the time to the reset; with
            // plenty left this is a negligible gap.
            let gap = r / (n.min(u32::MAX as u64) as u32);
            if gap >= Duration::from_millis(1) {
                out.spacing = Some(gap.min(MAX_PAUSE));
            } else {
                out.clears_spacing = true;
            }
        }
        (Some(_), None) => out.clears_spacing = true,
        _ => {}
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date
/// in the past means "now" (zero).
///
/// The date is read by `httpdate`, which accepts the three forms RFC 9110
/// §5.6.7 obliges a recipient to accept (IMF-fixdate, and the obsolete
/// RFC 850 and asctime forms still sent by old servers); an RFC 2822 parser
/// knows only the first, so a throttled upstream's pause was ignored.
/// Two-digit RFC 850 years are resolved without a clock (70–99 are 19xx),
/// so the function stays pure: `now` is the only time it sees.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_PAUSE.as_secs())));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_PAUSE),
    )
}

/// A reset value: seconds from now, or an epoch time (values past year 2001
/// in seconds are epoch times; GitHub sends those).
fn reset_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let n: u64 = value.trim().parse().ok()?;
    let d = if n > 1_000_000_000 {
        match SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(n)) {
            Some(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
            None => MAX_PAUSE,
        }
    } else {
        Duration::from_secs(n)
    };
    Some(d.min(MAX_PAUSE))
}

/// A connector's `rate_limit` for one instance: in memory when requests
/// may come often, in the store when they are few (an interval of
/// [`STORED_INTERVAL`] or more, such as `4/1d`), so that restarts, and the
/// instance moving to another node, cannot spend the window again.
pub enum RateLimit {
    Local(DefaultDirectRateLimiter),
    Stored {
        store: crate::store::Store,
        /// The quota's key in the store (`rate:<instance>`).
        key: String,
        interval_ms: f64,
    },
}

/// A connector rate with at least this long between requests is counted
/// in the store: one durable write per request costs nothing at that
/// pace, and it is what long windows (`4/1d`, `100/1h`) need.
pub const STORED_INTERVAL: Duration = Duration::from_secs(10);

impl RateLimit {
    /// The limit of `rate` for the quota `key` (an instance's key).
    pub fn new(rate: Rate, key: &str, store: &crate::store::Store) -> RateLimit {
        let interval = rate.per / rate.count;
        if interval >= STORED_INTERVAL {
            RateLimit::Stored {
                store: store.clone(),
                key: format!("rate:{key}"),
                interval_ms: interval.as_secs_f64() * 1000.0,
            }
        } else {
            RateLimit::Local(limiter(rate, 1))
        }
    }

    /// Waits for the next request's turn. A stored quota whose next slot
    /// is further than [`WAIT_IN_POLL`] away is not waited for: the poll
    /// is put off until then (`Err(Deferred)`), nothing taken. A quota the
    /// store cannot answer for is an error: the request does not go.
    pub async fn until_ready(&self) -> Result<(), Deferred> {
        match self {
            RateLimit::Local(l) => {
                l.until_ready().await;
                Ok(())
            }
            RateLimit::Stored {
                store,
                key,
                interval_ms,
            } => loop {
                match store.take_quota(key, *interval_ms, 1).await {
                    Ok(None) => return Ok(()),
                    Ok(Some(wait)) if wait <= WAIT_IN_POLL => tokio::time::sleep(wait).await,
                    Ok(Some(wait)) => return Err(Deferred::Until(wait)),
                    Err(e) => return Err(Deferred::Store(e.to_string())),
                }
            },
        }
    }
}

/// The longest a poll waits for its connector's stored quota; a longer
/// wait puts the poll off instead (a shutdown must not wait for it).
pub const WAIT_IN_POLL: Duration = Duration::from_secs(5);

/// Why a stored quota did not let a request go.
#[derive(Debug, Clone, PartialEq)]
pub enum Deferred {
    /// Not before this long.
    Until(Duration),
    /// The store could not say.
    Store(String),
}

/// A rate limiter for `rate`, allowing `burst` at once.
pub fn limiter(rate: Rate, burst: u32) -> DefaultDirectRateLimiter {
    let period = rate.per / rate.count;
    let quota = Quota::with_period(period.max(std::time::Duration::from_nanos(1)))
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("burst >= 1"));
    RateLimiter::direct(quota)
}

/// Gates of every host: the configured ones, and one per other host met
/// (no quota, but its own pause, so a `Retry-After` is honoured everywhere).
#[derive(Default)]
pub struct HostGates {
    /// Configured gates with the quota each was built from (a reload
    /// replaces only the gates whose quota changed).
    configured: std::sync::RwLock<BTreeMap<String, (HostQuota, Arc<HostGate>)>>,
    others: Mutex<HashMap<String, Arc<HostGate>>>,
    /// Every host's counters since the start, by name. A reload that
    /// changes a host's quota builds a new gate, and one that drops the
    /// host drops its gate; the counters stay here and go on, so
    /// `pollhook_upstream_*_total` never go backwards.
    stats: Mutex<BTreeMap<String, Arc<HostStats>>>,
    /// The cluster, when the store is shared: quotas and pauses hold for
    /// every node.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Operational events (long pauses).
    ops: Option<Arc<crate::opsevents::Ops>>,
}

impl HostGates {
    pub fn new(hosts: &BTreeMap<String, HostQuota>) -> Self {
        Self::in_cluster(hosts, None, None)
    }

    /// Gates whose quotas and pauses are shared by `cluster`'s nodes.
    pub fn in_cluster(
        hosts: &BTreeMap<String, HostQuota>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        ops: Option<Arc<crate::opsevents::Ops>>,
    ) -> Self {
        let gates = HostGates {
            cluster,
            ops,
            ..HostGates::default()
        };
        gates.reconfigure(hosts);
        gates
    }

    /// Applies a pause or pace another node shared to `host`'s gate.
    pub fn apply_shared(&self, host: &str, paused_for: Duration, gap: Option<Duration>) {
        let gate = {
            let configured = self.configured.read().expect("hosts lock");
            configured.get(host).map(|(_, g)| g.clone())
        };
        let gate = gate.or_else(|| self.others.lock().expect("gates lock").get(host).cloned());
        if let Some(g) = gate {
            g.apply_shared(paused_for, gap);
        }
    }

    /// Applies the `hosts:` of a (re)loaded configuration: gates whose
    /// quota is unchanged keep their state (pauses, learned pace, queue);
    /// changed ones start afresh; requests already waiting at a replaced
    /// gate finish there.
    pub fn reconfigure(&self, hosts: &BTreeMap<String, HostQuota>) {
        let mut configured = self.configured.write().expect("hosts lock");
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
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let port = url.port_or_known_default();
        {
            let configured = self.configured.read().expect("hosts lock");
            if let Some(port) = port {
                if let Some((_, g)) = configured.get(&format!("{host}:{port}")) {
                    return g.clone();
                }
            }
            if let Some((_, g)) = configured.get(&host) {
                return g.clone();
            }
        }
        let key = match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        self.others
            .lock()
            .expect("gates lock")
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
            .expect("host stats lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every host's counters since the start (hosts no longer configured
    /// included), for `/metrics`.
    pub fn counters(&self) -> BTreeMap<String, Arc<HostStats>> {
        self.stats.lock().expect("host stats lock").clone()
    }

    /// Every gate's report, by host.
    pub fn report(&self) -> BTreeMap<String, HostReport> {
        let mut out: BTreeMap<String, HostReport> = self
            .configured
            .read()
            .expect("hosts lock")
            .iter()
            .map(|(k, (_, g))| (k.clone(), g.report()))
            .collect();
        for (k, g) in self.others.lock().expect("gates lock").iter() {
            out.insert(k.clone(), g.report());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        // Sun, 29 Nov 2026 10:00:00 GMT = 1795946400.
        let now = at(1_795_946_400);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 10:00:30", now),
            None,
            "no zone"
        );
        // Absurd values are capped, never a panic.
        assert_eq!(retry_after("18446744073709551615", now), Some(MAX_PAUSE));
        assert_eq!(reset_delay("18446744073709551615", now), Some(MAX_PAUSE));
    }

    #[test]
    fn retry_after_reads_the_three_http_date_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777; ask 90 s before it.
        let now = at(784_111_777 - 90);
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",  // IMF-fixdate
            "Sunday, 06-Nov-94 08:49:37 GMT", // RFC 850
            "Sun Nov  6 08:49:37 1994",       // asctime
        ] {
            assert_eq!(
                retry_after(form, now),
                Some(Duration::from_secs(90)),
                "{form}"
            );
            assert_eq!(
                retry_after(form, at(784_111_777 + 5)),
                Some(Duration::ZERO),
                "{form}: past means now"
            );
        }
        // A date years ahead is capped like delay-seconds are.
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at(0)),
            Some(MAX_PAUSE)
        );
    }

    #[test]
    fn throttling_answers_pause_and_rate_headers_space() {
        let now = at(1_795_946_400);
        assert_eq!(
            advice(429, &headers(&[("retry-after", "5")]), now).pause,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            advice(
                503,
                &headers(&[("retry-after", "Sun, 29 Nov 2026 10:00:02 GMT")]),
                now
            )
            .pause,
            Some(Duration::from_secs(2))
        );
        // Retry-After on a 200 means nothing.
        assert_eq!(
            advice(200, &headers(&[("retry-after", "5")]), now),
            Advice::default()
        );
        // Nothing left: pause until the reset (seconds, or GitHub's epoch).
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit-remaining", "0"), ("ratelimit-reset", "7")]),
                now
            )
            .pause,
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            advice(
                200,
                &headers(&[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1795946460")
                ]),
                now
            )
            .pause,
            Some(Duration::from_secs(60))
        );
        // 10 left over 20 s: one every 2 s.
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit-remaining", "10"), ("ratelimit-reset", "20")]),
                now
            )
            .spacing,
            Some(Duration::from_secs(2))
        );
        // The combined header.
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit", "limit=100, remaining=4, reset=8")]),
                now
            )
            .spacing,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            advice(200, &headers(&[("ratelimit", "\"default\";r=0;t=3")]), now).pause,
            Some(Duration::from_secs(3))
        );
        // Plenty left: no spacing, and an earlier one is cleared.
        let a = advice(
            200,
            &headers(&[("ratelimit-remaining", "100000"), ("ratelimit-reset", "1")]),
            now,
        );
        assert!(a.spacing.is_none() && a.clears_spacing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request_of_the_host_and_blind_429s_double() {
        let gate = HostGate::new("h".into(), None, Default::default(), None, None);
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
        let gate = HostGate::new("h".into(), None, Default::default(), None, None);
        // 20 requests within a second, then a 429.
        for _ in 0..20 {
            gate.acquire().await;
            tokio::time::advance(Duration::from_millis(40)).await;
        }
        gate.observe(429, &headers(&[("retry-after", "0")]));
        // 20 sent in the last second → 18/s from now on.
        let rate = gate.throttle.lock().unwrap().learned_rate().unwrap();
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
        let rate = gate.throttle.lock().unwrap().learned_rate().unwrap();
        assert!((23.0..23.2).contains(&rate), "{rate}");
        // Another refusal at that pace: down again, from the lower of the two.
        gate.observe(429, &headers(&[("retry-after", "0")]));
        let again = gate.throttle.lock().unwrap().learned_rate().unwrap();
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
            None,
            None,
        ));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (g, o) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                g.acquire().await;
                o.lock().unwrap().push(i);
            }));
            // Arrive one after the other.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
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
}
