//! The supervisor: starts, restarts and stops the daemon's tasks to match
//! a configuration, at start and at each reload, and keeps the store's
//! record of which instances are still configured.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Instance, Source};
use crate::connector::fetch::FetchEnv;
use crate::deliver::worker::Worker;
use crate::poll::Roster;
use crate::reload::Unit;
use crate::runtime::{Shared, Tasks};

/// Starts, restarts and stops the daemon's tasks to match a configuration.
pub(super) struct Supervisor {
    pub(super) shared: Arc<Shared>,
    /// Two delivery clients: the SSRF guard on, and off for `allow_private`.
    pub(super) guarded: reqwest::Client,
    pub(super) unguarded: reqwest::Client,
    /// One delivery worker per endpoint, and the fingerprint it runs.
    pub(super) workers: Tasks,
    pub(super) worker_fps: BTreeMap<String, u64>,
    /// Discovery loops, by source name.
    pub(super) pollers: Tasks,
    /// Every instance configured (static or discovered), with a poll task
    /// for those this node holds the lease of.
    pub(super) roster: Arc<Roster>,
    /// The fingerprint each unit runs (see [`crate::reload::units`]):
    /// instances and discovering sources. Keyed by the instance's own key
    /// (shared with its configuration's `Instance`, not a copy).
    pub(super) poller_fps: BTreeMap<Arc<str>, u64>,
    /// What runs now (`None` before the first `apply`).
    pub(super) config: Option<Config>,
    pub(super) shutdown: CancellationToken,
}

/// What an [`Supervisor::apply`] did, for the one line the reload logs.
#[derive(Default)]
struct Tally {
    started: usize,
    restarted: usize,
    stopped: usize,
}

impl Supervisor {
    /// SIGHUP: read the bridge file again; apply it only when it is valid.
    pub(super) async fn reload(&mut self) {
        let old = self.config.as_ref().expect("applied");
        let file = old.file.clone();
        info!(file = %file.display(), "reload: reading the configuration again");
        let outcome = match Config::load(&file) {
            Err(e) => Err(format!("{e}")),
            Ok(new) => match crate::reload::refusal(old, &new) {
                Some(why) => Err(why),
                None => Ok(new),
            },
        };
        match outcome {
            Err(why) => {
                error!("reload refused, the running configuration stays: {why}");
                self.shared.status.reloaded(Err(why));
            }
            Ok(new) => {
                let mut warnings = crate::reload::warnings(old, &new);
                // What `validate` warns about (`token: none` beyond loopback).
                warnings.extend(new.warnings.iter().cloned());
                for w in &warnings {
                    warn!("reload: {w}");
                }
                let summary = self.apply(new).await;
                info!("reload done: {summary}");
                self.shared.status.reloaded(Ok(warnings));
            }
        }
    }

    /// Makes the running tasks match `new`: unchanged units keep running
    /// untouched, changed ones stop (finishing an in-flight poll or
    /// delivery) and start again on their stored state, removed ones stop
    /// and their state is kept for the source's `retention`.
    pub(super) async fn apply(&mut self, new: Config) -> String {
        let shared = self.shared.clone();
        let mut tally = Tally::default();
        shared.ops.configure(new.operations.clone());
        *shared.live.user_agent.write() = new.user_agent.as_deref().map(Arc::from);

        // Endpoints first, so new sources find their wake-ups.
        let eps = crate::reload::endpoints(&new);
        self.stop_removed_workers(&eps, &mut tally);
        self.start_changed_workers(&new, &eps, &mut tally).await;

        shared.hosts.reconfigure(&new.hosts);
        shared
            .live
            .set_admin(new.admin_token.clone(), new.admin_allowed_hosts.clone());

        let units = crate::reload::units(&new);
        let now = crate::now_ms();
        self.stop_removed_units(&units, &mut tally);
        self.start_changed_units(&units, &mut tally).await;
        self.mark_removed_states(&units, now).await;
        self.config = Some(new);
        self.sweep().await;
        let Tally {
            started,
            restarted,
            stopped,
        } = tally;
        format!("{started} started, {restarted} restarted, {stopped} stopped, the rest untouched")
    }

