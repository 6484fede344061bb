//! Operator verbs: dead letters (list, replay, drop), delivery
//! history, enabling an endpoint, backups and status.
//!
//! Each is a typed request ([`Op`]) with a typed reply. The same request
//! runs in two places: inside the daemon, where the admin server decodes
//! it and calls [`Op::run`] on the live store, and in the CLI, which sends
//! it to the running daemon ([`Target::AdminServer`]) or, when none runs, runs
//! it on the stopped store itself ([`Target::Store`]). Both ends use the
//! same types, so there is no JSON in between but the wire.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{
    AttemptQuery, AttemptRecord, DeadLetter, EntryKey, Location, Store, StoreError,
};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A replay or drop without any criterion.
    #[error(
        "give a criterion (--id, --endpoint, --source, --connector, --type, --since) or --all"
    )]
    NoCriterion,
    #[error("no endpoint named `{0}`")]
    UnknownEndpoint(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The running daemon refused or could not be reached.
    #[error("{0}")]
    AdminServer(String),
    #[error("{0}")]
    NotRunning(String),
}

impl OpError {
    /// The HTTP status the admin server answers with.
    pub fn status(&self) -> u16 {
        match self {
            OpError::NoCriterion => 400,
            OpError::UnknownEndpoint(_) => 404,
            _ => 500,
        }
    }
}

/// What an operation may touch inside the daemon besides the store.
pub trait Workers: Send + Sync {
    /// Endpoints the daemon runs (an enable of another is refused).
    fn has_endpoint(&self, name: &str) -> bool;
    /// `endpoint`'s outbox or dead letters changed outside its worker (a
    /// replay, a drop): its worker counts its backlog and looks again.
    fn changed(&self, endpoint: &str);
    /// `endpoint` was enabled: send again.
    fn enabled(&self, endpoint: &str);
}

/// One operator operation.
pub trait Op: Serialize + DeserializeOwned + Send + Sync {
    type Reply: Serialize + DeserializeOwned + Send;
    /// The admin server's route (`POST`, JSON body).
    const PATH: &'static str;
    /// Runs on a store; `running` is the daemon when it runs there.
    fn run(
        &self,
        store: &Store,
        running: Option<&dyn Workers>,
    ) -> impl std::future::Future<Output = Result<Self::Reply, OpError>> + Send;
}

// --- dead letters --------------------------------------------------------

/// Which dead letters an operation applies to. Fields left out match all.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Filter {
    /// One event (`webhook-id`).
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Sources (the CLI turns `--connector` into the sources using it).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Event type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Dead-lettered at or after this time (ms since the epoch).
    #[serde(default)]
    pub since_ms: Option<i64>,
    /// Dead-lettered before this time.
    #[serde(default)]
    pub until_ms: Option<i64>,
    /// Required for replay/drop without any other criterion, so that an
    /// empty filter never empties the whole dead-letter store by accident.
    #[serde(default)]
    pub all: bool,
}

impl Filter {
    /// True when no criterion is given.
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.endpoint.is_none()
            && self.sources.is_empty()
            && self.kind.is_none()
            && self.since_ms.is_none()
            && self.until_ms.is_none()
    }

    /// Does a dead letter match? Pure.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let source = d.entry.instance.split('/').next().unwrap_or("");
        self.id.as_ref().is_none_or(|i| *i == d.entry.event_id)
            && self.endpoint.as_ref().is_none_or(|e| *e == d.endpoint)
            && (self.sources.is_empty() || self.sources.iter().any(|s| s == source))
            && self.kind.as_ref().is_none_or(|k| *k == d.entry.kind)
            && self.since_ms.is_none_or(|t| d.dead_at_ms >= t)
            && self.until_ms.is_none_or(|t| d.dead_at_ms < t)
    }

    /// Refuses a destructive operation without a criterion.
    fn destructive(&self) -> Result<(), OpError> {
        if self.is_empty() && !self.all {
            Err(OpError::NoCriterion)
        } else {
            Ok(())
        }
    }

    async fn matching(&self, store: &Store) -> Result<Vec<(EntryKey, DeadLetter)>, StoreError> {
        Ok(store
            .dead_letters(self.endpoint.as_deref())
            .await?
            .into_iter()
            .filter(|(_, d)| self.matches(d))
            .collect())
    }
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Listed {
    pub id: String,
    pub endpoint: String,
    pub instance: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub sequence: u64,
    pub attempts: u32,
    pub created_ms: i64,
    pub dead_at_ms: i64,
    pub last_error: Option<String>,
}

/// `pollhook dlq list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqList(pub Filter);

impl Op for DlqList {
    type Reply = Vec<Listed>;
    const PATH: &'static str = "dlq/list";
    async fn run(&self, store: &Store, _: Option<&dyn Workers>) -> Result<Vec<Listed>, OpError> {
        Ok(self
            .0
            .matching(store)
            .await?
            .into_iter()
            .map(|(_, d)| Listed {
                id: d.entry.event_id,
                endpoint: d.endpoint,
                instance: d.entry.instance,
                kind: d.entry.kind,
                sequence: d.entry.sequence,
                attempts: d.entry.attempts,
                created_ms: d.entry.created_ms,
                dead_at_ms: d.dead_at_ms,
                last_error: d.entry.last_error,
            })
            .collect())
    }
}

