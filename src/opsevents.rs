//! Operational events: pollhook telling the people who run it.
//!
//! `operations: { deliver_to: [ops-agent] }` routes pollhook's own events
//! (an instance failing and recovering, an endpoint disabled or enabled, a
//! circuit opening and closing, an event dead-lettered, a host throttling
//! pollhook) to endpoints, signed and delivered like any event: they are
//! queued in the same outbox (lane `pollhook/ops`), with the same retries
//! and order, and deterministic ids, so one occurrence is never announced
//! under two ids.
//!
//! Two rules keep them useful rather than noisy, both pure and tested here:
//! - **one per episode** ([`Episodes`]): an instance is announced failing
//!   once it failed `failing_after` times in a row or for `failing_for`,
//!   and recovered at its next success, once each;
//! - **a bound per window** ([`Flood`]): beyond `max_per_minute` events in a
//!   window, events are counted, not sent, and one
//!   `pollhook.ops.suppressed` summary says how many of each type were left
//!   out when the window closes.
//!
//! An event about an endpoint is never sent to that endpoint (an ops
//! endpoint that fails must not feed on its own failures).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::event::{event_id, Event};
use crate::store::{OutboxEntry, Store};

/// The outbox lane (instance key) of operational events.
pub const LANE: &str = "pollhook/ops";

/// `operations:` as resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct OpsPolicy {
    /// Endpoints that receive operational events.
    pub deliver_to: Vec<String>,
    /// An instance is failing after this many failures in a row...
    pub failing_after: u32,
    /// ...or after failing for this long, whichever comes first.
    pub failing_for: Duration,
    /// A host pause (429/503 with `Retry-After`) at least this long is
    /// announced.
    pub throttled_after: Duration,
    /// At most this many events per window; the rest are summarized.
    pub max_per_window: u32,
    /// The window of that bound (one minute; shorter in tests).
    pub window: Duration,
}

impl Default for OpsPolicy {
    fn default() -> Self {
        OpsPolicy {
            deliver_to: Vec::new(),
            failing_after: 5,
            failing_for: Duration::from_secs(300),
            throttled_after: Duration::from_secs(30),
            max_per_window: 30,
            window: Duration::from_secs(60),
        }
    }
}

/// What an instance's episode says to announce.
#[derive(Debug, Clone, PartialEq)]
pub enum Announce {
    Failing {
        first_failure_ms: i64,
        failures: u32,
    },
    Recovered {
        first_failure_ms: i64,
        failed_for_ms: i64,
        failures: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    failures: u32,
    first_failure_ms: i64,
    announced: bool,
}

/// Failure episodes of instances: what to announce, once each. Pure.
#[derive(Debug, Default)]
pub struct Episodes {
    open: HashMap<String, Episode>,
}

impl Episodes {
    /// `key` failed at `now_ms`: `Failing` the first time its episode
    /// crosses the policy's bound, `None` otherwise.
    pub fn failed(&mut self, key: &str, now_ms: i64, policy: &OpsPolicy) -> Option<Announce> {
        let e = self.open.entry(key.to_string()).or_insert(Episode {
            failures: 0,
            first_failure_ms: now_ms,
            announced: false,
        });
        e.failures += 1;
        let long = now_ms - e.first_failure_ms >= policy.failing_for.as_millis() as i64;
        if !e.announced && (e.failures >= policy.failing_after.max(1) || long) {
            e.announced = true;
            return Some(Announce::Failing {
                first_failure_ms: e.first_failure_ms,
                failures: e.failures,
            });
        }
        None
    }

    /// `key` succeeded at `now_ms`: `Recovered` when its episode was
    /// announced; the episode ends either way.
    pub fn succeeded(&mut self, key: &str, now_ms: i64) -> Option<Announce> {
        let e = self.open.remove(key)?;
        e.announced.then_some(Announce::Recovered {
            first_failure_ms: e.first_failure_ms,
            failed_for_ms: now_ms - e.first_failure_ms,
            failures: e.failures,
        })
    }