    /// Stops the workers of endpoints no longer configured. Their queued
    /// events stay in the store (and are said to, with how many), so an
    /// endpoint put back later sends them.
    fn stop_removed_workers(&mut self, eps: &BTreeMap<String, u64>, tally: &mut Tally) {
        let shared = &self.shared;
        for name in self.worker_fps.keys().cloned().collect::<Vec<_>>() {
            if !eps.contains_key(&name) {
                self.workers.stop(&name);
                self.worker_fps.remove(&name);
                shared.live.wakes.remove(&name);
                shared.status.remove_endpoint(&name);
                let queued = shared
                    .status
                    .endpoints()
                    .get(&name)
                    .map_or(0, |s| s.queue_depth);
                warn!(endpoint = %name, queued, "endpoint removed from the configuration: its worker stops; queued events stay in the store until it comes back");
                tally.stopped += 1;
            }
        }
    }

    /// Starts a worker for each new endpoint and restarts those whose
    /// fingerprint changed; those unchanged keep running untouched.
    async fn start_changed_workers(
        &mut self,
        new: &Config,
        eps: &BTreeMap<String, u64>,
        tally: &mut Tally,
    ) {
        let shared = self.shared.clone();
        for (name, fp) in eps {
            if self.worker_fps.get(name) == Some(fp) {
                continue;
            }
            let ep = new.endpoints[name].clone();
            let wake = shared.live.wakes.get_or_insert(name);
            shared.status.endpoint(name, |_| {});
            let worker = Worker {
                client: if ep.allow_private {
                    self.unguarded.clone()
                } else {
                    self.guarded.clone()
                },
                endpoint: ep,
                store: shared.store.clone(),
                status: shared.status.clone(),
                wake: wake.clone(),
                cluster: shared.cluster.clone(),
                ops: shared.ops.clone(),
            };
            let token = self.shutdown.child_token();
            if self.worker_fps.insert(name.clone(), *fp).is_some() {
                tally.restarted += 1;
                info!(endpoint = %name, "endpoint changed: worker restarts");
            } else {
                tally.started += 1;
            }
            self.workers
                .start(name, token.clone(), worker.run(token))
                .await;
            // Whatever the stopped worker left is the new one's to send.
            wake.rescan();
        }
    }

    /// Stops the poll tasks and discovery loops of units no longer
    /// configured, and drops them from the status; their stored state is
    /// kept for the retention period (see [`Self::mark_removed_states`]).
    fn stop_removed_units(&mut self, units: &BTreeMap<Arc<str>, Unit>, tally: &mut Tally) {
        for key in self.poller_fps.keys().cloned().collect::<Vec<_>>() {
            if units.contains_key(&key) {
                continue;
            }
            self.pollers.stop(&key);
            self.roster.stop(&key);
            self.poller_fps.remove(&key);
            tally.stopped += 1;
            if key.contains('/') {
                self.shared.status.remove_instance(&key);
            } else {
                self.shared.status.remove_source(&key);
            }
            info!(unit = %key, "removed from the configuration: stopped, state kept for the retention period");
        }
    }

    /// Starts a task for each new unit (a static instance's poll loop, or a
    /// discovering source's listing loop) and restarts those whose
    /// fingerprint changed; those unchanged keep running untouched.
    async fn start_changed_units(&mut self, units: &BTreeMap<Arc<str>, Unit>, tally: &mut Tally) {
        let shared = self.shared.clone();
        for (key, unit) in units {
            if self.poller_fps.get(key) == Some(&unit.fingerprint) {
                continue;
            }
            if self
                .poller_fps
                .insert(key.clone(), unit.fingerprint)
                .is_some()
            {
                tally.restarted += 1;
                info!(unit = %key, "changed: restarts on its stored state");
            } else {
                tally.started += 1;
            }
            // A restarted unit waits for its old task's in-flight poll, so
            // two tasks never commit the same state.
            match &unit.instance {
                Some(inst) => self.roster.start(unit.source.clone(), inst.clone()).await,
                None => {
                    let token = self.shutdown.child_token();
                    let task = discover_loop(
                        shared.clone(),
                        self.roster.clone(),
                        unit.source.clone(),
                        token.clone(),
                    );
                    self.pollers.start(key, token, task).await;
                }
            }
        }
    }