/// `pollhook dlq replay`: matching dead letters go back to their outboxes
/// with their original ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqReplay(pub Filter);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Replayed {
    pub replayed: usize,
}

impl Op for DlqReplay {
    type Reply = Replayed;
    const PATH: &'static str = "dlq/replay";
    async fn run(&self, store: &Store, running: Option<&dyn Workers>) -> Result<Replayed, OpError> {
        self.0.destructive()?;
        let letters = self.0.matching(store).await?;
        store.replay_dead(&letters).await?;
        tell_changed(running, letters.iter().map(|(k, _)| k.endpoint.as_str()));
        Ok(Replayed {
            replayed: letters.len(),
        })
    }
}

/// Tells the running daemon (if the operation ran there) which endpoints'
/// outboxes or dead letters changed, once each.
fn tell_changed<'a>(running: Option<&dyn Workers>, endpoints: impl Iterator<Item = &'a str>) {
    if let Some(r) = running {
        for ep in endpoints.collect::<std::collections::BTreeSet<_>>() {
            r.changed(ep);
        }
    }
}

/// `pollhook dlq drop`: matching dead letters are deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqDrop(pub Filter);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dropped {
    pub dropped: usize,
}

impl Op for DlqDrop {
    type Reply = Dropped;
    const PATH: &'static str = "dlq/drop";
    async fn run(&self, store: &Store, running: Option<&dyn Workers>) -> Result<Dropped, OpError> {
        self.0.destructive()?;
        let keys: Vec<EntryKey> = self
            .0
            .matching(store)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let dropped = store.drop_dead(&keys).await?;
        tell_changed(running, keys.iter().map(|k| k.endpoint.as_str()));
        Ok(Dropped { dropped })
    }
}

// --- history, endpoints ----------------------------------------------------

/// `pollhook events`: recent delivery attempts, newest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Events(pub AttemptQuery);

impl Op for Events {
    type Reply = Vec<AttemptRecord>;
    const PATH: &'static str = "events";
    async fn run(
        &self,
        store: &Store,
        _: Option<&dyn Workers>,
    ) -> Result<Vec<AttemptRecord>, OpError> {
        Ok(store.attempts(&self.0).await?)
    }
}

/// `pollhook endpoint enable NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enable {
    pub endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Enabled {
    pub enabled: String,
    pub was_disabled: bool,
}

impl Op for Enable {
    type Reply = Enabled;
    const PATH: &'static str = "endpoints/enable";
    async fn run(&self, store: &Store, running: Option<&dyn Workers>) -> Result<Enabled, OpError> {
        if running.is_some_and(|r| !r.has_endpoint(&self.endpoint)) {
            return Err(OpError::UnknownEndpoint(self.endpoint.clone()));
        }
        let was_disabled = store.enable_endpoint(&self.endpoint).await?;
        if let Some(r) = running {
            r.enabled(&self.endpoint);
        }
        Ok(Enabled {
            enabled: self.endpoint.clone(),
            was_disabled,
        })
    }
}

// --- where an operation runs ----------------------------------------------

/// Where the CLI runs an operation.
pub enum Target {
    /// The running daemon's admin server.
    AdminServer { addr: String, token: Option<String> },
    /// The store of a stopped daemon.
    Store(Store),
}

impl Target {
    /// The running daemon when `state_dir/admin.addr` names one that
    /// answers, else the store at `store` (which a running daemon would
    /// hold locked if it is sled: `what` says what needs `admin.listen`).
    pub async fn find(
        state_dir: &Path,
        store: &Location,
        token: Option<String>,
        what: &str,
    ) -> Result<Target, OpError> {
        if let Some(addr) = running_daemon(state_dir, token.as_deref()).await {
            return Ok(Target::AdminServer { addr, token });
        }
        Ok(Target::Store(stopped_store(store, what).await?))
    }

    /// Runs `op` here.
    pub async fn run<O: Op>(&self, op: &O) -> Result<O::Reply, OpError> {
        match self {
            Target::Store(store) => {
                let reply = op.run(store, None).await?;
                store.flush().await?;
                Ok(reply)
            }
            Target::AdminServer { addr, token } => {
                let body = serde_json::to_vec(op).expect("operations serialize");
                let req = request(addr, token.as_deref(), reqwest::Method::POST, O::PATH)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                understood(&answer(req).await?)
            }
        }
    }

    /// `pollhook state export`: the backup's bytes.
    pub async fn export(&self) -> Result<Vec<u8>, OpError> {
        match self {
            Target::Store(store) => {
                let mut out = Vec::new();
                crate::store::backup::export(store, &mut out).await?;
                Ok(out)
            }
            Target::AdminServer { addr, token } => {
                let req = request(addr, token.as_deref(), reqwest::Method::GET, "state/export");
                answer(req).await.map_err(|e| match e {
                    OpError::AdminServer(why) => {
                        OpError::AdminServer(format!("the admin server refused the export: {why}"))
                    }
                    other => other,
                })
            }
        }
    }
}

