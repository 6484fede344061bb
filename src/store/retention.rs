//! Store care, written once for every backend on top of the seam: what is
//! forgotten, and when. The daemon runs [`sweep`] at start, after each
//! reload and hourly.

use std::time::Duration;

use super::{Result, Store};

/// What a sweep should keep.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Delivery attempts younger than this are kept (`store.history`).
    pub history: Duration,
    /// Dead letters younger than this are kept (`store.dead_letters`);
    /// `None` keeps them until an operator drops them.
    pub dead_letters: Option<Duration>,
}

/// What a sweep forgot.
#[derive(Debug, Default, PartialEq)]
pub struct Swept {
    pub attempts: usize,
    pub dead_letters: usize,
    /// Instances removed from the configuration longer than their
    /// retention, whose state was deleted.
    pub states: Vec<String>,
}

/// Applies `policy` at `now_ms`. Each part runs even when another fails;
/// the first error is returned after all ran.
pub async fn sweep(store: &Store, policy: Policy, now_ms: i64) -> (Swept, Vec<String>) {
    let mut swept = Swept::default();
    let mut errors = Vec::new();
    match store
        .prune_attempts(now_ms - policy.history.as_millis() as i64)
        .await
    {
        Ok(n) => swept.attempts = n,
        Err(e) => errors.push(format!("cannot prune the delivery history: {e:#}")),
    }
    if let Some(keep) = policy.dead_letters {
        match prune_dead(store, now_ms - keep.as_millis() as i64).await {
            Ok(n) => swept.dead_letters = n,
            Err(e) => errors.push(format!("cannot prune dead letters: {e:#}")),
        }
    }
    match sweep_removed(store, now_ms).await {
        Ok(gone) => swept.states = gone,
        Err(e) => errors.push(format!(
            "cannot delete the state of removed instances: {e:#}"
        )),
    }
    (swept, errors)
}

/// Deletes dead letters that died before `before_ms`. Returns how many.
pub async fn prune_dead(store: &Store, before_ms: i64) -> Result<usize> {
    let old: Vec<_> = store
        .dead_letters(None)
        .await?
        .into_iter()
        .filter(|(_, d)| d.dead_at_ms < before_ms)
        .map(|(k, _)| k)
        .collect();
    if old.is_empty() {
        return Ok(0);
    }
    store.drop_dead(&old).await
}

/// Deletes the state of removed instances whose time has come; returns
/// their keys. Their undelivered events stay in the outbox.
pub async fn sweep_removed(store: &Store, now_ms: i64) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for (key, at) in store.removed().await? {
        if at <= now_ms {
            store.remove_state(&key).await?;
            store.unmark_removed(&key).await?;
            gone.push(key);
        }
    }
    Ok(gone)
}
