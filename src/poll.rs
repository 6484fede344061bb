//! The poll stage: one task per instance this node holds the lease of
//! (started and ended by the [`Roster`]), from its schedule to its
//! commit. `poll_loop` polls while the lease is held,
//! `poll_held` sleeps until the instance is due, `poll_once` fetches,
//! detects and commits (state and outbox in one store
//! transaction), and `prepare_commit` (pure) turns a detection into the
//! state to commit and the events with their sequence numbers and ids.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cluster::Arrival;
use crate::connector::detect::{detect, Detection};
use crate::connector::fetch::{fetch_via, FetchEnv, Fetched, Memo, PollError};
use crate::connector::mask;
use crate::connector::spec::Instance;
use crate::connector::transport::Transport;
use crate::event::{event_id, Event};
use crate::quota::RateLimit;
use crate::runtime::Shared;
use crate::runtime::Source;
use crate::schedule::{adapt, error_backoff};
use crate::schedule::{
    first_due_handed_over, first_due_taken_over, first_due_within, prompt_spread,
};
use crate::status::PollOutcome;
use crate::store::{InstanceState, OutboxEntry, UrlTag};

mod roster;
pub(crate) use roster::Roster;

/// A stable pseudo-random fraction of the key, to spread first polls of many
/// instances across their interval instead of firing all at once.
pub(crate) fn spread(key: &str) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// Why [`poll_held`] returned.
enum Stop {
    /// Shutdown, or the schedule has no future run.
    Done,
    /// This node no longer holds the instance's lease, or lost it and
    /// took it again under a new epoch, or is giving it back: start over
    /// from the store once it holds it. `fenced`: the store refused a
    /// commit under this epoch.
    Lost { fenced: bool },
    /// The next poll is a while away: park the instance (see [`Parked`]).
    Park {
        pace: Box<Pace>,
        rate_limit: Option<Arc<RateLimit>>,
    },
}

/// Polls one instance while this node holds its lease, until `shutdown`:
/// on its schedule, backing off while it fails, resuming from its stored
/// state (what the last holder committed). The [`Roster`] starts it when
/// the lease is gained; it returns when the lease is gone (lost, or given
/// back for another node's share), and the roster starts it again if the
/// lease comes back. Alone (`SingleNode`), the lease comes at the first
/// round and stays.
///
/// The polling under a lease ([`poll_held`]: its pace, the poll's steps)
/// is boxed, so what the task holds between two leases (the same lease
/// lost and taken again) stays small.
async fn poll_loop(
    roster: Arc<Roster>,
    source: Arc<Source>,
    inst: Arc<Instance>,
    shutdown: CancellationToken,
    start: Start,
) {
    let shared = roster.shared().clone();
    let _alive = shared.status.poll_task();
    let mut start = Some(start);
    let cluster = shared.cluster.clone();
    let mut fenced_at: Option<i64> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let Some(epoch) = roster.held_or_leave(&inst.key) else {
            return;
        };
        if fenced_at == Some(epoch) {
            // The store refused this epoch; this node has not heard yet
            // that the lease moved. Its next round will say so. Boxed: a
            // rare wait, whose room every task would carry inline.
            let stop = Box::pin(async {
                tokio::select! {
                    _ = cluster.next_change(cluster.lease / 3) => false,
                    _ = shutdown.cancelled() => true,
                }
            });
            if stop.await {
                return;
            }
            continue;
        }
        // A pace parked under this very lease goes on; under another
        // epoch (the lease went and came back meanwhile) it may be stale:
        // the state is read again from the store.
        let begin = match start.take() {
            Some(Start::Resume(p)) if p.epoch == epoch => Begin::Resume(p.pace, p.rate_limit),
            Some(Start::Load(turn)) => Begin::Load(Some(turn)),
            _ => Begin::Load(None),
        };
        tracing::debug!(instance = %inst.key, epoch, node = %cluster.node, resumed = matches!(begin, Begin::Resume(..)), "lease held: polling here");
        match Box::pin(poll_held(&shared, &source, &inst, epoch, &shutdown, begin)).await {
            Stop::Done => return,
            Stop::Lost { fenced } => {
                if fenced {
                    fenced_at = Some(epoch);
                }
            }
            Stop::Park { pace, rate_limit } => {
                let parked = Parked {
                    epoch,
                    pace,
                    rate_limit,
                    _parked: shared.status.parked_instance(),
                };
                roster.park(&inst, parked);
                return;
            }
        }
    }
}

