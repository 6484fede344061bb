//! The roster: the instances this node's configuration has, and a poll
//! task for each one whose lease this node holds, and for no other.
//!
//! Why not a task per instance, each waiting for its lease: in a cluster
//! of N nodes every node has the whole configuration, so every node kept
//! the whole fleet in tasks (100,000 instances on 3 nodes: 100,000 tasks
//! per node, two thirds of them waiting for a lease they would not get),
//! and every change of the held set woke all of them to look. Here an
//! instance this node does not hold costs one map entry, and one task
//! (the roster's [`Roster::run`]) watches the held set: it starts the
//! poll task of each instance gained. A poll task ends when its lease
//! goes ([`Roster::held_or_leave`]) and starts again when it comes back.
//! Alone (`SingleNode`) every lease is held from the first round, so every
//! instance has its task, as before.
//!
//! An instance whose next poll is a while away has no task either: it is
//! *parked* ([`Roster::park`]). Its pace waits in its [`Unit`], and the
//! roster's timer (a map ordered by due time, one task for all: a timer
//! wheel in the spirit of Vector's and Tokio's own) starts its task again
//! when the poll is due. At 100,000 instances on `every 60s`, a task per
//! instance asleep (cell, boxed future, cancellation token) was about
//! 700 bytes of each instance's memory, for a wake-up a minute.
//!
//! A held instance with neither waits in the roster's queue for a turn
//! to read its stored state ([`Shared::state_loads`]): the roster spawns
//! its task with the turn taken. A node's first round (every lease, alone)
//! or a dead node's share gains thousands of leases at once; a task each,
//! waiting for its turn, was the node's memory peak (and an allocator
//! that keeps freed pages a while, such as jemalloc, kept it).
//!
//! The race it must not lose: a lease lost and gained again while the old
//! task is ending. The task decides to end under the roster's lock, after
//! reading the held set; the roster starts tasks under the same lock, after
//! the change is announced. Either the ending task sees the lease again and
//! goes on, or it has marked itself ended before the roster looks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connector::spec::Instance;
use crate::runtime::{Shared, Source};

use super::{Parked, Start};

/// See the module documentation.
pub(crate) struct Roster {
    shared: Arc<Shared>,
    /// The daemon's shutdown: no task starts after it, and every running
    /// one sees it through its own token (a child of this one).
    shutdown: CancellationToken,
    /// Keyed by the instance's own key (shared with its [`Instance`], not
    /// a copy).
    units: Mutex<HashMap<Arc<str>, Unit>>,
    /// Tasks of instances stopped (removed or changed by a reload) until
    /// they end: a restarted instance waits for its old task's in-flight
    /// poll, so two tasks never commit the same state.
    stopping: Mutex<Vec<(Arc<str>, JoinHandle<()>)>>,
    /// What [`Roster::join_all`] waits for, to abort if the shutdown
    /// timeout passes first.
    joining: Mutex<Vec<AbortHandle>>,
    /// The most poll tasks running since the allocator was last asked to
    /// give memory back (see [`Roster::left`]).
    high: AtomicUsize,
    /// Parked instances by due time (and a sequence number: the entry of
    /// an instance parked again, stopped or woken early is left behind,
    /// and skipped when it comes up). Locked after `units`, never before.
    timers: Mutex<BTreeMap<(Instant, u64), Arc<Instance>>>,
    /// The next parking's sequence number.
    parkings: AtomicU64,
    /// Held instances waiting for a turn to read their state (see the
    /// module documentation), in the order their lease came. An entry
    /// whose unit is no longer [`Slot::Queued`] is stale, and skipped (a
    /// unit queued twice starts once: at its first entry).
    /// Locked after `units`, never before.
    queue: Mutex<VecDeque<Arc<Instance>>>,
    /// Told when an instance is parked ahead of every other (the timer
    /// sleeps until then instead), or queued from outside the roster's
    /// own task (a reload, a discovery).
    earlier: Notify,
}

