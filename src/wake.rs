//! Wake-ups of delivery workers: how pollers, replays, operational events
//! and the cluster's notices tell an endpoint's worker there is work. The
//! bottom of the layers (it imports nothing of the crate), so every stage
//! can wake a worker without knowing the worker.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use tokio::sync::Notify;

/// How pollers (and replays) tell a worker there is work, and where.
#[derive(Default)]
pub struct Wake {
    pub(crate) notify: Notify,
    /// Instances with new entries since the worker last looked.
    instances: parking_lot::Mutex<HashSet<String>>,
    /// Entries appeared that only a scan finds (a dead-letter replay).
    rescan: std::sync::atomic::AtomicBool,
    /// The operator enabled the endpoint again (`pollhook endpoint enable`).
    enable: std::sync::atomic::AtomicBool,
    /// Another node of the cluster disabled or enabled the endpoint: read
    /// which it is now from the store.
    recheck: std::sync::atomic::AtomicBool,
}

impl Wake {
    /// New entries of `instance` were committed.
    pub fn instance(&self, instance: &str) {
        self.instances.lock().insert(instance.to_string());
        self.notify.notify_one();
    }

    /// Entries appeared anywhere (replay): look at the whole queue.
    pub fn rescan(&self) {
        self.rescan.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// The endpoint was enabled again: forget its failures and send.
    pub fn enable(&self) {
        self.enable.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// The endpoint's disabled flag changed in the store (cluster).
    pub fn recheck(&self) {
        self.recheck
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub(crate) fn take_recheck(&self) -> bool {
        self.recheck
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn take_enable(&self) -> bool {
        self.enable.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.instances.lock())
    }

    pub(crate) fn take_rescan(&self) -> bool {
        self.rescan.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// The workers' wake-ups, by endpoint: pollers poke them after a commit,
/// the admin server after a replay. A restarted worker keeps its
/// endpoint's `Wake`.
#[derive(Default)]
pub struct Wakes(RwLock<BTreeMap<String, Arc<Wake>>>);

impl Wakes {
    /// The wake-up of `endpoint`, if it has a worker.
    pub fn wake(&self, endpoint: &str) -> Option<Arc<Wake>> {
        self.0.read().get(endpoint).cloned()
    }

    /// The endpoints that have a worker.
    pub fn endpoints(&self) -> Vec<String> {
        self.0.read().keys().cloned().collect()
    }

    /// The wake-up of `endpoint`, made if it has none yet.
    pub fn get_or_insert(&self, endpoint: &str) -> Arc<Wake> {
        self.0
            .write()
            .entry(endpoint.to_string())
            .or_default()
            .clone()
    }

    /// `endpoint` has no worker any more.
    pub fn remove(&self, endpoint: &str) {
        self.0.write().remove(endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_up_is_kept_per_endpoint_until_removed() {
        let w = Wakes::default();
        assert!(w.wake("a").is_none());
        let a = w.get_or_insert("a");
        assert!(Arc::ptr_eq(&a, &w.get_or_insert("a")));
        assert!(Arc::ptr_eq(&a, &w.wake("a").unwrap()));
        w.get_or_insert("b");
        assert_eq!(w.endpoints(), vec!["a".to_string(), "b".to_string()]);
        w.remove("a");
        assert!(w.wake("a").is_none());
        assert_eq!(w.endpoints(), vec!["b".to_string()]);
    }

    #[test]
    fn a_wake_up_carries_what_happened_once() {
        let w = Wake::default();
        w.instance("x");
        w.instance("y");
        w.rescan();
        w.enable();
        w.recheck();
        assert_eq!(w.take().len(), 2);
        assert!(w.take().is_empty());
        assert!(w.take_rescan() && !w.take_rescan());
        assert!(w.take_enable() && !w.take_enable());
        assert!(w.take_recheck() && !w.take_recheck());
    }
}