/// How the roster starts a poll task.
pub(crate) enum Start {
    /// From the stored state, with a turn to read it already taken (see
    /// [`Shared::state_loads`]): the roster takes the turn before it
    /// spawns the task, so a node gaining 100,000 leases at once keeps a
    /// queue of them, not 100,000 tasks waiting for a turn (at start,
    /// they were the node's memory peak).
    Load(tokio::sync::OwnedSemaphorePermit),
    /// From where it was parked, if the lease is still held under the
    /// same epoch (else as `Load`, taking a turn itself).
    Resume(Parked),
}

/// Where [`poll_held`] starts from.
enum Begin {
    /// The stored state, read with this turn, or with one taken then.
    Load(Option<tokio::sync::OwnedSemaphorePermit>),
    /// A parked pace, under the lease it was parked under.
    Resume(Box<Pace>, Option<Arc<RateLimit>>),
}

/// An instance waiting for its next poll with no task (see
/// [`Roster::park`]): what the poll task started when it is due resumes
/// from. A task per instance, waiting, was most of an idle instance's
/// memory (its cell, its boxed future, its cancellation token: about
/// 700 bytes); this is its pace and a timer entry.
pub(crate) struct Parked {
    /// The lease's epoch it was polling under.
    epoch: i64,
    pace: Box<Pace>,
    rate_limit: Option<Arc<RateLimit>>,
    /// Counts it among the parked (`/status`'s `parked`; with the poll
    /// tasks running, the instances polled here).
    _parked: crate::status::AliveGuard,
}

