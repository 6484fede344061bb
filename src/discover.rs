//! `for_each: discover`: the instances of a source found at run time from
//! the connector's `discover:` request (e.g. `GET /accounts`), refreshed on
//! its own schedule.
//!
//! [`discover`] is one listing (no store, used by `pollhook test` too);
//! [`run_source`] is the daemon's loop for one source: it keeps one poll
//! task per discovered instance, starts the newcomers, stops the ones that
//! left (their state is kept for the source's `retention`, so an instance
//! that comes back resumes from its cursor), and remembers the list in the
//! store so that polling starts at once after a restart even when the
//! listing endpoint is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use minijinja::Value as Ctx;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::connector::fetch::{fetch, FetchEnv, PollError};
use crate::connector::mask;
use crate::connector::spec::Instance;
use crate::runtime::Source;
use crate::runtime::Tasks;
use crate::store::{Discovered, InstanceState, Store};

/// One discovered instance: its name and its own param values.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub name: String,
    pub with: Map<String, Value>,
}

/// The most instances one discovering source may start: each is a task
/// and a state, and a listing gone wrong (an API answering every record it
/// has) must be an error of the source, not a daemon running out of memory.
pub const MAX_DISCOVERED: usize = 50_000;

/// Lists a discovering source's instances once.
pub async fn discover(
    source: &Source,
    env: &FetchEnv<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Found>, PollError> {
    let d = source
        .connector
        .discover
        .as_ref()
        .ok_or_else(|| PollError::Detect("the connector has no `discover:`".into()))?;
    let lister = &d.lister;
    let base = source.discovered_instance("(discover)", &Map::new());
    let fetched = fetch(lister, &base, &InstanceState::default(), env, now).await?;
    if let Some(w) = &fetched.warning {
        // A partial list would stop every instance not on the pages read.
        return Err(PollError::Detect(format!(
            "discovery listing incomplete, instances left unchanged: {w}"
        )));
    }
    let items = lister.items.as_ref().expect("discover has items");
    let name_tpl = lister.id.as_ref().expect("discover has a name");
    let mut out: Vec<Found> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for page in &fetched.pages {
        // An error body is not an empty list (which would stop every instance).
        if let (Some(parent), false) = (&lister.items_parent, fetched.xml) {
            if parent.query(page).is_empty() {
                return Err(PollError::Detect(format!(
                    "the discovery answer has no list at `discover.items`: {}",
                    crate::connector::detect::preview(page)
                )));
            }
        }
        for item in items.query(page).all() {
            let mut ctx = (*source.base_vars).clone();
            ctx.insert("item".into(), item.clone());
            ctx.insert(
                "now".into(),
                Value::String(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            );
            let ctx = Ctx::from_serialize(&ctx);
            let name = lister
                .engine
                .render(name_tpl, &ctx)
                .map_err(|e| PollError::Detect(format!("discover.name: {e}")))?;
            let name = name.trim().to_string();
            // A name is logged, shown and used as a key: one with control
            // characters (a newline and an escape forged a log line) is
            // upstream garbage or an attack, skipped rather than failing
            // the whole listing.
            if name.contains(crate::logfmt::is_unsafe_char) {
                warn!(source = %source.name, name = ?name, "discover.name rendered a name with control characters; that item is skipped");
                continue;
            }
            // A name is a store key (an index entry, on PostgreSQL) and
            // the upstream decides its length: a longer one is refused,
            // that item alone, and named (its start) so it can be found.
            let key_len = source.name.len() + 1 + name.len();
            if key_len > crate::store::MAX_NAME_BYTES {
                let start: String = name.chars().take(64).collect();
                warn!(
                    source = %source.name,
                    name = %start,
                    bytes = name.len(),
                    "discover.name rendered a name too long for an instance (`source/name` at most {} bytes); that item is skipped",
                    crate::store::MAX_NAME_BYTES
                );
                continue;
            }
            if name.is_empty() || name.contains('/') {
                return Err(PollError::Detect(format!(
                    "discover.name rendered `{name}` for {item}: an instance name must be non-empty and without `/`"
                )));
            }
            let mut with = Map::new();
            for (k, t) in &d.with {
                let v = lister
                    .engine
                    .render(t, &ctx)
                    .map_err(|e| PollError::Detect(format!("discover.with.{k}: {e}")))?;
                with.insert(k.clone(), Value::String(v));
            }
            if names.insert(name.clone()) {
                if out.len() == MAX_DISCOVERED {
                    return Err(PollError::Detect(format!(
                        "the discovery listing has more than {MAX_DISCOVERED} instances: refused (instances left unchanged); list less, or split the source"
                    )));
                }
                out.push(Found { name, with });
            }
        }
    }
    Ok(out)
}

/// The changes between two listings.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// New names, or names whose param values changed (restarted).
    pub start: Vec<Found>,
    /// Names no longer listed.
    pub stop: Vec<String>,
}

/// Compares the running set with a new listing. Pure.
pub fn diff(running: &BTreeMap<String, Map<String, Value>>, found: &[Found]) -> Diff {
    let mut d = Diff::default();
    for f in found {
        if running.get(&f.name) != Some(&f.with) {
            d.start.push(f.clone());
        }
    }
    for name in running.keys() {
        if !found.iter().any(|f| &f.name == name) {
            d.stop.push(name.clone());
        }
    }
    d
}

/// Everything [`run_source`] uses.
pub struct DiscoverEnv<'a> {
    pub store: &'a Store,
    pub status: &'a crate::status::Status,
    pub env: FetchEnv<'a>,
    /// One node lists the source (the holder of its discovery lease); the
    /// others, if any, follow the list it stores.
    pub cluster: Arc<crate::cluster::Cluster>,
}

