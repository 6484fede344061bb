//! `pollhook run`: one task per instance (schedule → fetch → detect →
//! commit), one delivery worker per endpoint, the admin server, and an
//! orderly shutdown.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Instance, Source};
use crate::connector::auth::TokenCache;
use crate::connector::detect::{detect, Detection};
use crate::connector::fetch::{fetch, FetchEnv, Fetched, PollError};
use crate::connector::mask;
use crate::deliver::worker::{delivery_client, Wake, Worker, USER_AGENT_VALUE};
use crate::discover::Running;
use crate::event::{event_id, Event};
use crate::quota::{limiter, HostGates};
use crate::schedule::first_due;
use crate::schedule::{adapt, error_backoff};
use crate::status::{PollOutcome, Status};
use crate::store::{InstanceState, OutboxEntry, Store};

/// What pollers share.
struct Shared {
    store: Store,
    status: Arc<Status>,
    client: reqwest::Client,
    hosts: Arc<HostGates>,
    /// OAuth2 tokens shared by every instance.
    tokens: TokenCache,
    /// What a reload may change under running tasks.
    live: Arc<Live>,
}

/// The parts of the running configuration that pollers and the admin
/// server read while a reload may replace them.
#[derive(Default)]
pub struct Live {
    /// Delivery workers' wake-ups, by endpoint: pollers poke them after a
    /// commit, the admin server after a replay. A restarted worker keeps
    /// its endpoint's `Wake`.
    pub wakes: RwLock<BTreeMap<String, Arc<Wake>>>,
    /// The admin bearer token (`admin.token`), rotated by a reload.
    pub admin_token: RwLock<Option<String>>,
}

impl Live {
    pub fn wake(&self, endpoint: &str) -> Option<Arc<Wake>> {
        self.wakes
            .read()
            .expect("wakes lock")
            .get(endpoint)
            .cloned()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.wakes
            .read()
            .expect("wakes lock")
            .keys()
            .cloned()
            .collect()
    }
}

/// The client for polling upstreams.
pub fn poll_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(USER_AGENT_VALUE)
        // Redirects within the same host only (at most 5): a redirect to
        // another host would carry the connector's credentials (an API key
        // header survives reqwest's cross-host stripping) past
        // `paginate.allow_hosts` and that host's quota. A refused redirect
        // surfaces as the 3xx answer.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same = attempt.previous().last().is_some_and(|prev| {
                prev.host_str() == attempt.url().host_str()
                    && prev.port_or_known_default() == attempt.url().port_or_known_default()
            });
            if attempt.previous().len() > 5 || !same {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }))
        .build()
        .expect("a TLS backend is compiled in")
}

