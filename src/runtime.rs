//! What every stage shares at run time: the pollers' context
//! (`Shared`), what a reload swaps under running tasks ([`Live`]),
//! named tasks replaced only after the old one finished ([`Tasks`]), and
//! the resolved [`Source`]s and [`Route`]s that `config` builds and the
//! tasks run (the connector's own [`Instance`] is `connector::spec`'s).
//!
//! It sits below the tasks that use it (`poll`, `discover`, `admin`,
//! `daemon`) and above the services it holds (`cluster`, `opsevents`,
//! `quota`, `store`, `status`, `connector::auth`, `access`, `wake`);
//! see the layers in `ARCHITECTURE.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access::{Failures, Sessions};
use crate::cluster::Cluster;
use crate::connector::auth::TokenCache;
use crate::connector::spec::{Connector, Instance};
use crate::opsevents::Ops;
use crate::quota::HostGates;
use crate::schedule::Schedule;
use crate::status::Status;
use crate::store::Store;
use crate::wake::{Wake, Wakes};

/// What pollers share.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) status: Arc<Status>,
    pub(crate) client: reqwest::Client,
    pub(crate) hosts: Arc<HostGates>,
    /// OAuth2 tokens shared by every instance.
    pub(crate) tokens: TokenCache,
    /// What a reload may change under running tasks.
    pub(crate) live: Arc<Live>,
    /// The nodes this one is part of: which instances it polls and
    /// delivers for (alone, on sled's `SingleNode`: every one, the same
    /// path).
    pub(crate) cluster: Arc<Cluster>,
    /// pollhook's own events (`operations:`).
    pub(crate) ops: Arc<Ops>,
    /// Poll tasks reading their stored state as their lease comes, at
    /// most [`STATE_LOADS`] at once. A node gains thousands of leases in
    /// one round (its first, or a dead node's share): unbounded, every new
    /// task held a store read in flight, a few KiB of future each, and the
    /// node's memory peaked there (the allocator keeps such a peak).
    /// The roster takes a turn before it even starts a task (see
    /// `poll::Start::Load`), so the instances waiting for one are
    /// a queue entry each, not a task.
    pub(crate) state_loads: Arc<tokio::sync::Semaphore>,
}

/// See [`Shared::state_loads`]: twice the PostgreSQL pool, so reads wait
/// in this queue (a few bytes each) rather than the pool's.
pub(crate) const STATE_LOADS: usize = 32;

/// The parts of the running configuration that pollers and the admin
/// server read while a reload may replace them.
#[derive(Default)]
pub struct Live {
    /// Delivery workers' wake-ups, by endpoint: pollers poke them after a
    /// commit, the admin server after a replay. A restarted worker keeps
    /// its endpoint's `Wake`.
    pub wakes: Arc<Wakes>,
    /// The admin bearer token (`admin.token`), rotated by a reload.
    pub admin_token: RwLock<Option<String>>,
    /// The bridge's `user_agent` for polls, changed by a reload.
    pub user_agent: RwLock<Option<Arc<str>>>,
    /// `admin.allowed_hosts`, changed by a reload.
    pub admin_hosts: RwLock<Vec<String>>,
    /// The dashboard's sessions: all end when the token changes.
    pub sessions: Sessions,
    /// Failed admin token attempts per client.
    pub failures: Failures,
}

impl Live {
    /// Sets the admin token and allowed hosts of a (re)loaded
    /// configuration; a changed token ends every dashboard session.
    pub fn set_admin(&self, token: Option<String>, hosts: Vec<String>) {
        let mut current = self.admin_token.write();
        if *current != token {
            self.sessions.end_all();
        }
        *current = token;
        drop(current);
        *self.admin_hosts.write() = hosts;
    }

    pub fn admin_hosts(&self) -> Vec<String> {
        self.admin_hosts.read().clone()
    }

    pub fn wake(&self, endpoint: &str) -> Option<Arc<Wake>> {
        self.wakes.wake(endpoint)
    }

    pub fn user_agent(&self) -> Option<Arc<str>> {
        self.user_agent.read().clone()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.wakes.endpoints()
    }
}

/// Named tasks that can be stopped, replaced and drained: the poll tasks
/// and discovery loops of the supervisor, the delivery workers, and the
/// instance tasks of a discovering source.
///
/// Why not a `JoinSet`: an instance that leaves and comes back (or whose
/// params change) must not have two tasks polling and committing its state
/// at once, so a new task waits for the old one of the same name to finish
/// its in-flight poll.
#[derive(Default)]
pub struct Tasks {
    tasks: BTreeMap<String, (CancellationToken, JoinHandle<()>)>,
    stopping: BTreeMap<String, JoinHandle<()>>,
}