impl Parked {
    /// When its next poll is due, by the runtime's clock.
    fn due(&self) -> tokio::time::Instant {
        let wait = (self.pace.due - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        tokio::time::Instant::now() + wait
    }
}

/// A wait for the next poll at least this long parks the instance (see
/// [`Parked`]) rather than keeping its task asleep. Shorter waits (an
/// `every 1s`, a backoff's first seconds) stay in the task: starting a
/// task per poll would cost more than it saves.
const PARK_AFTER: Duration = Duration::from_secs(2);

/// Where an instance is between polls: its state, when it is due next,
/// and what paces it.
struct Pace {
    state: InstanceState,
    due: chrono::DateTime<Utc>,
    /// This instance's slot within the interval (see `Schedule::next_slot`).
    phase: f64,
    /// The adaptive interval now (`every` schedules).
    interval: Duration,
    failures: u32,
    last_start: Option<chrono::DateTime<Utc>>,
}

/// What one poll left for the schedule.
struct Polls {
    /// Events were committed.
    changed: bool,
    /// The least wait the API (or the connector's rate limit) asked for.
    floor: Option<crate::hints::Floor>,
}

/// Polls while this node holds the instance's lease under `epoch`, from
/// the pace it was parked with (`resumed`) or from the stored state.
async fn poll_held(
    shared: &Arc<Shared>,
    source: &Arc<Source>,
    inst: &Instance,
    epoch: i64,
    shutdown: &CancellationToken,
    begin: Begin,
) -> Stop {
    // Whether `pace.due` was computed since it was last shown and stored.
    let mut fresh = matches!(begin, Begin::Load(_));
    let (mut pace, rate_limit) = match begin {
        Begin::Resume(pace, rate_limit) => (pace, rate_limit),
        Begin::Load(turn) => {
            let c = &source.connector;
            // Boxed, as every store call and the poll below: a future
            // holds room for the largest one it awaits, and this one
            // waits between polls. The pace is made in its own future
            // and handed over boxed: made here, the state it was made
            // from kept two dead copies of itself in this future.
            let Some(pace) = Box::pin(start_pace(shared, source, inst, shutdown, turn)).await
            else {
                return Stop::Done;
            };
            let rate_limit = c
                .rate_limit
                .map(|r| Arc::new(RateLimit::new(r, &inst.key, &shared.store)));
            (pace, rate_limit)
        }
    };
    // The instance's request, kept while this task runs (not parked).
    let mut memo = Memo::default();
    loop {
        if fresh {
            Box::pin(record_due(shared, source, inst, &mut pace)).await;
        }
        let wait = (pace.due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if wait >= PARK_AFTER {
            return Stop::Park { pace, rate_limit };
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Stop::Done,
        }
        let turn = Turn {
            epoch,
            rate_limit: rate_limit.as_deref(),
            memo: &mut memo,
        };
        if let Err(stop) =
            Box::pin(poll_turn(shared, source, inst, shutdown, turn, &mut pace)).await
        {
            return stop;
        }
        fresh = true;
    }
}

/// The instance's state read from the store, shown, and when its first
/// poll is due; `None` at shutdown or when its schedule has no run left.
async fn start_pace(
    shared: &Arc<Shared>,
    source: &Arc<Source>,
    inst: &Instance,
    shutdown: &CancellationToken,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Option<Box<Pace>> {
    let c = &source.connector;
    let state = {
        let _turn = match turn {
            Some(t) => t,
            None => tokio::select! {
                t = shared.state_loads.clone().acquire_owned() => t.ok()?,
                _ = shutdown.cancelled() => return None,
            },
        };
        Box::pin(load_state(shared, inst, shutdown)).await?
    };
    shared.status.register_instance(&inst.key, |s| {
        s.source = source.name.as_str().into();
        s.instance = inst.name().to_string();
        s.connector = c.name.as_str().into();
        s.cursor = state.cursor.clone();
    });
    let persisted = state
        .next_run_ms
        .and_then(chrono::DateTime::from_timestamp_millis);
    // Taken over from a silent node as its lease lapsed, or handed over
    // by a live one: a run that came due meanwhile is due at once, not as
    // after a stop.
    let (now, fraction) = (Utc::now(), spread(&inst.key));
    let prompt = prompt_spread(source.instances.len());
    let schedule = &source.schedule;
    let arrival = shared.cluster.arrival(&inst.key);
    let first = match arrival {
        Some(Arrival::TakenOver(gone)) => {
            first_due_taken_over(persisted, now, schedule, fraction, gone)
        }
        Some(Arrival::HandedOver) => {
            first_due_handed_over(persisted, now, schedule, fraction, prompt)
        }
        None => first_due_within(persisted, now, schedule, fraction, prompt),
    };
    let Some(due) = first else {
        warn!(instance = %inst.key, "schedule has no future run; instance stops");
        return None;
    };
    tracing::debug!(instance = %inst.key, ?arrival, persisted = ?persisted.map(|p| (p - now).num_milliseconds()), due_in_ms = (due - now).num_milliseconds(), "first poll here");
    Some(Box::new(Pace {
        state,
        due,
        phase: spread(&inst.key),
        interval: match source.schedule.kind {
            crate::schedule::ScheduleKind::Every(d) => d,
            crate::schedule::ScheduleKind::Cron(_) => Duration::ZERO,
        },
        failures: 0,
        last_start: None,
    }))
}

/// What one turn of [`poll_held`] polls under and with, besides its pace.
struct Turn<'a> {
    /// The lease's epoch the task holds it under.
    epoch: i64,
    /// The connector's `rate_limit` for this instance.
    rate_limit: Option<&'a RateLimit>,
    /// The instance's request kept between polls.
    memo: &'a mut Memo,
}

/// One turn of [`poll_held`]: the poll that came due, under the lease
/// it started with (not given back while it runs), and when the next is
/// due. Its own (boxed) future: what a task keeps while it waits for its
/// next poll is then its pace and a timer, not room for every await of a
/// poll (at rest, that room was most of a held instance's memory).
async fn poll_turn(
    shared: &Arc<Shared>,
    source: &Arc<Source>,
    inst: &Instance,
    shutdown: &CancellationToken,
    turn: Turn<'_>,
    pace: &mut Pace,
) -> Result<(), Stop> {
    let Turn {
        epoch,
        rate_limit,
        memo,
    } = turn;
    let busy = begin(&shared.cluster, &inst.key, epoch, shutdown).await?;
    let env = FetchEnv {
        client: &shared.client,
        hosts: &shared.hosts,
        rate_limit,
        tokens: &shared.tokens,
        user_agent: shared.live.user_agent(),
    };
    let polls = poll_under(shared, source, inst, &env, pace, memo, busy).await?;
    let Some(next) = next_due(shared, source, inst, pace, &polls) else {
        warn!(instance = %inst.key, "schedule has no future run; instance stops");
        return Err(Stop::Done);
    };
    let schedule = &source.schedule;
    let due = schedule.jittered(next, rand::random::<f64>());
    pace.due = schedule.spaced(due, pace.last_start, pace.interval);
    Ok(())
}

/// The instance's stored state, read again every 5 s while the store
/// does not answer; `None` at shutdown.
async fn load_state(
    shared: &Shared,
    inst: &Instance,
    shutdown: &CancellationToken,
) -> Option<InstanceState> {
    loop {
        match shared.store.load_state(&inst.key).await {
            Ok(s) => return Some(s),
            Err(e) => {
                error!(instance = %inst.key, error = %format!("{e:#}"), "cannot read the instance state; retrying in 5s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Shows and keeps when the instance is due next.
async fn record_due(shared: &Shared, source: &Source, inst: &Instance, pace: &mut Pace) {
    let due_ms = pace.due.timestamp_millis();
    shared
        .status
        .instance(&inst.key, |s| s.next_poll_ms = Some(due_ms));
    // Persisted so that the next start knows whether a run was missed.
    // The in-memory copy follows, so a commit_poll of this state does not
    // write back an older value.
    pace.state.next_run_ms = Some(due_ms);
    if !source.schedule.keeps_next_run() {
        // A restart finds this instance's slot without it.
    } else if let Err(e) = shared.store.set_next_run(&inst.key, due_ms).await {
        warn!(instance = %inst.key, error = %format!("{e:#}"), "cannot record the next run time");
    }
}

/// Starts a poll under the lease held at `epoch`: waits while its renewal
/// is late; a lease lost or taken again under another epoch stops the
/// polling here.
async fn begin(
    cluster: &Arc<crate::cluster::Cluster>,
    key: &str,
    epoch: i64,
    shutdown: &CancellationToken,
) -> Result<crate::cluster::Busy, Stop> {
    loop {
        match cluster.begin(key) {
            crate::cluster::Begin::Held(b) if b.epoch == epoch => return Ok(b),
            crate::cluster::Begin::Held(_) | crate::cluster::Begin::NotHeld => {
                return Err(Stop::Lost { fenced: false })
            }
            crate::cluster::Begin::Lapsing => {
                // Renewal is late (the database is slow or away): no poll
                // on a lease that may be lapsing.
                tokio::select! {
                    _ = cluster.next_change(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Err(Stop::Done),
                }
            }
        }
    }
}

/// One poll under `busy` (its lease, given back only after it), and what
/// came of it in the instance's state, status and operational events.
async fn poll_under(
    shared: &Arc<Shared>,
    source: &Arc<Source>,
    inst: &Instance,
    env: &FetchEnv<'_>,
    pace: &mut Pace,
    memo: &mut Memo,
    busy: crate::cluster::Busy,
) -> Result<Polls, Stop> {
    let c = &source.connector;
    let started = Utc::now();
    if let Some(prev) = pace.last_start {
        let ms = (started - prev).num_milliseconds().max(0) as u64;
        shared
            .status
            .instance(&inst.key, |s| s.effective_interval_ms = Some(ms));
    }
    pace.last_start = Some(started);
    let took = std::time::Instant::now();
    let fence = busy.fence();
    // Inline: a poll in flight (HTTP, paging, detection) is kilobytes,
    // but this runs inside `poll_turn`, whose future is boxed for the
    // call only; a sleeping instance carries none of it.
    let outcome = poll_once(shared, source, inst, &pace.state, env, memo, Some(&fence)).await;
    drop(busy);
    shared
        .status
        .observe_poll(&source.name, &c.name, took.elapsed());
    let mut polls = Polls {
        changed: false,
        floor: None,
    };
    match outcome {
        Ok(Polled {
            state: next_state,
            events,
            floor: hint,
            refused,
        }) => {
            if let Some(n) = next_state {
                pace.state = n;
            }
            polls.floor = hint;
            polls.changed = events > 0;
            pace.failures = 0;
            match refused {
                // Committed, but not whole: an error of the instance
                // (on its status and as an operational event) that
                // backs nothing off, the other items went on.
                Some(msg) => {
                    warn!(instance = %inst.key, connector = %c.name, "item refused: {msg}");
                    shared.ops.instance_failed(&inst.key, &c.name, "item", &msg);
                }
                None => shared.ops.instance_ok(&inst.key, &c.name),
            }
        }
        Err(PollError::Deferred { wait }) => {
            // Not a failure: the connector's long-window quota has no
            // request left before `wait`. The next poll is then.
            tracing::debug!(instance = %inst.key, wait = ?wait, "poll put off by the connector's rate_limit");
            polls.floor = Some(deferred_floor(source, wait));
        }
        Err(PollError::Fenced(msg)) => {
            info!(instance = %inst.key, "{msg}");
            return Err(Stop::Lost { fenced: true });
        }
        Err(e) => poll_failed(shared, source, inst, pace, e).await,
    }
    Ok(polls)
}

/// The floor a deferred poll puts under the schedule: the connector's
/// `rate_limit` allows the next request in `wait`.
fn deferred_floor(source: &Source, wait: Duration) -> crate::hints::Floor {
    let c = &source.connector;
    crate::hints::Floor {
        at_least: wait,
        reason: format!(
            "rate_limit {}: next request allowed in {}",
            c.rate_limit
                .map(|r| format!("{}/{}", r.count, humantime::format_duration(r.per)))
                .unwrap_or_default(),
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        ),
    }
}

/// A failed poll: counted, logged, shown, announced; after a store error
/// the state is read again (the commit may have landed).
async fn poll_failed(
    shared: &Shared,
    source: &Source,
    inst: &Instance,
    pace: &mut Pace,
    e: PollError,
) {
    let c = &source.connector;
    pace.failures += 1;
    let failures = pace.failures;
    let msg = mask(&e.to_string(), &inst.secrets);
    warn!(instance = %inst.key, connector = %c.name, kind = e.kind(), failures, "poll failed: {msg}");
    shared
        .ops
        .instance_failed(&inst.key, &c.name, e.kind(), &msg);
    shared
        .status
        .polled(&inst.key, &source.name, &c.name, PollOutcome::Failed, |s| {
            s.last_poll_ms = Some(crate::now_ms());
            s.last_error = Some(msg);
        });
    if matches!(e, PollError::Store(_)) {
        // A commit whose outcome is unknown (a connection lost after the
        // server committed) may have landed: the next commit is written as
        // a change from what the store holds (see `StateWrite`), so that
        // is read again.
        if let Ok(s) = shared.store.load_state(&inst.key).await {
            pace.state = InstanceState {
                next_run_ms: pace.state.next_run_ms,
                ..s
            };
        }
    }
}

/// When the instance is due next (before jitter): the schedule (or the
/// adaptive interval), no sooner than the API's floor, later while it
/// fails. `None`: the schedule has no future run.
fn next_due(
    shared: &Shared,
    source: &Source,
    inst: &Instance,
    pace: &mut Pace,
    polls: &Polls,
) -> Option<chrono::DateTime<Utc>> {
    let now = Utc::now();
    let next = match source.schedule.adaptive {
        Some((min, max)) => {
            pace.interval = adapt(pace.interval, polls.changed, min, max);
            let after = pace.due.max(now);
            source
                .schedule
                .in_window(after + chrono::Duration::from_std(pace.interval).unwrap_or_default())
        }
        None => source.schedule.next_slot(now, pace.phase),
    };
    let mut next = next?;
    let floor = &polls.floor;
    // The API asked not to be polled again so soon (`X-Poll-Interval`,
    // `Cache-Control: max-age`, `Expires`): a floor under the schedule.
    if let Some(f) = floor {
        let earliest = now + chrono::Duration::from_std(f.at_least).unwrap_or_default();
        if next < earliest {
            next = source.schedule.in_window(earliest).unwrap_or(earliest);
        }
    }
    // A failing upstream is asked again later and later (never sooner
    // than the schedule says), then the schedule resumes on success.
    let backoff = error_backoff(pace.failures, MAX_ERROR_BACKOFF, rand::random::<f64>());
    if !backoff.is_zero() {
        let retry = now + chrono::Duration::from_std(backoff).unwrap_or_default();
        if retry > next {
            next = source.schedule.in_window(retry).unwrap_or(retry);
        }
    }
    // One update of the status (each unpacks and packs its entry).
    shared.status.instance(&inst.key, |s| {
        s.interval_floor_ms = floor.as_ref().map(|f| f.at_least.as_millis() as u64);
        s.interval_reason = floor.as_ref().map(|f| f.reason.clone());
        s.consecutive_failures = pace.failures;
        s.interval_ms = source
            .schedule
            .adaptive
            .map(|_| pace.interval.as_millis() as u64);
    });
    Some(next)
}

/// The longest wait between attempts of a failing instance.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(300);

/// What a poll that went through did.
struct Polled {
    /// The new state, when one was committed.
    state: Option<InstanceState>,
    /// Events committed.
    events: usize,
    /// The least wait the API asked for.
    floor: Option<crate::hints::Floor>,
    /// Why items were refused (nested too deep), secrets masked: the rest
    /// was committed, and this is the instance's error.
    refused: Option<String>,
}

/// One poll of one instance: fetch, detect, check the events' sizes,
/// commit the state with the events' deliveries, then report. Each step
/// is a function below, named for what it does.
async fn poll_once(
    shared: &Shared,
    source: &Source,
    inst: &Instance,
    state: &InstanceState,
    env: &FetchEnv<'_>,
    memo: &mut Memo,
    fence: Option<&crate::store::Fence>,
) -> Result<Polled, PollError> {
    let c = &source.connector;
    let now = Utc::now();
    let live = Transport::Live(env.client);
    let fetched = fetch_via(c, inst, state, env, live, now, Some(memo)).await?;
    if fetched.not_modified {
        record_not_modified(shared, source, inst);
        return Ok(Polled {
            state: None,
            events: 0,
            floor: fetched.floor,
            refused: None,
        });
    }
    let detection = detect(
        c,
        &inst.vars(),
        state,
        &fetched.pages,
        now,
        None,
        fetched.listing(),
    )
    .map_err(|e| PollError::Detect(e.to_string()))?;
    if let Some(w) = &fetched.warning {
        warn!(instance = %inst.key, connector = %c.name, "{}", mask(w, &inst.secrets));
    }
    let refused = refused_summary(&detection.refused, inst);
    let (next, events) = prepare_commit(source, inst, state, detection, &fetched, now);
    let bodies = serialize_bodies(&events)?;
    let committed = if &next != state || !events.is_empty() {
        let deliveries = route_deliveries(source, inst, &events, &bodies, now);
        commit_deliveries(shared, inst, state, &next, &deliveries, fence, now).await?;
        announce_events(shared, source, inst, &events);
        Some(next)
    } else {
        None
    };
    record_ok(
        shared,
        source,
        inst,
        committed.as_ref(),
        events.len(),
        refused.as_deref(),
        fetched.warning.as_deref(),
    );
    Ok(Polled {
        state: committed,
        events: events.len(),
        floor: fetched.floor.clone(),
        refused,
    })
}

/// `304 Not Modified`: the poll succeeded and nothing changed, so the
/// status says so (and clears the last error) without touching the store.
fn record_not_modified(shared: &Shared, source: &Source, inst: &Instance) {
    let c = &source.connector;
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
}

/// Items detection refused (nested too deep), as one line for the status
/// and the poll's result, secrets masked: the first reason and how many
/// more, so a page of bad items does not flood the status.
fn refused_summary(refused: &[String], inst: &Instance) -> Option<String> {
    match refused {
        [] => None,
        [one] => Some(mask(one, &inst.secrets)),
        [first, more @ ..] => Some(mask(
            &format!("{first}; and {} more items refused", more.len()),
            &inst.secrets,
        )),
    }
}

/// Each body is serialized once (invariant 5) and checked here: an event
/// too large to send is an error of the instance, committed nowhere: the
/// cursor stays, nothing is lost, the operator maps `data:` to a smaller
/// part of the item.
fn serialize_bodies(events: &[Event]) -> Result<Vec<String>, PollError> {
    let bodies: Vec<String> = events.iter().map(Event::body).collect();
    for (ev, body) in events.iter().zip(&bodies) {
        let size = body.len();
        if size > crate::event::MAX_EVENT_BYTES {
            return Err(PollError::Detect(format!(
                "event {} ({}) is {size} bytes, more than the {} KiB an event may carry: nothing emitted; map `data:` to a smaller part of the item",
                ev.id,
                ev.kind,
                crate::event::MAX_EVENT_BYTES / 1024
            )));
        }
    }
    Ok(bodies)
}

/// One outbox entry per event and per route that accepts its type, each
/// paired with its endpoint: what the commit writes beside the state.
fn route_deliveries(
    source: &Source,
    inst: &Instance,
    events: &[Event],
    bodies: &[String],
    now: chrono::DateTime<Utc>,
) -> Vec<(String, OutboxEntry)> {
    let mut deliveries = Vec::new();
    for (ev, body) in events.iter().zip(bodies) {
        for route in source.routes.iter().filter(|r| r.accepts(&ev.kind)) {
            deliveries.push((
                route.endpoint.clone(),
                OutboxEntry {
                    event_id: ev.id.clone(),
                    instance: inst.key.to_string(),
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
    deliveries
}

/// Commits `next` and the deliveries in one store transaction (under the
/// lease's fence), keeping the endpoints' backlogs in step, and wakes the
/// endpoints' workers once the entries are there to send.
async fn commit_deliveries(
    shared: &Shared,
    inst: &Instance,
    state: &InstanceState,
    next: &InstanceState,
    deliveries: &[(String, OutboxEntry)],
    fence: Option<&crate::store::Fence>,
    now: chrono::DateTime<Utc>,
) -> Result<(), PollError> {
    // Counted as waiting before the commit, so a worker never
    // delivers an entry that its endpoint's backlog does not hold yet.
    let mut backlog = std::collections::BTreeMap::<&str, u64>::new();
    for (ep, _) in deliveries {
        *backlog.entry(ep.as_str()).or_default() += 1;
    }
    for (ep, n) in &backlog {
        shared.status.queued(ep, *n, now.timestamp_millis());
    }
    if let Err(e) = shared
        .store
        .commit_fenced(&inst.key, state, next, deliveries, fence)
        .await
    {
        for (ep, n) in &backlog {
            shared.status.unqueued(ep, *n, now.timestamp_millis());
        }
        return Err(commit_refused(shared, e));
    }
    shared.status.store_ok();
    for (ep, _) in deliveries {
        if let Some(w) = shared.live.wake(ep) {
            w.instance(&inst.key);
        }
    }
    Ok(())
}

/// The error of a commit the store refused: fenced (the lease passed on),
/// the instance's data (the store stays ready), or the store's own failure
/// (which `/readyz` reports).
fn commit_refused(shared: &Shared, e: crate::store::StoreError) -> PollError {
    if let crate::store::StoreError::Fenced { .. } = e {
        return PollError::Fenced(e.to_string());
    }
    let refused = matches!(
        e,
        crate::store::StoreError::Refused { .. } | crate::store::StoreError::BadName { .. }
    );
    let e = commit_failed(&e);
    if !refused {
        shared.status.store_failed(&e.to_string());
    }
    // Else the store refused this instance's data (a value the
    // database cannot hold, a name no key may be): the instance's
    // failure, not the node's; `/readyz` stays as the other writes find it.
    e
}

/// Counts and logs the committed events, only once they are committed, so
/// the counters and the log never show an event the store does not hold.
fn announce_events(shared: &Shared, source: &Source, inst: &Instance, events: &[Event]) {
    for ev in events {
        shared.status.count_event(&source.name, &ev.kind);
        info!(instance = %inst.key, event = %ev.id, r#type = %ev.kind, sequence = ev.sequence, "change detected");
    }
}

/// A poll that succeeded: the status takes its events, the refused items
/// and the paging warning (secrets masked), and the committed cursor.
fn record_ok(
    shared: &Shared,
    source: &Source,
    inst: &Instance,
    committed: Option<&InstanceState>,
    events: usize,
    refused: Option<&str>,
    warning: Option<&str>,
) {
    let cursor = committed.map(|s| s.cursor.clone());
    let evicted = committed.map(|s| s.seen_evicted);
    shared.status.polled(
        &inst.key,
        &source.name,
        &source.connector.name,
        PollOutcome::Ok,
        |s| {
            s.events += events as u64;
            s.last_poll_ms = Some(crate::now_ms());
            s.last_ok_ms = s.last_poll_ms;
            s.last_error = refused.map(str::to_owned);
            s.last_warning = warning.map(|w| mask(w, &inst.secrets));
            if let Some(c) = cursor {
                s.cursor = c;
            }
            if let Some(n) = evicted {
                s.seen_evicted = n;
            }
        },
    );
}

/// A commit that failed is the store's failure, not the upstream's nor
/// detection's: the status and logs say `store`, so an operator looks at
/// the disk (or database), not at the connector. Nothing was written, so
/// the next poll detects the same changes again.
fn commit_failed(e: &crate::store::StoreError) -> PollError {
    PollError::Store(format!("{e:#}"))
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
        next.etag = fetched.etag.as_deref().map(Box::from);
        next.last_modified = fetched.last_modified.as_deref().map(Box::from);
        next.validator_url = if next.etag.is_some() || next.last_modified.is_some() {
            fetched.first_url.as_deref().map(UrlTag::of)
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
                id: event_id(&source.name, inst.name(), &d.kind, &d.change_key),
                kind: d.kind,
                timestamp: now,
                source: source.name.clone(),
                instance: inst.name().to_string(),
                sequence: seq,
                data: d.data,
            }
        })
        .collect();
    next.sequence = seq;
    (next, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of four arguments returns,
    /// without making one (no store, no cluster needed): the size of the
    /// state every such task keeps for its whole life.
    fn future_size<A, B, C, D, E, F>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A poll task spends its life waiting: for its next poll, in the
    /// boxed [`poll_held`], or for the same lease again after a fenced
    /// commit. Inline, it carried the whole polling state, 3,880 bytes;
    /// with the instance shared and the polling boxed, 504 bytes, most of
    /// it room for the rare wait after a fenced commit (boxed now: 136).
    ///
    /// While it holds the lease, the boxed part waits for the next poll:
    /// its store calls, the pace's making and each turn of polling are
    /// boxed in turn (allocated for the call only). It was 1,400 bytes,
    /// two of them dead copies of the state the pace was made from; now
    /// 320 and the pace. Heaptrack at 20,000 instances: 31 MiB of boxed
    /// futures at rest, the most of anything.
    #[test]
    fn a_waiting_poll_task_is_small() {
        let size = future_size(poll_loop);
        assert!(size <= 256, "poll_loop's future is {size} bytes");
        fn held<A, B, C, D, E, G, F>(_: impl FnOnce(A, B, C, D, E, G) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = held(poll_held);
        assert!(size <= 512, "poll_held's future is {size} bytes");
    }

    #[test]
    fn a_failed_commit_is_a_store_error() {
        let e = crate::store::StoreError::Backend {
            op: "commit poll",
            source: "No space left on device".into(),
        };
        let p = commit_failed(&e);
        assert_eq!(p.kind(), "store");
        assert_eq!(
            p.to_string(),
            "cannot commit to the store: store commit poll failed: No space left on device"
        );
    }
}