/// `GET /status` of the running daemon (there is no status of a stopped
/// one: status is what the daemon knows in memory).
pub async fn status(
    state_dir: &Path,
    token: Option<&str>,
) -> Result<crate::status::StatusReport, OpError> {
    let Some(addr) = running_daemon(state_dir, token).await else {
        return Err(OpError::NotRunning(format!(
            "no running daemon found ({} is missing or stale; the daemon writes it when `admin.listen` is set)",
            addr_file(state_dir).display()
        )));
    };
    understood(&answer(request(&addr, token, reqwest::Method::GET, "status")).await?)
}

/// Sends a request to the admin server: the body of a success, else the
/// server's refusal.
async fn answer(req: reqwest::RequestBuilder) -> Result<Vec<u8>, OpError> {
    let resp = req.send().await.map_err(unreachable_daemon)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(unreachable_daemon)?;
    if !status.is_success() {
        return Err(OpError::AdminServer(refusal(status, &bytes)));
    }
    Ok(bytes.to_vec())
}

/// A JSON reply of the admin server as its type.
fn understood<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, OpError> {
    serde_json::from_slice(bytes).map_err(|e| {
        OpError::AdminServer(format!("the admin server's answer is not understood: {e}"))
    })
}

/// Where the daemon writes its admin address once it is ready.
pub fn addr_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.addr")
}

/// The address of a daemon that answers, if `admin.addr` names one. A
/// stale file (a killed daemon) refuses the connection: no daemon.
async fn running_daemon(state_dir: &Path, token: Option<&str>) -> Option<String> {
    let addr = std::fs::read_to_string(addr_file(state_dir)).ok()?;
    let addr = addr.trim().to_string();
    match request(&addr, token, reqwest::Method::GET, "healthz")
        .send()
        .await
    {
        Err(e) if e.is_connect() => None,
        _ => Some(addr),
    }
}

fn request(
    addr: &str,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    let mut req = reqwest::Client::new().request(method, format!("http://{addr}/{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req
}

fn unreachable_daemon(e: reqwest::Error) -> OpError {
    OpError::AdminServer(format!(
        "cannot reach the daemon's admin server: {}",
        crate::transport_detail(&e)
    ))
}

/// The daemon's refusal: its `{"error": …}` body, else the status.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(r) => r.error,
        Err(_) => format!(
            "the admin server answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        ),
    }
}

/// The store of a stopped daemon (a running one holds sled's lock). Only
/// that lock is blamed on a running daemon; any other failure (a record
/// that cannot be read, permissions) is said as it is.
pub async fn stopped_store(store: &Location, what: &str) -> Result<Store, OpError> {
    store.open().await.map_err(|e| match e {
        StoreError::Locked { .. } => OpError::NotRunning(format!(
            "{e} (give the daemon `admin.listen` to {what} while it runs)"
        )),
        e @ StoreError::Open { .. } => OpError::NotRunning(format!("{e:#}")),
        e => OpError::NotRunning(match store {
            Location::Sled(dir) => format!("cannot open the store at {}: {e:#}", dir.display()),
            Location::Postgres { .. } => format!("{e:#}"),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxEntry;

    fn letter(endpoint: &str, instance: &str, kind: &str, at: i64) -> DeadLetter {
        DeadLetter {
            endpoint: endpoint.into(),
            entry: OutboxEntry {
                event_id: format!("msg_{at}"),
                instance: instance.into(),
                kind: kind.into(),
                sequence: 1,
                body: "{}".into(),
                attempts: 3,
                next_attempt_ms: 0,
                created_ms: 0,
                last_error: None,
            },
            dead_at_ms: at,
        }
    }

    #[test]
    fn filters_match_each_criterion() {
        let d = letter("ep", "src/acc", "t.x", 100);
        assert!(Filter::default().matches(&d));
        let f = |g: fn(&mut Filter)| {
            let mut f = Filter::default();
            g(&mut f);
            f
        };
        assert!(f(|f| f.id = Some("msg_100".into())).matches(&d));
        assert!(!f(|f| f.id = Some("msg_1".into())).matches(&d));
        assert!(!f(|f| f.endpoint = Some("other".into())).matches(&d));
        assert!(f(|f| f.sources = vec!["src".into()]).matches(&d));
        assert!(!f(|f| f.sources = vec!["sr".into()]).matches(&d));
        assert!(!f(|f| f.kind = Some("t.y".into())).matches(&d));
        assert!(f(|f| f.since_ms = Some(100)).matches(&d));
        assert!(!f(|f| f.since_ms = Some(101)).matches(&d));
        assert!(f(|f| f.until_ms = Some(101)).matches(&d));
        assert!(!f(|f| f.until_ms = Some(100)).matches(&d));
        assert!(Filter::default().is_empty());
        assert!(!f(|f| f.until_ms = Some(1)).is_empty());
        assert!(matches!(
            Filter::default().destructive(),
            Err(OpError::NoCriterion)
        ));
        assert!(f(|f| f.all = true).destructive().is_ok());
    }
}
