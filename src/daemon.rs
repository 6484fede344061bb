//! `pollhook run`: one task per instance (schedule → fetch → detect →
//! commit), one delivery worker per endpoint, the admin server, and an
//! orderly shutdown.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Instance, Source};
use crate::connector::auth::TokenCache;
use crate::connector::detect::{detect, Detection};
use crate::connector::fetch::{fetch, FetchEnv, Fetched, PollError};
use crate::connector::mask;
use crate::deliver::worker::{delivery_client, Wake, Worker, USER_AGENT_VALUE};
use crate::event::{event_id, Event};
use crate::quota::{limiter, HostGates};
use crate::schedule::first_due;
use crate::schedule::{adapt, error_backoff};
use crate::status::Status;
use crate::store::{InstanceState, OutboxEntry, Store};

/// What pollers share.
struct Shared {
    store: Store,
    status: Arc<Status>,
    client: reqwest::Client,
    hosts: Arc<HostGates>,
    /// OAuth2 tokens shared by every instance.
    tokens: TokenCache,
    /// Delivery workers' wake-ups, by endpoint.
    wakes: BTreeMap<String, Arc<Wake>>,
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

/// Runs the daemon until `shutdown` is cancelled, then drains: pollers stop
/// at their next sleep, in-flight polls and deliveries get until
/// `shutdown_timeout`, anything unfinished stays in the store for next time.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let store = Store::open(&config.state_dir)?;
    let status = Arc::new(Status::default());

    let mut wakes = BTreeMap::new();
    let mut deliveries = JoinSet::new();
    // Two clients: the SSRF guard on, and off for `allow_private` endpoints.
    let guarded = delivery_client(true);
    let unguarded = delivery_client(false);
    for ep in config.endpoints.values() {
        let wake = Arc::new(Wake::default());
        wakes.insert(ep.name.clone(), wake.clone());
        status.endpoint(&ep.name, |_| {});
        let worker = Worker {
            endpoint: ep.clone(),
            store: store.clone(),
            client: if ep.allow_private {
                unguarded.clone()
            } else {
                guarded.clone()
            },
            status: status.clone(),
            wake,
        };
        deliveries.spawn(worker.run(shutdown.clone()));
    }

    let hosts = Arc::new(HostGates::new(&config.hosts));
    let shared = Arc::new(Shared {
        store: store.clone(),
        status: status.clone(),
        client: poll_client(),
        hosts: hosts.clone(),
        tokens: TokenCache::default(),
        wakes,
    });
    let mut polls = JoinSet::new();
    let mut count = 0;
    for source in &config.sources {
        if source.discovered {
            polls.spawn(discover_loop(
                shared.clone(),
                source.clone(),
                shutdown.clone(),
            ));
            continue;
        }
        for inst in &source.instances {
            count += 1;
            polls.spawn(poll_loop(
                shared.clone(),
                source.clone(),
                inst.clone(),
                shutdown.clone(),
            ));
        }
    }

    let admin = match config.admin_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            // Where CLI commands (and tests) find the running daemon.
            std::fs::write(config.state_dir.join("admin.addr"), local.to_string())
                .context("cannot write admin.addr in state_dir")?;
            info!(%local, "admin server listening");
            let state = crate::admin::AdminState {
                status: status.clone(),
                store: store.clone(),
                hosts: hosts.clone(),
                endpoints: config.endpoints.keys().cloned().collect(),
                wakes: shared.wakes.clone(),
                token: config.admin_token.clone().map(Arc::new),
            };
            Some(tokio::spawn(crate::admin::serve(
                listener,
                state,
                shutdown.clone(),
            )))
        }
        None => None,
    };

    status.set_ready(true);
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
    shutdown.cancelled().await;
    status.set_ready(false);
    notifier.send("STOPPING=1\nSTATUS=shutting down: finishing in-flight work");
    if let Some(w) = watchdog {
        w.abort();
    }
    info!(timeout = %humantime::format_duration(config.shutdown_timeout), "shutting down: finishing in-flight polls and deliveries");

    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    let drain = |mut set: JoinSet<()>, what: &'static str| async move {
        if tokio::time::timeout_at(deadline, async { while set.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!("shutdown timeout: abandoning in-flight {what} (they stay in the store and resume at the next start)");
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
    };
    drain(polls, "polls").await;
    drain(deliveries, "deliveries").await;
    if let Some(a) = admin {
        a.abort();
    }
    store.flush()?;
    let _ = std::fs::remove_file(config.state_dir.join("admin.addr"));
    info!("store flushed; bye");
    Ok(())
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
        match poll_once(&shared, &source, inst, &state, &env).await {
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
                shared.status.instance(&inst.key, |s| {
                    s.polls_failed += 1;
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
        shared.status.instance(&inst.key, |s| {
            s.polls_ok += 1;
            s.polls_not_modified += 1;
            s.last_poll_ms = Some(crate::now_ms());
            s.last_ok_ms = s.last_poll_ms;
            s.last_error = None;
        });
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
        if let Err(e) = shared
            .store
            .commit_poll(&inst.key, &next, &deliveries)
            .await
        {
            // Nothing was written: the next poll detects the same changes again.
            return Err(PollError::Detect(format!(
                "cannot commit to the store: {e:#}"
            )));
        }
        for (ep, _) in &deliveries {
            if let Some(w) = shared.wakes.get(ep) {
                w.instance(&inst.key);
            }
        }
        for ev in &events {
            info!(instance = %inst.key, event = %ev.id, r#type = %ev.kind, sequence = ev.sequence, "change detected");
        }
        Some(next)
    } else {
        None
    };
    let cursor = committed.as_ref().map(|s| s.cursor.clone());
    let evicted = committed.as_ref().map(|s| s.seen_evicted);
    shared.status.instance(&inst.key, |s| {
        s.polls_ok += 1;
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