/// How often store care runs (history, dead letter and removed-instance
/// retention; see [`Supervisor::sweep`]).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs the daemon until `shutdown` is cancelled, then drains: pollers stop
/// at their next sleep, in-flight polls and deliveries get until
/// `shutdown_timeout`, anything unfinished stays in the store for next time.
/// Each `reload` notification (SIGHUP) reads the bridge file again and
/// applies it (see [`Supervisor::reload`]).
pub async fn run(
    config: Config,
    reload: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let store = Store::open(&config.state_dir)?;
    let status = Arc::new(Status::default());
    let live = Arc::new(Live::default());
    *live.admin_token.write().expect("token lock") = config.admin_token.clone();
    let hosts = Arc::new(HostGates::new(&config.hosts));
    let shared = Arc::new(Shared {
        store: store.clone(),
        status: status.clone(),
        client: poll_client(),
        hosts: hosts.clone(),
        tokens: TokenCache::default(),
        live: live.clone(),
    });

    let admin = match config.admin_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            info!(%local, "admin server listening");
            let state = crate::admin::AdminState {
                status: status.clone(),
                store: store.clone(),
                hosts: hosts.clone(),
                live: live.clone(),
            };
            let task = tokio::spawn(crate::admin::serve(listener, state, shutdown.clone()));
            Some((task, local))
        }
        None => None,
    };

    let mut sup = Supervisor {
        shared,
        guarded: delivery_client(true),
        unguarded: delivery_client(false),
        workers: Running::default(),
        worker_fps: BTreeMap::new(),
        pollers: Running::default(),
        poller_fps: BTreeMap::new(),
        config: None,
        shutdown: shutdown.clone(),
    };
    sup.apply(config).await;
    let config = sup.config.as_ref().expect("applied");
    let count = config
        .sources
        .iter()
        .map(|s| s.instances.len())
        .sum::<usize>();
    status.set_ready(true);
    if let Some((_, local)) = &admin {
        // Where CLI commands (and tests) find the running daemon; written
        // once it is ready, so its presence means `/readyz` says so.
        std::fs::write(config.state_dir.join("admin.addr"), local.to_string())
            .context("cannot write admin.addr in state_dir")?;
    }
    info!(
        instances = count,
        endpoints = config.endpoints.len(),
        state_dir = %config.state_dir.display(),
        "pollhook running"
    );
    // systemd: ready now (store open, workers and pollers running), and
    // watchdog pings from a runtime task for as long as the runtime turns.
    let notifier = Arc::new(crate::notify::Notifier::from_env());
    notifier.send(&format!(
        "READY=1\nSTATUS=polling {count} instances, delivering to {} endpoints",
        config.endpoints.len()
    ));
    let watchdog = notifier.watchdog_interval().map(|every| {
        let n = notifier.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => n.send("WATCHDOG=1"),
                    _ = stop.cancelled() => return,
                }
            }
        })
    });
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reload.notified() => {
                notifier.send("RELOADING=1\nSTATUS=reloading the configuration");
                sup.reload().await;
                notifier.send("READY=1\nSTATUS=configuration reloaded");
            }
            _ = sweep.tick() => sup.sweep(),
        }
    }
    status.set_ready(false);
    notifier.send("STOPPING=1\nSTATUS=shutting down: finishing in-flight work");
    if let Some(w) = watchdog {
        w.abort();
    }
    let timeout = sup.config.as_ref().expect("applied").shutdown_timeout;
    info!(timeout = %humantime::format_duration(timeout), "shutting down: finishing in-flight polls and deliveries");
    let deadline = tokio::time::Instant::now() + timeout;
    for (set, what) in [
        (&mut sup.pollers, "polls"),
        (&mut sup.workers, "deliveries"),
    ] {
        if tokio::time::timeout_at(deadline, set.join_all())
            .await
            .is_err()
        {
            warn!("shutdown timeout: abandoning in-flight {what} (they stay in the store and resume at the next start)");
            set.abort_all().await;
        }
    }
    if let Some((a, _)) = admin {
        a.abort();
    }
    store.flush()?;
    let _ = std::fs::remove_file(
        sup.config
            .as_ref()
            .expect("applied")
            .state_dir
            .join("admin.addr"),
    );
    info!("store flushed; bye");
    Ok(())
}