/// The daemon's loop for one discovering source, until `shutdown`.
///
/// `spawn` makes the poll task of one instance; it must return when the
/// token it is given is cancelled (the instance left the list, or shutdown).
pub async fn run_source<F, Fut>(
    source: Arc<Source>,
    cx: DiscoverEnv<'_>,
    spawn: F,
    shutdown: CancellationToken,
) where
    F: Fn(Instance, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let known: Discovered = match cx.store.load_discovered(&source.name).await {
        Ok(k) => k,
        Err(e) => {
            warn!(source = %source.name, error = %format!("{e:#}"), "cannot read the discovered list; starting from an empty one");
            Discovered::default()
        }
    };
    let mut l = SourceLoop {
        // Secret params given by the source, masked in discovery errors.
        secrets: source.discovered_instance("-", &Map::new()).secrets,
        source,
        cx,
        spawn,
        shutdown,
        known: Discovered::default(),
        running: Tasks::default(),
    };
    // What was found last time polls at once, before the first listing.
    for (name, with) in &known.instances {
        l.start(name, with).await;
    }
    l.known = known;
    let lease_key = crate::cluster::discover_key(&l.source.name);
    let c = l.cx.cluster.clone();
    let _wanted = c.want_while(&lease_key);
    loop {
        // Only the holder of the discovery lease lists; the other nodes
        // start and stop instance tasks (which wait for their own leases)
        // as the stored list says.
        let busy = match c.begin(&lease_key) {
            crate::cluster::Begin::Held(b) => b,
            crate::cluster::Begin::Lapsing => {
                // Renewal is late: no listing on a lease that may lapse.
                tokio::select! {
                    _ = c.next_change(Duration::from_secs(1)) => {}
                    _ = l.shutdown.cancelled() => break,
                }
                continue;
            }
            crate::cluster::Begin::NotHeld => {
                l.follow().await;
                // Until the lease comes here (at once when it already
                // did meanwhile), or the next look at the stored list.
                tokio::select! {
                    _ = tokio::time::timeout(c.lease, c.until_held(&lease_key)) => {}
                    _ = l.shutdown.cancelled() => break,
                }
                continue;
            }
        };
        l.list().await;
        drop(busy);
        let wait = l.until_next_listing();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = l.shutdown.cancelled() => break,
        }
    }
    // Shutdown: the poll tasks see the same token; wait for them.
    l.running.join_all().await;
}

/// What the steps of one discovering source's loop share.
struct SourceLoop<'a, F> {
    source: Arc<Source>,
    cx: DiscoverEnv<'a>,
    /// Makes an instance's poll task (see [`run_source`]).
    spawn: F,
    shutdown: CancellationToken,
    /// The list as this node last listed or read it.
    known: Discovered,
    /// The poll task of each instance, by name.
    running: Tasks,
    /// The source's secret params, masked in discovery errors.
    secrets: Vec<String>,
}