    /// An instance that stopped (removed, lease moved) forgets its episode.
    pub fn forget(&mut self, key: &str) {
        self.open.remove(key);
    }
}

/// The bound on events per window. Pure.
#[derive(Debug, Default)]
pub struct Flood {
    window_start_ms: i64,
    sent: u32,
    suppressed: BTreeMap<String, u64>,
}

impl Flood {
    /// Whether an event of `kind` at `now_ms` may go. First closes the
    /// window if it ended, returning its summary (types and counts left
    /// out) to send before anything else.
    pub fn admit(
        &mut self,
        kind: &str,
        now_ms: i64,
        policy: &OpsPolicy,
    ) -> (bool, Option<BTreeMap<String, u64>>) {
        let summary = self.close(now_ms, policy);
        if self.sent < policy.max_per_window {
            self.sent += 1;
            (true, summary)
        } else {
            *self.suppressed.entry(kind.to_string()).or_default() += 1;
            (false, summary)
        }
    }

    /// Ends the window if it is over: the summary of what it left out.
    pub fn close(&mut self, now_ms: i64, policy: &OpsPolicy) -> Option<BTreeMap<String, u64>> {
        let window = policy.window.as_millis() as i64;
        if now_ms - self.window_start_ms < window {
            return None;
        }
        self.window_start_ms = now_ms;
        self.sent = 0;
        let s = std::mem::take(&mut self.suppressed);
        (!s.is_empty()).then_some(s)
    }

