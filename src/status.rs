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
    /// `circuit.disable_after`); nothing is sent to it until a restart.
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
}

/// Everything the admin server shows.
#[derive(Default)]
pub struct Status {
    instances: Mutex<BTreeMap<String, InstanceStatus>>,
    endpoints: Mutex<BTreeMap<String, EndpointStatus>>,
    discovery: Mutex<BTreeMap<String, DiscoveryStatus>>,
    config: Mutex<ConfigStatus>,
    ready: AtomicBool,
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