impl<F, Fut> SourceLoop<'_, F>
where
    F: Fn(Instance, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    /// Starts the poll task of the instance `name` with its params.
    async fn start(&mut self, name: &str, with: &Map<String, Value>) {
        let token = self.shutdown.child_token();
        let task = (self.spawn)(self.source.discovered_instance(name, with), token.clone());
        self.running.start(name, token, task).await;
    }

    /// One listing, by the holder of the discovery lease: applied when it
    /// went through, the list unchanged when it failed; then retention,
    /// and the list saved.
    async fn list(&mut self) {
        let now = Utc::now();
        match discover(&self.source, &self.cx.env, now).await {
            Ok(found) => self.apply_found(found, now).await,
            Err(e) => {
                let msg = mask(&e.to_string(), &self.secrets);
                warn!(source = %self.source.name, "discovery failed, instances unchanged: {msg}");
                let instances = self.known.instances.len();
                self.cx.status.discovery(&self.source.name, |s| {
                    s.instances = instances;
                    s.last_error = Some(msg);
                });
            }
        }
        // Retention runs whatever the listing did: instances gone long
        // enough lose their state even while discovery keeps failing.
        expire_removed(&self.source, self.cx.store, &mut self.known).await;
        let removed = self.known.removed.len();
        self.cx
            .status
            .discovery(&self.source.name, |s| s.removed = removed);
        if let Err(e) = self
            .cx
            .store
            .save_discovered(&self.source.name, &self.known)
            .await
        {
            warn!(source = %self.source.name, error = %format!("{e:#}"), "cannot save the discovered list");
        }
    }

    /// When the next listing is due (the source's `discover_schedule`, else
    /// the connector's `discover.schedule`; ten minutes if neither gives
    /// one), shown in the status; how long until then.
    fn until_next_listing(&self) -> Duration {
        let d = self
            .source
            .connector
            .discover
            .as_ref()
            .expect("discovering source");
        let next = self
            .source
            .discover_schedule
            .as_ref()
            .unwrap_or(&d.schedule)
            .next_after(Utc::now())
            .unwrap_or_else(|| Utc::now() + chrono::Duration::minutes(10));
        self.cx.status.discovery(&self.source.name, |s| {
            s.next_ms = Some(next.timestamp_millis())
        });
        (next - Utc::now()).to_std().unwrap_or(Duration::ZERO)
    }

    /// A node that does not list the source (cluster): starts and stops
    /// instance tasks as the listing node's stored list says.
    async fn follow(&mut self) {
        let source = self.source.clone();
        let stored = match self.cx.store.load_discovered(&source.name).await {
            Ok(d) => d,
            Err(e) => {
                warn!(source = %source.name, error = %format!("{e:#}"), "cannot read the discovered list");
                return;
            }
        };
        let found: Vec<Found> = stored
            .instances
            .iter()
            .map(|(name, with)| Found {
                name: name.clone(),
                with: with.clone(),
            })
            .collect();
        let change = diff(&self.known.instances, &found);
        for name in &change.stop {
            self.running.stop(name);
        }
        for f in &change.start {
            self.start(&f.name, &f.with).await;
        }
        // The counts before the instances' entries go (see `apply_found`).
        self.cx.status.discovery(&source.name, |s| {
            s.instances = stored.instances.len();
            s.removed = stored.removed.len();
        });
        for name in &change.stop {
            self.cx
                .status
                .remove_instance(&format!("{}/{name}", source.name));
        }
        self.known = stored;
    }

    /// A listing went through: instances that left stop (their state kept
    /// for the retention period), new or changed ones start; the list is
    /// saved.
    async fn apply_found(&mut self, found: Vec<Found>, now: DateTime<Utc>) {
        let source = self.source.clone();
        let change = diff(&self.known.instances, &found);
        for name in &change.stop {
            self.running.stop(name);
            self.known.instances.remove(name);
            self.known
                .removed
                .insert(name.clone(), now.timestamp_millis());
            info!(source = %source.name, instance = %name, retention = %humantime::format_duration(source.retention), "instance left the discovered list: stopped, state kept for the retention period");
        }
        for f in &change.start {
            self.known.removed.remove(&f.name);
            self.known.instances.insert(f.name.clone(), f.with.clone());
            self.start(&f.name, &f.with).await;
            info!(source = %source.name, instance = %f.name, "instance discovered");
        }
        // The counts first, then the stopped instances' entries, with no
        // wait between: `/status` never shows an instance gone while the
        // count of removed ones is still the one from before. (It did,
        // for the length of the save below, and a reader waiting for "gone,
        // and none removed" took a departure for the end of a retention.)
        let known = &self.known;
        self.cx.status.discovery(&source.name, |s| {
            s.instances = known.instances.len();
            s.removed = known.removed.len();
            s.last_ok_ms = Some(crate::now_ms());
            s.last_error = None;
        });
        for name in &change.stop {
            self.cx
                .status
                .remove_instance(&format!("{}/{name}", source.name));
        }
        if let Err(e) = self
            .cx
            .store
            .save_discovered(&source.name, &self.known)
            .await
        {
            warn!(source = %source.name, error = %format!("{e:#}"), "cannot save the discovered list");
        }
    }
}

/// Removes the state of instances that left the list longer than the
/// source's retention ago.
async fn expire_removed(source: &Source, store: &Store, known: &mut Discovered) {
    let now = Utc::now();
    let horizon = now.timestamp_millis() - source.retention.as_millis() as i64;
    let expired: Vec<String> = known
        .removed
        .iter()
        .filter(|(_, at)| **at < horizon)
        .map(|(n, _)| n.clone())
        .collect();
    for name in expired {
        let key = format!("{}/{name}", source.name);
        match store.remove_state(&key).await {
            Ok(()) => {
                known.removed.remove(&name);
                info!(instance = %key, "retention passed: instance state removed");
            }
            Err(e) => {
                warn!(instance = %key, error = %format!("{e:#}"), "cannot remove state")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn found(name: &str, acc: &str) -> Found {
        Found {
            name: name.into(),
            with: json!({ "account": acc }).as_object().unwrap().clone(),
        }
    }

    #[test]
    fn diff_starts_new_and_changed_and_stops_gone() {
        let mut running = BTreeMap::new();
        running.insert("a".to_string(), found("a", "1").with);
        running.insert("b".to_string(), found("b", "2").with);
        let d = diff(
            &running,
            &[found("a", "1"), found("b", "9"), found("c", "3")],
        );
        assert_eq!(d.start, [found("b", "9"), found("c", "3")]);
        assert!(d.stop.is_empty());
        let d = diff(&running, &[found("b", "2")]);
        assert!(d.start.is_empty());
        assert_eq!(d.stop, ["a"]);
    }
}