    /// When the current window ends (to send its summary on time).
    pub fn window_end_ms(&self, policy: &OpsPolicy) -> Option<i64> {
        (!self.suppressed.is_empty())
            .then_some(self.window_start_ms + policy.window.as_millis() as i64)
    }
}

/// One operational event before it is queued.
#[derive(Debug, Clone)]
pub struct OpsEvent {
    pub kind: &'static str,
    /// The endpoint it is about, which never receives it.
    pub about_endpoint: Option<String>,
    /// What makes this occurrence unique (its id is derived from it).
    pub change_key: String,
    pub data: Value,
}

/// The operational events of one daemon: the episodes, and a channel to
/// the task that bounds, queues and announces them.
pub struct Ops {
    policy: Mutex<Arc<OpsPolicy>>,
    episodes: Mutex<Episodes>,
    /// Hosts whose announced pause is still running (host → until, ms).
    throttled: Mutex<HashMap<String, i64>>,
    tx: mpsc::UnboundedSender<OpsEvent>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<OpsEvent>>>,
}

impl Default for Ops {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Ops {
            policy: Mutex::new(Arc::new(OpsPolicy::default())),
            episodes: Mutex::default(),
            throttled: Mutex::default(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Ops {
    /// Applies `operations:` (at start and at each reload).
    pub fn configure(&self, policy: OpsPolicy) {
        *self.policy.lock() = Arc::new(policy);
    }

    pub fn policy(&self) -> Arc<OpsPolicy> {
        self.policy.lock().clone()
    }

    fn enabled(&self) -> bool {
        !self.policy().deliver_to.is_empty()
    }

    fn emit(&self, e: OpsEvent) {
        if self.enabled() {
            let _ = self.tx.send(e);
        }
    }

    /// A poll of `instance` failed.
    pub fn instance_failed(&self, key: &str, connector: &str, kind: &str, message: &str) {
        let now = crate::now_ms();
        let policy = self.policy();
        let a = self.episodes.lock().failed(key, now, &policy);
        if let Some(Announce::Failing {
            first_failure_ms,
            failures,
        }) = a
        {
            self.emit(OpsEvent {
                kind: "pollhook.instance.failing",
                about_endpoint: None,
                change_key: format!("{key}@{first_failure_ms}"),
                data: json!({
                    "instance": key,
                    "connector": connector,
                    "error_kind": kind,
                    "error": message,
                    "failures": failures,
                    "first_failure_at": rfc3339(first_failure_ms),
                }),
            });
        }
    }

    /// A poll of `instance` succeeded.
    pub fn instance_ok(&self, key: &str, connector: &str) {
        let now = crate::now_ms();
        let a = self.episodes.lock().succeeded(key, now);
        if let Some(Announce::Recovered {
            first_failure_ms,
            failed_for_ms,
            failures,
        }) = a
        {
            self.emit(OpsEvent {
                kind: "pollhook.instance.recovered",
                about_endpoint: None,
                change_key: format!("{key}@{first_failure_ms}"),
                data: json!({
                    "instance": key,
                    "connector": connector,
                    "failures": failures,
                    "first_failure_at": rfc3339(first_failure_ms),
                    "failed_for_seconds": failed_for_ms as f64 / 1000.0,
                }),
            });
        }
    }

    /// An endpoint was disabled (`410 Gone`, `circuit.disable_after`) or
    /// enabled again.
    pub fn endpoint_disabled(&self, endpoint: &str, why: &str) {
        let now = crate::now_ms();
        self.emit(OpsEvent {
            kind: "pollhook.endpoint.disabled",
            about_endpoint: Some(endpoint.to_string()),
            change_key: format!("{endpoint}@{now}"),
            data: json!({ "endpoint": endpoint, "reason": why }),
        });
    }

    pub fn endpoint_enabled(&self, endpoint: &str) {
        let now = crate::now_ms();
        self.emit(OpsEvent {
            kind: "pollhook.endpoint.enabled",
            about_endpoint: Some(endpoint.to_string()),
            change_key: format!("{endpoint}@{now}"),
            data: json!({ "endpoint": endpoint }),
        });
    }

    /// An endpoint's circuit opened (it kept failing) or closed (it
    /// answered again).
    pub fn circuit(&self, endpoint: &str, open: bool, failures: u32) {
        let now = crate::now_ms();
        let (kind, data) = if open {
            (
                "pollhook.endpoint.circuit_opened",
                json!({ "endpoint": endpoint, "failures": failures }),
            )
        } else {
            (
                "pollhook.endpoint.circuit_closed",
                json!({ "endpoint": endpoint }),
            )
        };
        self.emit(OpsEvent {
            kind,
            about_endpoint: Some(endpoint.to_string()),
            change_key: format!("{endpoint}@{now}"),
            data,
        });
    }

    /// An event ran out of attempts at `endpoint` (its body is not sent).
    #[allow(clippy::too_many_arguments)]
    pub fn dead_lettered(
        &self,
        endpoint: &str,
        event_id: &str,
        kind: &str,
        instance: &str,
        attempts: u32,
        last_error: Option<&str>,
    ) {
        if instance == LANE {
            // An operational event that died is logged, not announced
            // again (it would chase itself).
            return;
        }
        let source = instance.split('/').next().unwrap_or_default();
        self.emit(OpsEvent {
            kind: "pollhook.event.dead_lettered",
            about_endpoint: Some(endpoint.to_string()),
            change_key: format!("{endpoint}/{event_id}"),
            data: json!({
                "event_id": event_id,
                "type": kind,
                "source": source,
                "instance": instance,
                "endpoint": endpoint,
                "attempts": attempts,
                "last_error": last_error,
            }),
        });
    }

    /// A host paused pollhook for `pause` (a `429`/`503` with
    /// `Retry-After`): announced when at least `throttled_after`, once per
    /// pause (a pause extended while announced is the same one).
    pub fn host_paused(&self, host: &str, status: u16, pause: Duration) {
        let policy = self.policy();
        if pause < policy.throttled_after {
            return;
        }
        let now = crate::now_ms();
        let until = now + pause.as_millis() as i64;
        {
            let mut t = self.throttled.lock();
            let announced = t.entry(host.to_string()).or_insert(0);
            let running = *announced > now;
            *announced = (*announced).max(until);
            if running {
                // The same pause, extended: announced already.
                return;
            }
        }
        self.emit(OpsEvent {
            kind: "pollhook.quota.throttled",
            about_endpoint: None,
            change_key: format!("{host}@{now}"),
            data: json!({
                "host": host,
                "status": status,
                "pause_seconds": pause.as_secs_f64(),
                "until": rfc3339(until),
            }),
        });
    }

    /// Queues the events sent through this `Ops` until `shutdown`: bounds
    /// them per window, then writes each into the outbox of its endpoints
    /// (one durable write) and wakes their workers.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        live: Arc<crate::wake::Wakes>,
        shutdown: CancellationToken,
    ) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        let mut flood = Flood::default();
        let mut seq = 0u64;
        loop {
            let policy = self.policy();
            let wait = flood
                .window_end_ms(&policy)
                .map(|end| Duration::from_millis((end - crate::now_ms()).max(0) as u64));
            let next = tokio::select! {
                e = rx.recv() => match e { Some(e) => Some(e), None => return },
                _ = async { match wait { Some(w) => tokio::time::sleep(w).await, None => std::future::pending().await } } => None,
                _ = shutdown.cancelled() => return,
            };
            let now = crate::now_ms();
            let mut out = Vec::new();
            match next {
                Some(e) => {
                    let (send, summary) = flood.admit(e.kind, now, &policy);
                    out.extend(summary.map(|s| summary_event(&s, now)));
                    if send {
                        out.push(e);
                    }
                }
                None => out.extend(flood.close(now, &policy).map(|s| summary_event(&s, now))),
            }
            for e in out {
                seq = seq.max(now as u64 * 1000).saturating_add(1);
                queue(&store, &live, &policy, e, seq, &shutdown).await;
            }
        }
    }
}

/// The host gates tell the operational events of the pauses hosts impose
/// (quota owns the seam; it knows nothing of `Ops`).
impl crate::quota::PauseListener for Ops {
    fn host_paused(&self, host: &str, status: u16, pause: Duration) {
        Ops::host_paused(self, host, status, pause);
    }
}

fn summary_event(s: &BTreeMap<String, u64>, now: i64) -> OpsEvent {
    let total: u64 = s.values().sum();
    OpsEvent {
        kind: "pollhook.ops.suppressed",
        about_endpoint: None,
        change_key: format!("suppressed@{now}"),
        data: json!({ "suppressed": s, "total": total }),
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Writes one event into the outbox of every ops endpoint but the one it
/// is about, retrying while the store refuses (an operational event about
/// a store outage is worth waiting for), then wakes the workers.
async fn queue(
    store: &Store,
    live: &crate::wake::Wakes,
    policy: &OpsPolicy,
    e: OpsEvent,
    sequence: u64,
    shutdown: &CancellationToken,
) {
    let now = Utc::now();
    let ev = Event {
        id: event_id("pollhook", "ops", e.kind, &e.change_key),
        kind: e.kind.to_string(),
        timestamp: now,
        source: "pollhook".into(),
        instance: "ops".into(),
        sequence,
        data: e.data,
    };
    let body = ev.body();
    let deliveries: Vec<(String, OutboxEntry)> = policy
        .deliver_to
        .iter()
        .filter(|ep| Some(*ep) != e.about_endpoint.as_ref())
        .map(|ep| {
            (
                ep.clone(),
                OutboxEntry {
                    event_id: ev.id.clone(),
                    instance: LANE.into(),
                    kind: ev.kind.clone(),
                    sequence,
                    body: body.clone(),
                    attempts: 0,
                    next_attempt_ms: 0,
                    created_ms: now.timestamp_millis(),
                    last_error: None,
                },
            )
        })
        .collect();
    if deliveries.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(200);
    loop {
        match store.enqueue(&deliveries).await {
            Ok(()) => break,
            Err(e) => {
                warn!(event = %ev.id, r#type = %ev.kind, error = %format!("{e:#}"), "cannot queue an operational event; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!(event = %ev.id, r#type = %ev.kind, "operational event queued");
    for (ep, _) in &deliveries {
        if let Some(w) = live.wake(ep) {
            w.instance(LANE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OpsPolicy {
        OpsPolicy {
            deliver_to: vec!["ops".into()],
            failing_after: 3,
            failing_for: Duration::from_secs(60),
            max_per_window: 2,
            window: Duration::from_secs(10),
            ..OpsPolicy::default()
        }
    }

    #[test]
    fn one_failing_and_one_recovered_per_episode() {
        let p = policy();
        let mut e = Episodes::default();
        assert_eq!(e.failed("s/i", 1_000, &p), None);
        assert_eq!(e.failed("s/i", 2_000, &p), None);
        assert_eq!(
            e.failed("s/i", 3_000, &p),
            Some(Announce::Failing {
                first_failure_ms: 1_000,
                failures: 3
            })
        );
        // Still failing: nothing more.
        for t in 4..20 {
            assert_eq!(e.failed("s/i", t * 1_000, &p), None);
        }
        assert_eq!(
            e.succeeded("s/i", 30_000),
            Some(Announce::Recovered {
                first_failure_ms: 1_000,
                failed_for_ms: 29_000,
                failures: 19
            })
        );
        // A new episode starts from nothing.
        assert_eq!(e.succeeded("s/i", 31_000), None);
        assert_eq!(e.failed("s/i", 32_000, &p), None);
    }

    #[test]
    fn a_short_episode_is_never_announced_nor_its_recovery() {
        let p = policy();
        let mut e = Episodes::default();
        assert_eq!(e.failed("s/i", 0, &p), None);
        assert_eq!(e.failed("s/i", 1, &p), None);
        assert_eq!(e.succeeded("s/i", 2), None);
        // A forgotten episode is over: no recovery is announced for it,
        // and failures start counting again.
        for t in 0..3 {
            e.failed("s/j", t, &p);
        }
        e.forget("s/j");
        assert_eq!(e.succeeded("s/j", 10), None);
        e.failed("s/j", 20, &p);
        e.forget("s/j");
        assert_eq!(e.failed("s/j", 30, &p), None);
        assert_eq!(e.failed("s/j", 40, &p), None);
    }

    #[test]
    fn a_long_episode_is_announced_by_time_before_the_count() {
        let p = policy();
        let mut e = Episodes::default();
        assert_eq!(e.failed("s/i", 0, &p), None);
        assert_eq!(
            e.failed("s/i", 60_000, &p),
            Some(Announce::Failing {
                first_failure_ms: 0,
                failures: 2
            })
        );
        // Just under the time: not yet.
        assert_eq!(e.failed("s/k", 0, &p), None);
        assert_eq!(e.failed("s/k", 59_999, &p), None);
    }

    #[test]
    fn a_flood_is_bounded_per_window_and_summarized() {
        let p = policy();
        let mut f = Flood::default();
        let now = 100_000;
        assert_eq!(f.admit("a", now, &p), (true, None));
        assert_eq!(f.admit("a", now + 1, &p), (true, None));
        assert_eq!(f.admit("a", now + 2, &p), (false, None));
        assert_eq!(f.admit("b", now + 3, &p), (false, None));
        assert_eq!(f.admit("b", now + 4, &p), (false, None));
        assert_eq!(f.window_end_ms(&p), Some(now + 10_000));
        // Before the window ends nothing closes.
        assert_eq!(f.close(now + 9_999, &p), None);
        let want: BTreeMap<String, u64> = [("a".to_string(), 1), ("b".to_string(), 2)].into();
        assert_eq!(f.admit("c", now + 10_000, &p), (true, Some(want)));
        assert_eq!(f.window_end_ms(&p), None);
        assert_eq!(f.close(now + 30_000, &p), None, "nothing left out");
    }

    /// 2026-11-29T10:00:00Z, a fixed first failure the tests seed.
    const T: i64 = 1_795_946_400_000;

    /// An `Ops` routing to `deliver_to`, with the receiving end of its
    /// channel (what `run` would read).
    fn ops_with(deliver_to: &[&str]) -> (Ops, mpsc::UnboundedReceiver<OpsEvent>) {
        let ops = Ops::default();
        let rx = ops.rx.lock().take().expect("a fresh Ops has its receiver");
        ops.configure(OpsPolicy {
            deliver_to: deliver_to.iter().map(|s| s.to_string()).collect(),
            failing_after: 3,
            // Far longer than since T: only the count announces.
            failing_for: Duration::from_secs(u32::MAX as u64),
            ..OpsPolicy::default()
        });
        (ops, rx)
    }

    fn next(rx: &mut mpsc::UnboundedReceiver<OpsEvent>) -> OpsEvent {
        rx.try_recv().expect("an operational event")
    }

    fn nothing(rx: &mut mpsc::UnboundedReceiver<OpsEvent>) {
        if let Ok(e) = rx.try_recv() {
            panic!("unexpected {e:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(T + 123), "2026-11-29T10:00:00.123Z");
    }

    #[test]
    fn nothing_is_emitted_until_an_endpoint_receives_operational_events() {
        let ops = Ops::default();
        let mut rx = ops.rx.lock().take().unwrap();
        assert!(ops.policy().deliver_to.is_empty());
        ops.endpoint_enabled("x");
        ops.circuit("x", true, 3);
        nothing(&mut rx);
        let p = OpsPolicy {
            deliver_to: vec!["ops".into()],
            ..OpsPolicy::default()
        };
        ops.configure(p.clone());
        assert_eq!(*ops.policy(), p);
        ops.endpoint_enabled("x");
        assert_eq!(next(&mut rx).kind, "pollhook.endpoint.enabled");
    }

    #[test]
    fn an_instance_failing_then_recovering_is_announced_once_each() {
        let (ops, mut rx) = ops_with(&["ops"]);
        // Two failures at T, seeded, then the third through `Ops`.
        for _ in 0..2 {
            ops.episodes.lock().failed("s/i", T, &ops.policy());
        }
        ops.instance_failed("s/i", "conn", "http", "boom");
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.instance.failing");
        assert_eq!(e.about_endpoint, None);
        assert_eq!(e.change_key, format!("s/i@{T}"));
        assert_eq!(
            e.data,
            json!({
                "instance": "s/i",
                "connector": "conn",
                "error_kind": "http",
                "error": "boom",
                "failures": 3,
                "first_failure_at": "2026-11-29T10:00:00.000Z",
            })
        );
        ops.instance_failed("s/i", "conn", "http", "boom");
        nothing(&mut rx);
        let before = crate::now_ms();
        ops.instance_ok("s/i", "conn");
        let after = crate::now_ms();
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.instance.recovered");
        assert_eq!(e.about_endpoint, None);
        assert_eq!(e.change_key, format!("s/i@{T}"), "the episode's key");
        assert_eq!(e.data["instance"], "s/i");
        assert_eq!(e.data["connector"], "conn");
        assert_eq!(e.data["failures"], 4);
        assert_eq!(e.data["first_failure_at"], "2026-11-29T10:00:00.000Z");
        let secs = e.data["failed_for_seconds"].as_f64().unwrap();
        let (lo, hi) = ((before - T) as f64 / 1000.0, (after - T) as f64 / 1000.0);
        assert!((lo..=hi).contains(&secs), "{secs} not in {lo}..={hi}");
        // The episode is over: a success says nothing more.
        ops.instance_ok("s/i", "conn");
        nothing(&mut rx);
    }

    #[test]
    fn endpoint_events_say_which_endpoint_and_why() {
        let (ops, mut rx) = ops_with(&["ops"]);
        let before = crate::now_ms();
        ops.endpoint_disabled("hook", "410 Gone");
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.endpoint.disabled");
        assert_eq!(e.about_endpoint.as_deref(), Some("hook"));
        assert_eq!(e.data, json!({ "endpoint": "hook", "reason": "410 Gone" }));
        let at: i64 = e.change_key.strip_prefix("hook@").unwrap().parse().unwrap();
        assert!((before..=crate::now_ms()).contains(&at), "{}", e.change_key);

        ops.endpoint_enabled("hook");
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.endpoint.enabled");
        assert_eq!(e.about_endpoint.as_deref(), Some("hook"));
        assert_eq!(e.data, json!({ "endpoint": "hook" }));
        assert!(e.change_key.starts_with("hook@"), "{}", e.change_key);

        ops.circuit("hook", true, 7);
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.endpoint.circuit_opened");
        assert_eq!(e.about_endpoint.as_deref(), Some("hook"));
        assert_eq!(e.data, json!({ "endpoint": "hook", "failures": 7 }));
        assert!(e.change_key.starts_with("hook@"), "{}", e.change_key);

        ops.circuit("hook", false, 0);
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.endpoint.circuit_closed");
        assert_eq!(e.about_endpoint.as_deref(), Some("hook"));
        assert_eq!(e.data, json!({ "endpoint": "hook" }));
        nothing(&mut rx);
    }

    #[test]
    fn a_dead_letter_is_announced_unless_it_is_an_operational_event() {
        let (ops, mut rx) = ops_with(&["ops"]);
        ops.dead_lettered("hook", "msg_1", "gh.issue", LANE, 5, Some("500"));
        nothing(&mut rx);
        ops.dead_lettered("hook", "msg_2", "gh.issue", "github/acme", 5, Some("500"));
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.event.dead_lettered");
        assert_eq!(e.about_endpoint.as_deref(), Some("hook"));
        assert_eq!(e.change_key, "hook/msg_2");
        assert_eq!(
            e.data,
            json!({
                "event_id": "msg_2",
                "type": "gh.issue",
                "source": "github",
                "instance": "github/acme",
                "endpoint": "hook",
                "attempts": 5,
                "last_error": "500",
            })
        );
    }

    #[test]
    fn a_long_host_pause_is_announced_once_while_it_runs() {
        let (ops, mut rx) = ops_with(&["ops"]);
        let listener: &dyn crate::quota::PauseListener = &ops;
        let bound = ops.policy().throttled_after;
        // Shorter than `throttled_after`: not worth a word.
        listener.host_paused("api.example", 429, bound - Duration::from_millis(1));
        nothing(&mut rx);
        // Exactly `throttled_after`: announced, through the quota's seam.
        let before = crate::now_ms();
        listener.host_paused("api.example", 429, bound);
        let after = crate::now_ms();
        let e = next(&mut rx);
        assert_eq!(e.kind, "pollhook.quota.throttled");
        assert_eq!(e.about_endpoint, None);
        assert_eq!(e.data["host"], "api.example");
        assert_eq!(e.data["status"], 429);
        assert_eq!(e.data["pause_seconds"], bound.as_secs_f64());
        let at: i64 = e
            .change_key
            .strip_prefix("api.example@")
            .unwrap()
            .parse()
            .unwrap();
        assert!((before..=after).contains(&at), "{}", e.change_key);
        let until = chrono::DateTime::parse_from_rfc3339(e.data["until"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        assert_eq!(until, at + bound.as_millis() as i64);
        // The same pause, extended while it runs: said already; it is
        // remembered until its new end.
        let longer = bound * 4;
        ops.host_paused("api.example", 503, longer);
        nothing(&mut rx);
        let remembered = ops.throttled.lock()["api.example"];
        assert!(
            remembered >= before + longer.as_millis() as i64,
            "{remembered}"
        );
        // Another host's pause is its own.
        ops.host_paused("other.example", 503, bound);
        assert_eq!(next(&mut rx).data["host"], "other.example");
        // Once the pause is over, the next one is announced again.
        *ops.throttled.lock().get_mut("api.example").unwrap() = crate::now_ms() - 1;
        ops.host_paused("api.example", 429, bound);
        assert_eq!(next(&mut rx).data["host"], "api.example");
        nothing(&mut rx);
    }

    /// The outbox entries of `endpoint`, as the store has them.
    async fn outbox(store: &Store, endpoint: &str) -> Vec<OutboxEntry> {
        let page = store.outbox_page(endpoint, None, 100).await.unwrap();
        page.into_iter().map(|(_, e)| e).collect()
    }

    #[tokio::test]
    async fn an_event_is_queued_for_every_ops_endpoint_but_the_one_it_is_about() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let live = crate::wake::Wakes::default();
        let wake_a = live.get_or_insert("a");
        let wake_b = live.get_or_insert("b");
        let policy = OpsPolicy {
            deliver_to: vec!["a".into(), "b".into(), "c".into()],
            ..OpsPolicy::default()
        };
        let e = OpsEvent {
            kind: "pollhook.endpoint.disabled",
            about_endpoint: Some("b".into()),
            change_key: "b@1".into(),
            data: json!({ "endpoint": "b" }),
        };
        let shutdown = CancellationToken::new();
        queue(&store, &live, &policy, e, 42, &shutdown).await;
        assert!(outbox(&store, "b").await.is_empty(), "never about itself");
        for ep in ["a", "c"] {
            let got = outbox(&store, ep).await;
            assert_eq!(got.len(), 1, "{ep}: {got:?}");
            let q = &got[0];
            let id = event_id("pollhook", "ops", "pollhook.endpoint.disabled", "b@1");
            assert_eq!(q.event_id, id);
            assert_eq!(q.instance, LANE);
            assert_eq!(q.kind, "pollhook.endpoint.disabled");
            assert_eq!(q.sequence, 42);
            assert_eq!((q.attempts, q.next_attempt_ms), (0, 0));
            let body: Value = serde_json::from_str(&q.body).unwrap();
            assert_eq!(body["data"], json!({ "endpoint": "b" }));
        }
        // The workers that have a wake-up are told where to look.
        assert_eq!(wake_a.take(), [LANE.to_string()].into());
        assert!(wake_b.take().is_empty());

        // An event about the only ops endpoint goes nowhere.
        let only_b = OpsPolicy {
            deliver_to: vec!["b".into()],
            ..OpsPolicy::default()
        };
        let e = OpsEvent {
            kind: "pollhook.endpoint.enabled",
            about_endpoint: Some("b".into()),
            change_key: "b@2".into(),
            data: json!({}),
        };
        queue(&store, &live, &only_b, e, 43, &shutdown).await;
        assert!(outbox(&store, "b").await.is_empty());
        assert!(wake_b.take().is_empty());
    }

    /// Waits (with a deadline) until `endpoint`'s outbox holds `n` entries.
    async fn wait_for_entries(store: &Store, endpoint: &str, n: usize) -> Vec<OutboxEntry> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = outbox(store, endpoint).await;
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} entries: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The task queues what it is sent, keeps the bound per window, sends
    /// the window's summary when it closes (with nothing else arriving),
    /// and stops at shutdown.
    #[tokio::test]
    async fn the_task_queues_bounds_and_summarizes_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let live = Arc::new(crate::wake::Wakes::default());
        let ops = Arc::new(Ops::default());
        ops.configure(OpsPolicy {
            deliver_to: vec!["ops".into()],
            max_per_window: 1,
            // Long enough that the three events below land in one window.
            window: Duration::from_secs(2),
            ..OpsPolicy::default()
        });
        let shutdown = CancellationToken::new();
        let start = crate::now_ms();
        let task = tokio::spawn(ops.clone().run(store.clone(), live, shutdown.clone()));
        ops.circuit("x", true, 3);
        ops.endpoint_disabled("x", "gone");
        ops.endpoint_enabled("x");
        let first = wait_for_entries(&store, "ops", 1).await;
        assert_eq!(first[0].kind, "pollhook.endpoint.circuit_opened");
        let got = wait_for_entries(&store, "ops", 2).await;
        let closed = crate::now_ms();
        assert_eq!(got.len(), 2, "{got:?}");
        let s = &got[1];
        assert_eq!(s.kind, "pollhook.ops.suppressed");
        let body: Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(
            body["data"],
            json!({
                "suppressed": {
                    "pollhook.endpoint.disabled": 1,
                    "pollhook.endpoint.enabled": 1,
                },
                "total": 2,
            })
        );
        assert!(
            closed - start >= 2_000,
            "summarized before the window closed"
        );
        // Sequences rise, from the time in microseconds (a restart never
        // reuses one).
        assert!(got[0].sequence > start as u64 * 1000, "{got:?}");
        assert!(s.sequence > got[0].sequence);
        assert!(s.sequence <= closed as u64 * 1000 + 1, "{got:?}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task stops at shutdown")
            .unwrap();
        // Its receiver was taken once: a second run has nothing to read.
        let again = ops
            .clone()
            .run(store, Arc::default(), CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect("a second run returns at once");
    }
}
