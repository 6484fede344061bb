//! Live status of instances and endpoints, shared by the workers (writers)
//! and the admin server (reader). In memory only: the store holds what must
//! survive a restart; this holds what an operator looks at.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// One instance's polling status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstanceStatus {
    pub source: String,
    pub instance: String,
    pub connector: String,
    /// When the last poll ended (ms since the epoch).
    pub last_poll_ms: Option<i64>,
    /// When the last successful poll ended.
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
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub polls_not_modified: u64,
    pub events: u64,
    pub cursor: Option<String>,
}

/// One endpoint's delivery status.
#[derive(Debug, Clone, Default, Serialize)]
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
    /// Events waiting for this endpoint. Kept by its delivery worker (a
    /// count at start, then what pollers add and deliveries remove), so
    /// `/status` and `/metrics` never scan the outbox.
    pub queue_depth: u64,
    /// When the oldest waiting event was detected (ms since the epoch).
    pub oldest_pending_ms: Option<i64>,
    /// Dead letters of this endpoint (counted at start, then kept).
    pub dead_letters: u64,
}

/// Everything the admin server shows.
#[derive(Default)]
pub struct Status {
    instances: Mutex<BTreeMap<String, InstanceStatus>>,
    endpoints: Mutex<BTreeMap<String, EndpointStatus>>,
    discovery: Mutex<BTreeMap<String, DiscoveryStatus>>,
    config: Mutex<ConfigStatus>,
    metrics: Mutex<Metrics>,
    ready: AtomicBool,
    /// Delivery workers running now (see [`WorkerGuard`]).
    workers_alive: std::sync::atomic::AtomicUsize,
}

/// Counts a delivery worker as alive until dropped: when its task ends,
/// panics included, `/readyz` sees one fewer than there are endpoints.
pub struct WorkerGuard(std::sync::Arc<Status>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.0.workers_alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Upper bounds (seconds) of the histograms' buckets: from a 304 on
/// loopback to a delivery that waited out a receiver's outage.
pub const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];

/// A Prometheus histogram over [`BUCKETS`] (counts per bucket, not
/// cumulative; the exposition sums them).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// Aggregates for `/metrics` that the per-instance status does not hold.
/// Labelled by source and endpoint, never by instance: 10,000 instances
/// must not make 10,000 series per family.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Poll durations by (source, connector), whatever the outcome.
    pub poll_duration: BTreeMap<(String, String), Histogram>,
    /// Events detected by (source, type).
    pub events: BTreeMap<(String, String), u64>,
    /// Delivery attempts' HTTP round trip, by endpoint.
    pub attempt_duration: BTreeMap<String, Histogram>,
    /// From detection to the successful delivery, by endpoint.
    pub delivery_lag: BTreeMap<String, Histogram>,
}

/// The configuration's reloads (SIGHUP).
#[derive(Debug, Clone, Default, Serialize)]
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
#[derive(Debug, Clone, Default, Serialize)]
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
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// A delivery worker starts; alive until the guard drops.
    pub fn worker_alive(self: &std::sync::Arc<Self>) -> WorkerGuard {
        self.workers_alive.fetch_add(1, Ordering::SeqCst);
        WorkerGuard(self.clone())
    }

    pub fn workers_alive(&self) -> usize {
        self.workers_alive.load(Ordering::SeqCst)
    }

    /// Adds an instance that starts polling. One restarted by a reload
    /// keeps its counters, so `/metrics` counters never go backwards.
    pub fn register_instance(&self, key: &str, f: impl FnOnce(&mut InstanceStatus)) {
        let mut m = self.instances.lock().expect("status lock");
        let mut s = InstanceStatus::default();
        if let Some(old) = m.get(key) {
            s.polls_ok = old.polls_ok;
            s.polls_failed = old.polls_failed;
            s.polls_not_modified = old.polls_not_modified;
            s.events = old.events;
            s.seen_evicted = old.seen_evicted;
        }
        f(&mut s);
        m.insert(key.to_string(), s);
    }

    /// Updates one instance's status. An instance that was removed (it left
    /// a discovered list while a poll was in flight) is not brought back.
    pub fn instance(&self, key: &str, f: impl FnOnce(&mut InstanceStatus)) {
        let mut m = self.instances.lock().expect("status lock");
        if let Some(s) = m.get_mut(key) {
            f(s);
        }
    }

    /// Drops an instance that no longer runs (left a discovered list).
    pub fn remove_instance(&self, key: &str) {
        self.instances.lock().expect("status lock").remove(key);
    }

    /// Drops everything shown about a source (removed by a reload).
    pub fn remove_source(&self, source: &str) {
        let prefix = format!("{source}/");
        self.instances
            .lock()
            .expect("status lock")
            .retain(|k, _| !k.starts_with(&prefix));
        self.discovery.lock().expect("status lock").remove(source);
    }

    /// Drops an endpoint removed by a reload.
    pub fn remove_endpoint(&self, name: &str) {
        self.endpoints.lock().expect("status lock").remove(name);
    }

    /// Records a reload: applied with its warnings, or refused and why.
    pub fn reloaded(&self, outcome: Result<Vec<String>, String>) {
        let mut c = self.config.lock().expect("status lock");
        c.last_reload_ms = Some(crate::now_ms());
        c.last_reload_ok = Some(outcome.is_ok());
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
        let mut m = self.metrics.lock().expect("metrics lock");
        m.poll_duration
            .entry((source.to_string(), connector.to_string()))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// An event of `kind` was committed for delivery.
    pub fn count_event(&self, source: &str, kind: &str) {
        let mut m = self.metrics.lock().expect("metrics lock");
        *m.events
            .entry((source.to_string(), kind.to_string()))
            .or_default() += 1;
    }

    /// A delivery attempt took `took`; `lag` is detection → delivered when
    /// it succeeded.
    pub fn observe_delivery(
        &self,
        endpoint: &str,
        took: std::time::Duration,
        lag: Option<std::time::Duration>,
    ) {
        let mut m = self.metrics.lock().expect("metrics lock");
        m.attempt_duration
            .entry(endpoint.to_string())
            .or_default()
            .observe(took.as_secs_f64());
        if let Some(lag) = lag {
            m.delivery_lag
                .entry(endpoint.to_string())
                .or_default()
                .observe(lag.as_secs_f64());
        }
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.lock().expect("metrics lock").clone()
    }

    pub fn config(&self) -> ConfigStatus {
        self.config.lock().expect("status lock").clone()
    }

    /// Updates one discovering source's status.
    pub fn discovery(&self, source: &str, f: impl FnOnce(&mut DiscoveryStatus)) {
        let mut m = self.discovery.lock().expect("status lock");
        f(m.entry(source.to_string()).or_default());
    }

    pub fn discoveries(&self) -> BTreeMap<String, DiscoveryStatus> {
        self.discovery.lock().expect("status lock").clone()
    }

    /// Updates one endpoint's status.
    pub fn endpoint(&self, name: &str, f: impl FnOnce(&mut EndpointStatus)) {
        let mut m = self.endpoints.lock().expect("status lock");
        f(m.entry(name.to_string()).or_default());
    }

    pub fn instances(&self) -> BTreeMap<String, InstanceStatus> {
        self.instances.lock().expect("status lock").clone()
    }

    pub fn endpoints(&self) -> BTreeMap<String, EndpointStatus> {
        self.endpoints.lock().expect("status lock").clone()
    }
}