/// Starts, restarts and stops the daemon's tasks to match a configuration.
struct Supervisor {
    shared: Arc<Shared>,
    /// Two delivery clients: the SSRF guard on, and off for `allow_private`.
    guarded: reqwest::Client,
    unguarded: reqwest::Client,
    /// One delivery worker per endpoint, and the fingerprint it runs.
    workers: Running,
    worker_fps: BTreeMap<String, u64>,
    /// Poll tasks (static instances) and discovery loops, by unit key (see
    /// [`crate::reload::units`]), and the fingerprint each runs.
    pollers: Running,
    poller_fps: BTreeMap<String, u64>,
    /// What runs now (`None` before the first `apply`).
    config: Option<Config>,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// SIGHUP: read the bridge file again; apply it only when it is valid.
    async fn reload(&mut self) {
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
                let warnings = crate::reload::warnings(old, &new);
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
    async fn apply(&mut self, new: Config) -> String {
        let shared = self.shared.clone();
        let (mut started, mut restarted, mut stopped) = (0, 0, 0);

        // Endpoints first, so new sources find their wake-ups.
        let eps = crate::reload::endpoints(&new);
        for name in self.worker_fps.keys().cloned().collect::<Vec<_>>() {
            if !eps.contains_key(&name) {
                self.workers.stop(&name);
                self.worker_fps.remove(&name);
                shared.live.wakes.write().expect("wakes lock").remove(&name);
                shared.status.remove_endpoint(&name);
                let queued = shared.store.outbox_len(&name);
                warn!(endpoint = %name, queued, "endpoint removed from the configuration: its worker stops; queued events stay in the store until it comes back");
                stopped += 1;
            }
        }
        for (name, fp) in &eps {
            if self.worker_fps.get(name) == Some(fp) {
                continue;
            }
            let ep = new.endpoints[name].clone();
            let wake = shared
                .live
                .wakes
                .write()
                .expect("wakes lock")
                .entry(name.clone())
                .or_default()
                .clone();
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
            };
            let token = self.shutdown.child_token();
            if self.worker_fps.insert(name.clone(), *fp).is_some() {
                restarted += 1;
                info!(endpoint = %name, "endpoint changed: worker restarts");
            } else {
                started += 1;
            }
            self.workers
                .start(name, token.clone(), worker.run(token))
                .await;
            // Whatever the stopped worker left is the new one's to send.
            wake.rescan();
        }

        shared.hosts.reconfigure(&new.hosts);
        *shared.live.admin_token.write().expect("token lock") = new.admin_token.clone();

        let units = crate::reload::units(&new);
        let now = crate::now_ms();
        for key in self.poller_fps.keys().cloned().collect::<Vec<_>>() {
            if units.contains_key(&key) {
                continue;
            }
            self.pollers.stop(&key);
            self.poller_fps.remove(&key);
            stopped += 1;
            if key.contains('/') {
                shared.status.remove_instance(&key);
            } else {
                shared.status.remove_source(&key);
            }
            info!(unit = %key, "removed from the configuration: stopped, state kept for the retention period");
        }
        for (key, unit) in &units {
            if self.poller_fps.get(key) == Some(&unit.fingerprint) {
                continue;
            }
            let token = self.shutdown.child_token();
            let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                match &unit.instance {
                    Some(inst) => Box::pin(poll_loop(
                        shared.clone(),
                        unit.source.clone(),
                        inst.clone(),
                        token.clone(),
                    )),
                    None => Box::pin(discover_loop(
                        shared.clone(),
                        unit.source.clone(),
                        token.clone(),
                    )),
                };
            if self
                .poller_fps
                .insert(key.clone(), unit.fingerprint)
                .is_some()
            {
                restarted += 1;
                info!(unit = %key, "changed: restarts on its stored state");
            } else {
                started += 1;
            }
            // A restarted unit waits for its old task's in-flight poll, so
            // two tasks never commit the same state.
            self.pollers.start(key, token, task).await;
        }

        // Stored states no unit polls any more are deleted after the
        // retention of the source that had them (the default when that
        // source is unknown: configuration changed while stopped); those
        // polled again are kept.
        let old_retention = |key: &str| {
            let src = key.split_once('/').map_or(key, |(s, _)| s);
            self.config
                .as_ref()
                .and_then(|c| c.source(src))
                .map_or(crate::config::DEFAULT_RETENTION, |s| s.retention)
        };
        match shared.store.state_keys() {
            Ok(keys) => {
                for key in keys {
                    let res = if crate::reload::owns(&units, &key) {
                        shared.store.unmark_removed(&key)
                    } else {
                        let at = now + old_retention(&key).as_millis() as i64;
                        shared.store.mark_removed(&key, at)
                    };
                    if let Err(e) = res {
                        warn!(instance = %key, error = %format!("{e:#}"), "cannot record whether the instance is still configured");
                    }
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "cannot list stored instance states"),
        }
        self.config = Some(new);
        self.sweep();
        format!("{started} started, {restarted} restarted, {stopped} stopped, the rest untouched")
    }

    /// Store care, hourly and after each (re)load: forgets old delivery
    /// history and dead letters past `store:` retention, and deletes the
    /// state of instances removed longer than their retention.
    fn sweep(&self) {
        let store = &self.shared.store;
        let config = self.config.as_ref().expect("applied");
        let now = crate::now_ms();
        match store.prune_attempts(now - config.history_retention.as_millis() as i64) {
            Ok(0) => {}
            Ok(n) => info!(
                attempts = n,
                "delivery history older than store.history forgotten"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "cannot prune the delivery history"),
        }
        if let Some(keep) = config.dead_letter_retention {
            match store.prune_dead(now - keep.as_millis() as i64) {
                Ok(0) => {}
                Ok(n) => {
                    warn!(
                        dead_letters = n,
                        "dead letters older than store.dead_letters deleted"
                    );
                    self.shared.status.recount_dead_letters(store);
                }
                Err(e) => warn!(error = %format!("{e:#}"), "cannot prune dead letters"),
            }
        }
        match self.shared.store.sweep_removed(crate::now_ms()) {
            Ok(gone) => {
                for key in gone {
                    info!(instance = %key, "removed from the configuration longer than its retention: state deleted");
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot delete the state of removed instances")
            }
        }
    }
}

/// A stable pseudo-random fraction of the key, to spread first polls of many
/// instances across their interval instead of firing all at once.
fn spread(key: &str) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// A `for_each: discover` source: its listing loop and one poll task per
/// instance it finds.
async fn discover_loop(shared: Arc<Shared>, source: Arc<Source>, shutdown: CancellationToken) {
    // DESIGN.md: a connector's `rate_limit` is its quota per instance (the
    // listing request of a discovering source counts as one more).
    let rate_limit = source.connector.rate_limit.map(|r| Arc::new(limiter(r, 1)));
    let env = FetchEnv {
        client: &shared.client,
        hosts: &shared.hosts,
        rate_limit: rate_limit.as_deref(),
        tokens: &shared.tokens,
    };
    let cx = crate::discover::DiscoverEnv {
        store: &shared.store,
        status: &shared.status,
        env,
    };
    let spawn = |inst: Instance, token: CancellationToken| {
        poll_loop(shared.clone(), source.clone(), inst, token)
    };
    crate::discover::run_source(source.clone(), cx, spawn, shutdown).await;
}

async fn poll_loop(
    shared: Arc<Shared>,
    source: Arc<Source>,
    inst: Instance,
    shutdown: CancellationToken,
) {
    let inst = &inst;
    let c = &source.connector;
    let mut state = loop {
        match shared.store.load_state(&inst.key) {
            Ok(s) => break s,
            Err(e) => {
                error!(instance = %inst.key, error = %format!("{e:#}"), "cannot read the instance state; retrying in 5s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    shared.status.register_instance(&inst.key, |s| {
        s.source = source.name.clone();
        s.instance = inst.name.clone();
        s.connector = c.name.clone();
        s.cursor = state.cursor.clone();
    });
    let rate_limit = c.rate_limit.map(|r| Arc::new(limiter(r, 1)));
    let persisted = state
        .next_run_ms
        .and_then(chrono::DateTime::from_timestamp_millis);
    let first = first_due(persisted, Utc::now(), &source.schedule, spread(&inst.key));
    let Some(mut due) = first else {
        warn!(instance = %inst.key, "schedule has no future run; instance stops");
        return;
    };
    // This instance's slot within the interval (see `Schedule::next_slot`).
    let phase = spread(&inst.key);
    let mut interval = match source.schedule.kind {
        crate::schedule::ScheduleKind::Every(d) => d,
        crate::schedule::ScheduleKind::Cron(_) => Duration::ZERO,
    };
    let mut failures: u32 = 0;
    let mut last_start: Option<chrono::DateTime<Utc>> = None;
    loop {
        shared
            .status
            .instance(&inst.key, |s| s.next_poll_ms = Some(due.timestamp_millis()));
        // Persisted so that the next start knows whether a run was missed.
        // The in-memory copy follows, so a commit_poll of this state does not
        // write back an older value.
        state.next_run_ms = Some(due.timestamp_millis());
        if let Err(e) = shared.store.set_next_run(&inst.key, due.timestamp_millis()) {
            warn!(instance = %inst.key, error = %format!("{e:#}"), "cannot record the next run time");
        }
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        let env = FetchEnv {
            client: &shared.client,
            hosts: &shared.hosts,
            rate_limit: rate_limit.as_deref(),
            tokens: &shared.tokens,
        };
        let started = Utc::now();
        if let Some(prev) = last_start {
            let ms = (started - prev).num_milliseconds().max(0) as u64;
            shared
                .status
                .instance(&inst.key, |s| s.effective_interval_ms = Some(ms));
        }
        last_start = Some(started);
        let mut changed = false;
        let took = std::time::Instant::now();
        let outcome = poll_once(&shared, &source, inst, &state, &env).await;
        shared
            .status
            .observe_poll(&source.name, &c.name, took.elapsed());
        match outcome {
            Ok((next_state, events)) => {
                if let Some(n) = next_state {
                    state = n;
                }
                changed = events > 0;
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                let msg = mask(&e.to_string(), &inst.secrets);
                warn!(instance = %inst.key, connector = %c.name, kind = e.kind(), failures, "poll failed: {msg}");
                shared
                    .status
                    .polled(&inst.key, &source.name, &c.name, PollOutcome::Failed, |s| {
                        s.last_poll_ms = Some(crate::now_ms());
                        s.last_error = Some(msg);
                    });
            }
        }
        let now = Utc::now();
        let next = match source.schedule.adaptive {
            Some((min, max)) => {
                interval = adapt(interval, changed, min, max);
                let after = due.max(now);
                source
                    .schedule
                    .in_window(after + chrono::Duration::from_std(interval).unwrap_or_default())
            }
            None => source.schedule.next_slot(now, phase),
        };
        let Some(mut next) = next else {
            warn!(instance = %inst.key, "schedule has no future run; instance stops");
            return;
        };
        // A failing upstream is asked again later and later (never sooner
        // than the schedule says), then the schedule resumes on success.
        let backoff = error_backoff(failures, MAX_ERROR_BACKOFF, rand::random::<f64>());
        if !backoff.is_zero() {
            let retry = now + chrono::Duration::from_std(backoff).unwrap_or_default();
            if retry > next {
                next = source.schedule.in_window(retry).unwrap_or(retry);
            }
        }
        shared.status.instance(&inst.key, |s| {
            s.consecutive_failures = failures;
            s.interval_ms = source
                .schedule
                .adaptive
                .map(|_| interval.as_millis() as u64);
        });
        due = source.schedule.jittered(next, rand::random::<f64>());
    }
}

/// The longest wait between attempts of a failing instance.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(300);

/// One poll of one instance; returns the new state when one was committed.
async fn poll_once(
    shared: &Shared,
    source: &Source,
    inst: &Instance,
    state: &InstanceState,
    env: &FetchEnv<'_>,
) -> Result<(Option<InstanceState>, usize), PollError> {
    let c = &source.connector;
    let now = Utc::now();
    let fetched = fetch(c, inst, state, env, now).await?;
    if fetched.not_modified {
        shared.status.polled(
            &inst.key,
            &source.name,
            &c.name,
            PollOutcome::NotModified,
            |s| {
                s.last_poll_ms = Some(crate::now_ms());
                s.last_ok_ms = s.last_poll_ms;
                s.last_error = None;
            },
        );
        return Ok((None, 0));
    }
    let detection = detect(
        c,
        &inst.vars,
        state,
        &fetched.pages,
        now,
        None,
        fetched.listing(),
    )
    .map_err(PollError::Detect)?;
    if let Some(w) = &fetched.warning {
        warn!(instance = %inst.key, connector = %c.name, "{}", mask(w, &inst.secrets));
    }
    let (next, events) = prepare_commit(source, inst, state, detection, &fetched, now);
    let committed = if &next != state || !events.is_empty() {
        let mut deliveries = Vec::new();
        for ev in &events {
            let body = ev.body();
            for route in source.routes.iter().filter(|r| r.accepts(&ev.kind)) {
                deliveries.push((
                    route.endpoint.clone(),
                    OutboxEntry {
                        event_id: ev.id.clone(),
                        instance: inst.key.clone(),
                        kind: ev.kind.clone(),
                        sequence: ev.sequence,
                        body: body.clone(),
                        attempts: 0,
                        next_attempt_ms: 0,
                        created_ms: now.timestamp_millis(),
                        last_error: None,
                    },
                ));
            }
        }
        // Counted as waiting before the commit, so a worker never
        // delivers an entry that its endpoint's backlog does not hold yet.
        let mut backlog = std::collections::BTreeMap::<&str, u64>::new();
        for (ep, _) in &deliveries {
            *backlog.entry(ep.as_str()).or_default() += 1;
        }
        for (ep, n) in &backlog {
            shared.status.queued(ep, *n, now.timestamp_millis());
        }
        if let Err(e) = shared
            .store
            .commit_poll(&inst.key, &next, &deliveries)
            .await
        {
            for (ep, n) in &backlog {
                shared.status.unqueued(ep, *n, now.timestamp_millis());
            }
            // Nothing was written: the next poll detects the same changes again.
            return Err(PollError::Detect(format!(
                "cannot commit to the store: {e:#}"
            )));
        }
        for (ep, _) in &deliveries {
            if let Some(w) = shared.live.wake(ep) {
                w.instance(&inst.key);
            }
        }
        for ev in &events {
            shared.status.count_event(&source.name, &ev.kind);
            info!(instance = %inst.key, event = %ev.id, r#type = %ev.kind, sequence = ev.sequence, "change detected");
        }
        Some(next)
    } else {
        None
    };
    let cursor = committed.as_ref().map(|s| s.cursor.clone());
    let evicted = committed.as_ref().map(|s| s.seen_evicted);
    shared
        .status
        .polled(&inst.key, &source.name, &c.name, PollOutcome::Ok, |s| {
            s.events += events.len() as u64;
            s.last_poll_ms = Some(crate::now_ms());
            s.last_ok_ms = s.last_poll_ms;
            s.last_error = None;
            s.last_warning = fetched.warning.as_ref().map(|w| mask(w, &inst.secrets));
            if let Some(c) = cursor {
                s.cursor = c;
            }
            if let Some(n) = evicted {
                s.seen_evicted = n;
            }
        });
    Ok((committed, events.len()))
}

/// Turns a detection into the state to commit and the events, with their
/// sequence numbers and deterministic ids.
pub fn prepare_commit(
    source: &Source,
    inst: &Instance,
    prev: &InstanceState,
    detection: Detection,
    fetched: &Fetched,
    now: chrono::DateTime<Utc>,
) -> (InstanceState, Vec<Event>) {
    let mut next = detection.state;
    if fetched.first_url.is_some() {
        next.etag = fetched.etag.clone();
        next.last_modified = fetched.last_modified.clone();
        next.validator_url = if next.etag.is_some() || next.last_modified.is_some() {
            fetched.first_url.clone()
        } else {
            None
        };
    }
    let mut seq = prev.sequence;
    let events = detection
        .events
        .into_iter()
        .map(|d| {
            seq += 1;
            Event {
                id: event_id(&source.name, &inst.name, &d.kind, &d.change_key),
                kind: d.kind,
                timestamp: now,
                source: source.name.clone(),
                instance: inst.name.clone(),
                sequence: seq,
                data: d.data,
            }
        })
        .collect();
    next.sequence = seq;
    (next, events)
}