impl Tasks {
    pub async fn start<F>(&mut self, name: &str, token: CancellationToken, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.stop(name);
        if let Some(old) = self.stopping.remove(name) {
            let _ = old.await;
        }
        self.tasks
            .insert(name.to_string(), (token, tokio::spawn(task)));
    }

    pub fn stop(&mut self, name: &str) {
        if let Some((token, handle)) = self.tasks.remove(name) {
            token.cancel();
            self.stopping.insert(name.to_string(), handle);
        }
        // Forget stopped tasks that are done.
        self.stopping.retain(|_, h| !h.is_finished());
    }

    /// Waits for every task (cancel their tokens first).
    /// Cancel-safe: a task leaves the map only once it has finished, so
    /// what a timed-out wait leaves behind is still there to abort.
    pub async fn join_all(&mut self) {
        while let Some(name) = self.tasks.keys().next().cloned() {
            if let Some((_, h)) = self.tasks.get_mut(&name) {
                let _ = h.await;
            }
            self.tasks.remove(&name);
        }
        while let Some(name) = self.stopping.keys().next().cloned() {
            if let Some(h) = self.stopping.get_mut(&name) {
                let _ = h.await;
            }
            self.stopping.remove(&name);
        }
    }

    /// Aborts what is still running (a shutdown deadline passed).
    pub async fn abort_all(&mut self) {
        for (_, (_, h)) in std::mem::take(&mut self.tasks) {
            h.abort();
            let _ = h.await;
        }
        for (_, h) in std::mem::take(&mut self.stopping) {
            h.abort();
            let _ = h.await;
        }
    }
}

/// A source: a connector run for someone, with its instances.
pub struct Source {
    pub name: String,
    pub connector: Arc<Connector>,
    pub schedule: Schedule,
    /// Static instances (`for_each` lists, or the one `default`); empty for
    /// `for_each: discover`, whose instances are found at run time.
    pub instances: Vec<Arc<Instance>>,
    pub routes: Vec<Route>,
    /// `for_each: discover`.
    pub discovered: bool,
    /// Params' defaults with the source's `with` values: the variables of
    /// every instance before its own values.
    pub base_vars: Arc<Map<String, Value>>,
    /// How long the state of an instance that left the discovered list is kept.
    pub retention: Duration,
    /// `for_each: discover`: when the list is refreshed.
    pub discover_schedule: Option<Schedule>,
}

impl Source {
    /// An instance of a `for_each: discover` source with its discovered param
    /// values (typed like the params' defaults).
    pub fn discovered_instance(&self, name: &str, with: &Map<String, Value>) -> Instance {
        let own = with.iter().map(|(k, v)| {
            let default = self
                .connector
                .params
                .get(k)
                .and_then(|p| p.default.as_ref());
            (k.clone(), coerce(v, default))
        });
        Instance::new(
            &self.name,
            name,
            &self.connector,
            self.base_vars.clone(),
            own,
        )
    }
}

/// Which events go to one endpoint.
#[derive(Debug, Clone)]
pub struct Route {
    pub endpoint: String,
    /// `None`: every type.
    pub types: Option<BTreeSet<String>>,
}

impl Route {
    pub fn accepts(&self, kind: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.contains(kind))
    }
}

/// How long the state of an instance no longer polled is kept (a source's
/// `retention`): long enough to undo a mistaken edit or outage.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86400);

/// A discovered or `--param` value typed like its param's default.
pub(crate) fn coerce(v: &Value, default: Option<&Value>) -> Value {
    match (v, default) {
        (Value::String(s), Some(Value::Number(_))) => s
            .parse::<serde_json::Number>()
            .map(Value::Number)
            .unwrap_or_else(|_| v.clone()),
        (Value::String(s), Some(Value::Bool(_))) => s
            .parse::<bool>()
            .map(Value::Bool)
            .unwrap_or_else(|_| v.clone()),
        _ => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_of_the_same_name_starts_only_after_the_old_one_finished() {
        let mut tasks = Tasks::default();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o1, t1) = (order.clone(), CancellationToken::new());
        let first = t1.clone();
        tasks
            .start("a", t1, async move {
                first.cancelled().await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                o1.lock().unwrap().push("old done");
            })
            .await;
        let o2 = order.clone();
        tasks
            .start("a", CancellationToken::new(), async move {
                o2.lock().unwrap().push("new started");
            })
            .await;
        tasks.join_all().await;
        assert_eq!(*order.lock().unwrap(), vec!["old done", "new started"]);
    }

    #[test]
    fn live_reads_its_wake_ups() {
        let live = Live::default();
        live.wakes.get_or_insert("ep");
        assert!(live.wake("ep").is_some());
        assert!(live.wake("other").is_none());
        assert_eq!(live.endpoints(), vec!["ep".to_string()]);
    }
}
