//! Dead letters and delivery history for operators: the same filters and
//! operations serve the admin API (while the daemon runs) and the CLI on a
//! stopped store (`pollhook dlq …`, `pollhook events`).

use serde::{Deserialize, Serialize};

use crate::store::{AttemptRecord, DeadLetter, EntryKey, Store, StoreError};

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

fn matching(store: &Store, f: &Filter) -> Result<Vec<(EntryKey, DeadLetter)>, StoreError> {
    let mut out = Vec::new();
    for item in store.all_dead_letters() {
        let (k, d) = item?;
        if f.matches(&d) {
            out.push((k, d));
        }
    }
    Ok(out)
}

/// Dead letters matching `f`.
pub fn list(store: &Store, f: &Filter) -> Result<Vec<Listed>, StoreError> {
    Ok(matching(store, f)?
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

/// Why a replay or drop was refused.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(
        "give a criterion (--id, --endpoint, --source, --connector, --type, --since) or --all"
    )]
    NoCriterion,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Puts matching dead letters back into their outboxes (original ids).
pub async fn replay(store: &Store, f: &Filter) -> Result<Vec<String>, DlqError> {
    if f.is_empty() && !f.all {
        return Err(DlqError::NoCriterion);
    }
    let letters = matching(store, f)?;
    store.replay_dead(&letters).await?;
    Ok(letters.into_iter().map(|(_, d)| d.endpoint).collect())
}

/// Deletes matching dead letters.
pub async fn drop(store: &Store, f: &Filter) -> Result<usize, DlqError> {
    if f.is_empty() && !f.all {
        return Err(DlqError::NoCriterion);
    }
    let keys: Vec<EntryKey> = matching(store, f)?.into_iter().map(|(k, _)| k).collect();
    Ok(store.drop_dead(&keys).await?)
}

/// Which attempts `pollhook events` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Most records (default 50).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Recent attempts, newest first.
pub fn events(store: &Store, q: &EventsQuery) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut out = Vec::new();
    for r in store.attempts() {
        let r = r?;
        if q.id.as_ref().is_some_and(|i| *i != r.event_id)
            || q.endpoint.as_ref().is_some_and(|e| *e != r.endpoint)
        {
            continue;
        }
        out.push(r);
        if out.len() >= q.limit.unwrap_or(50) {
            break;
        }
    }
    Ok(out)
}