    /// Stored states no unit polls any more are deleted after the
    /// retention of the source that had them (the default when that
    /// source is unknown: configuration changed while stopped); those
    /// polled again are kept. Runs before `self.config` becomes the new
    /// configuration: the retention is the old one's.
    async fn mark_removed_states(&self, units: &BTreeMap<Arc<str>, Unit>, now: i64) {
        let shared = &self.shared;
        let old_retention = |key: &str| {
            let src = key.split_once('/').map_or(key, |(s, _)| s);
            self.config
                .as_ref()
                .and_then(|c| c.source(src))
                .map_or(crate::config::DEFAULT_RETENTION, |s| s.retention)
        };
        match shared.store.state_keys().await {
            Ok(keys) => {
                for key in keys {
                    let res = if crate::reload::owns(units, &key) {
                        shared.store.unmark_removed(&key).await
                    } else {
                        let at = now + old_retention(&key).as_millis() as i64;
                        shared.store.mark_removed(&key, at).await
                    };
                    if let Err(e) = res {
                        warn!(instance = %key, error = %format!("{e:#}"), "cannot record whether the instance is still configured");
                    }
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "cannot list stored instance states"),
        }
    }

    /// Store care, hourly and after each (re)load: forgets old delivery
    /// history and dead letters past `store:` retention, and deletes the
    /// state of instances removed longer than their retention.
    pub(super) async fn sweep(&self) {
        let config = self.config.as_ref().expect("applied");
        let policy = crate::store::retention::Policy {
            history: config.history_retention,
            dead_letters: config.dead_letter_retention,
        };
        let (swept, errors) =
            crate::store::retention::sweep(&self.shared.store, policy, crate::now_ms()).await;
        if swept.attempts > 0 {
            info!(
                attempts = swept.attempts,
                "delivery history older than store.history forgotten"
            );
        }
        if swept.dead_letters > 0 {
            warn!(
                dead_letters = swept.dead_letters,
                "dead letters older than store.dead_letters deleted"
            );
            self.shared
                .status
                .recount_dead_letters(&self.shared.store)
                .await;
        }
        for key in swept.states {
            info!(instance = %key, "removed from the configuration longer than its retention: state deleted");
        }
        for e in errors {
            warn!("{e}");
        }
    }
}

/// A `for_each: discover` source: its listing loop and one poll task per
/// instance it finds.
pub(super) async fn discover_loop(
    shared: Arc<Shared>,
    roster: Arc<Roster>,
    source: Arc<Source>,
    shutdown: CancellationToken,
) {
    // A connector's `rate_limit` is its quota per instance (the
    // listing request of a discovering source counts as one more).
    let rate_limit = source.connector.rate_limit.map(|r| {
        Arc::new(crate::quota::RateLimit::new(
            r,
            &crate::cluster::discover_key(&source.name),
            &shared.store,
        ))
    });
    let env = FetchEnv {
        client: &shared.client,
        hosts: &shared.hosts,
        rate_limit: rate_limit.as_deref(),
        tokens: &shared.tokens,
        user_agent: shared.live.user_agent(),
    };
    let cx = crate::discover::DiscoverEnv {
        store: &shared.store,
        status: &shared.status,
        env,
        cluster: shared.cluster.clone(),
    };
    // Each instance found joins the roster (which polls it while this
    // node holds its lease) until discovery loses it or the daemon stops.
    let spawn = |inst: Instance, token: CancellationToken| {
        let (roster, source) = (roster.clone(), source.clone());
        async move {
            let key = inst.key.clone();
            roster.start(source, Arc::new(inst)).await;
            token.cancelled().await;
            roster.stop(&key);
        }
    };
    crate::discover::run_source(source.clone(), cx, spawn, shutdown).await;
}