/// One configured instance.
struct Unit {
    source: Arc<Source>,
    inst: Arc<Instance>,
    /// Its poll task, or its parked pace, while this node holds its lease
    /// (or the task ended for good: a schedule with no future run).
    /// `None`: not held.
    task: Option<Slot>,
}

/// Where a held instance's polling is.
enum Slot {
    /// Its task waits in the queue for a turn to read its state.
    Queued,
    /// Its task runs: a poll, or a short wait for the next one.
    Running(Running),
    /// Its next poll is a while away (see [`Roster::park`]); `seq` is its
    /// entry in the timer.
    Parked { parked: Parked, seq: u64 },
}

struct Running {
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl Roster {
    pub(crate) fn new(shared: Arc<Shared>, shutdown: CancellationToken) -> Arc<Roster> {
        Arc::new(Roster {
            shared,
            shutdown,
            units: Mutex::default(),
            stopping: Mutex::default(),
            joining: Mutex::default(),
            high: AtomicUsize::new(0),
            timers: Mutex::default(),
            parkings: AtomicU64::new(0),
            queue: Mutex::default(),
            earlier: Notify::new(),
        })
    }

    /// Starts the poll tasks of the instances gained, at each change of
    /// the held set, as turns to read their state come, and of the parked
    /// instances that came due, until shutdown.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut changes = self.shared.cluster.changes();
        let mut changed = true;
        let mut turn = None;
        loop {
            if changed {
                changes.borrow_and_update();
                self.start_held();
            }
            let queued = self.start_queued(turn.take());
            let next = self.wake_due();
            changed = false;
            let turns = self.shared.state_loads.clone();
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    changed = true;
                }
                // Cancel-safe: a turn not taken by the time another branch
                // wins is not lost.
                t = turns.acquire_owned(), if queued => turn = t.ok(),
                _ = self.earlier.notified() => {}
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Queues for a task each instance held that has none. A parked or
    /// queued instance whose lease went is dropped (nothing of it is left
    /// here); a parked one whose lease was taken again under another
    /// epoch is queued (its state is read again, and its first poll is
    /// due as after a move, not at the old pace's time). Looks at every
    /// unit: the held set changes seldom (a claim, a loss, a node joining
    /// or leaving).
    fn start_held(self: &Arc<Self>) {
        let cluster = &self.shared.cluster;
        let mut units = self.units.lock();
        let mut queue = self.queue.lock();
        if self.shutdown.is_cancelled() {
            return;
        }
        // Queued soonest due first (see `Cluster::due_hint`): what a
        // claim brought with no stored run comes first (never polled, or
        // a short `every`: due within its period), then by the run its
        // last holder stored.
        let mut gained: Vec<(Option<i64>, Arc<Instance>)> = Vec::new();
        for u in units.values_mut() {
            let epoch = cluster.epoch(&u.inst.key);
            let again = match (&u.task, epoch) {
                (Some(Slot::Running(_)), _) => continue,
                (_, None) => {
                    u.task = None;
                    continue;
                }
                (Some(Slot::Parked { parked, .. }), Some(e)) => parked.epoch != e,
                (Some(Slot::Queued), Some(_)) => false,
                (None, Some(_)) => true,
            };
            // Held under the parked epoch it wakes when due; queued, it
            // keeps its place.
            if again {
                u.task = Some(Slot::Queued);
                gained.push((cluster.due_hint(&u.inst.key), u.inst.clone()));
            }
        }
        gained.sort_unstable_by_key(|(due, _)| *due);
        queue.extend(gained.into_iter().map(|(_, inst)| inst));
    }

    /// Starts queued instances' tasks while turns to read their state
    /// are free (`turn`: one the roster waited for); returns whether any
    /// are left waiting for one.
    fn start_queued(self: &Arc<Self>, mut turn: Option<OwnedSemaphorePermit>) -> bool {
        let mut units = self.units.lock();
        let mut queue = self.queue.lock();
        if self.shutdown.is_cancelled() {
            queue.clear();
            return false;
        }
        while let Some(inst) = queue.front() {
            let unit = units
                .get_mut(&*inst.key)
                .filter(|u| matches!(u.task, Some(Slot::Queued)));
            let Some(u) = unit else {
                // Stale: started, dropped or stopped since.
                queue.pop_front();
                continue;
            };
            let free = turn
                .take()
                .or_else(|| self.shared.state_loads.clone().try_acquire_owned().ok());
            let Some(t) = free else {
                return true;
            };
            queue.pop_front();
            u.task = Some(Slot::Running(self.spawn(
                &u.source,
                &u.inst,
                Start::Load(t),
            )));
        }
        false
    }

    /// Keeps `parked` in the instance's unit until its next poll is due,
    /// with no task (see the module documentation). Called by its poll
    /// task as it returns. An instance stopped meanwhile (a reload, a
    /// discovery) is dropped, and so is everything at shutdown.
    pub(super) fn park(&self, inst: &Arc<Instance>, parked: Parked) {
        let due = parked.due();
        let mut units = self.units.lock();
        if self.shutdown.is_cancelled() {
            return;
        }
        let Some(u) = units.get_mut(&*inst.key) else {
            return;
        };
        let seq = self.parkings.fetch_add(1, Ordering::Relaxed);
        u.task = Some(Slot::Parked { parked, seq });
        let mut timers = self.timers.lock();
        let first = timers.first_key_value().map(|((t, _), _)| *t);
        timers.insert((due, seq), inst.clone());
        drop(timers);
        drop(units);
        if first.is_none_or(|f| due < f) {
            self.earlier.notify_one();
        }
    }

    /// Starts the task of every parked instance now due; returns when the
    /// next one is.
    fn wake_due(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut units = self.units.lock();
        let mut timers = self.timers.lock();
        if self.shutdown.is_cancelled() {
            return None;
        }
        while let Some(entry) = timers.first_entry() {
            let (due, seq) = *entry.key();
            if due > now {
                return Some(due);
            }
            let inst = entry.remove();
            let Some(u) = units.get_mut(&*inst.key) else {
                continue;
            };
            u.task = match u.task.take() {
                Some(Slot::Parked { parked, seq: s }) if s == seq => Some(Slot::Running(
                    self.spawn(&u.source, &u.inst, Start::Resume(parked)),
                )),
                // Parked again since, woken early, queued or running: a
                // stale entry.
                other => other,
            };
        }
        None
    }

    fn spawn(
        self: &Arc<Self>,
        source: &Arc<Source>,
        inst: &Arc<Instance>,
        start: Start,
    ) -> Running {
        let token = self.shutdown.child_token();
        let fresh = matches!(start, Start::Load(_));
        let task = super::poll_loop(
            self.clone(),
            source.clone(),
            inst.clone(),
            token.clone(),
            start,
        );
        if fresh {
            let running = self.shared.status.poll_tasks() + 1;
            self.high.fetch_max(running, Ordering::Relaxed);
        }
        Running {
            token,
            handle: tokio::spawn(task),
        }
    }

    /// Adds an instance of the configuration (at start, by a reload, by
    /// discovery): it is listed in `/status`, gets a lease row, and a poll
    /// task once this node holds its lease. An instance stopped before
    /// under the same key has finished its in-flight poll first.
    pub(crate) async fn start(self: &Arc<Self>, source: Arc<Source>, inst: Arc<Instance>) {
        let key = inst.key.clone();
        self.stop(&key);
        let old: Vec<JoinHandle<()>> = {
            let mut stopping = self.stopping.lock();
            let (mine, rest) = std::mem::take(&mut *stopping)
                .into_iter()
                .partition(|(k, _)| *k == key);
            *stopping = rest;
            mine.into_iter().map(|(_, h)| h).collect()
        };
        for h in old {
            let _ = h.await;
        }
        // Every node lists every instance; `/status` says which node
        // holds it.
        self.shared.status.register_instance(&key, |s| {
            s.source = source.name.as_str().into();
            s.instance = inst.name().to_string();
            s.connector = source.connector.name.as_str().into();
        });
        let cluster = &self.shared.cluster;
        let mut units = self.units.lock();
        let held = cluster.epoch(&key).is_some() && !self.shutdown.is_cancelled();
        if held {
            self.queue.lock().push_back(inst.clone());
        }
        let task = held.then_some(Slot::Queued);
        units.insert(key.clone(), Unit { source, inst, task });
        drop(units);
        if held {
            self.earlier.notify_one();
        }
        cluster.want(&key);
    }

    /// Removes an instance (a reload removed or changed it, discovery
    /// lost it): its task, if it has one, finishes its in-flight poll and
    /// ends; its lease row is pruned unless it comes back (see
    /// [`crate::cluster::Cluster::unwant`]).
    pub(crate) fn stop(&self, key: &str) {
        let Some((key, unit)) = self.units.lock().remove_entry(key) else {
            return;
        };
        self.shared.cluster.unwant(&key);
        let mut stopping = self.stopping.lock();
        stopping.retain(|(_, h)| !h.is_finished());
        // A parked or queued instance has no task: dropped with its unit
        // (its timer or queue entry is skipped when it comes up).
        if let Some(Slot::Running(Running { token, handle })) = unit.task {
            token.cancel();
            stopping.push((key, handle));
        }
    }

    /// Called by a poll task that is not polling: the epoch this node
    /// holds the instance's lease under, or `None`, and then the task has
    /// been marked ended and must return (the roster starts another when
    /// the lease comes back). Decided under the roster's lock, see the
    /// module documentation.
    pub(super) fn held_or_leave(&self, key: &str) -> Option<i64> {
        let mut units = self.units.lock();
        let epoch = self.shared.cluster.epoch(key);
        if epoch.is_none() {
            if let Some(u) = units.get_mut(key) {
                u.task = None;
            }
            drop(units);
            self.left();
        }
        epoch
    }

    /// A poll task is ending because its lease went. When a quarter of
    /// the tasks (at least 1,000) have gone since the peak, the allocator
    /// is asked to give its free pages back: glibc keeps what its arenas
    /// once held, so a node that gave two thirds of its leases to nodes
    /// that joined stayed at the resident size of its old share.
    fn left(&self) {
        let now = self.shared.status.poll_tasks();
        let high = self.high.load(Ordering::Relaxed);
        if high >= now + 1_000 && now < high - high / 4 {
            self.high.store(now, Ordering::Relaxed);
            crate::memory::give_back_free_memory();
        }
    }

    /// The state the tasks share.
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits for every poll task to end (the shutdown token is cancelled
    /// first: each finishes its in-flight poll).
    pub(crate) async fn join_all(&self) {
        let handles: Vec<JoinHandle<()>> = {
            let mut units = self.units.lock();
            let mut all: Vec<JoinHandle<()>> = units
                .values_mut()
                .filter_map(|u| match u.task.take() {
                    Some(Slot::Running(r)) => Some(r.handle),
                    _ => None,
                })
                .collect();
            all.extend(
                std::mem::take(&mut *self.stopping.lock())
                    .into_iter()
                    .map(|(_, h)| h),
            );
            all
        };
        *self.joining.lock() = handles.iter().map(|h| h.abort_handle()).collect();
        for h in handles {
            let _ = h.await;
        }
    }

    /// Aborts what [`Roster::join_all`] still waits for (the shutdown
    /// timeout passed).
    pub(crate) fn abort_all(&self) {
        for a in std::mem::take(&mut *self.joining.lock()) {
            a.abort();
        }
    }
}
