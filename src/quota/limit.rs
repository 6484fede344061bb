//! A connector's per-instance `rate_limit`.

use std::time::Duration;

use governor::DefaultDirectRateLimiter;

use super::{limiter, Rate};

/// A connector's `rate_limit` for one instance: in memory when requests
/// may come often, in the store when they are few (an interval of
/// [`STORED_INTERVAL`] or more, such as `4/1d`), so that restarts, and the
/// instance moving to another node, cannot spend the window again.
pub enum RateLimit {
    Local(DefaultDirectRateLimiter),
    Stored {
        store: crate::store::Store,
        /// The quota's key in the store (`rate:<instance>`).
        key: String,
        interval_ms: f64,
    },
}

/// A connector rate with at least this long between requests is counted
/// in the store: one durable write per request costs nothing at that
/// pace, and it is what long windows (`4/1d`, `100/1h`) need.
pub const STORED_INTERVAL: Duration = Duration::from_secs(10);

impl RateLimit {
    /// The limit of `rate` for the quota `key` (an instance's key).
    pub fn new(rate: Rate, key: &str, store: &crate::store::Store) -> RateLimit {
        let interval = rate.per / rate.count;
        if interval >= STORED_INTERVAL {
            RateLimit::Stored {
                store: store.clone(),
                key: format!("rate:{key}"),
                interval_ms: interval.as_secs_f64() * 1000.0,
            }
        } else {
            RateLimit::Local(limiter(rate, 1))
        }
    }

    /// Waits for the next request's turn. A stored quota whose next slot
    /// is further than [`WAIT_IN_POLL`] away is not waited for: the poll
    /// is put off until then (`Err(Deferred)`), nothing taken. A quota the
    /// store cannot answer for is an error: the request does not go.
    pub async fn until_ready(&self) -> Result<(), Deferred> {
        match self {
            RateLimit::Local(l) => {
                l.until_ready().await;
                Ok(())
            }
            RateLimit::Stored {
                store,
                key,
                interval_ms,
            } => loop {
                match store.take_quota(key, *interval_ms, 1).await {
                    Ok(None) => return Ok(()),
                    Ok(Some(wait)) if wait <= WAIT_IN_POLL => tokio::time::sleep(wait).await,
                    Ok(Some(wait)) => return Err(Deferred::Until(wait)),
                    Err(e) => return Err(Deferred::Store(e.to_string())),
                }
            },
        }
    }
}

/// The longest a poll waits for its connector's stored quota; a longer
/// wait puts the poll off instead (a shutdown must not wait for it).
pub const WAIT_IN_POLL: Duration = Duration::from_secs(5);

/// Why a stored quota did not let a request go.
#[derive(Debug, Clone, PartialEq)]
pub enum Deferred {
    /// Not before this long.
    Until(Duration),
    /// The store could not say.
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per_ms: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_millis(per_ms),
        }
    }

    fn store() -> (tempfile::TempDir, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn slow_rates_are_counted_in_the_store_and_fast_ones_in_memory() {
        let (_dir, store) = store();
        // 2 per 20 s: one every 10 s, exactly the stored bound.
        match RateLimit::new(rate(2, 20_000), "s/i", &store) {
            RateLimit::Stored {
                key, interval_ms, ..
            } => {
                assert_eq!(key, "rate:s/i");
                assert_eq!(interval_ms, 10_000.0);
            }
            RateLimit::Local(_) => panic!("an interval of 10 s is stored"),
        }
        // Just under it: in memory.
        assert!(matches!(
            RateLimit::new(rate(2, 19_998), "s/i", &store),
            RateLimit::Local(_)
        ));
    }

    /// `until_ready`, which must answer at once: a wait in the poll would
    /// be a test that hangs.
    async fn quick(l: &RateLimit) -> Result<(), Deferred> {
        tokio::time::timeout(Duration::from_secs(3), l.until_ready())
            .await
            .expect("answered without waiting")
    }

    #[tokio::test]
    async fn a_stored_quota_defers_a_poll_whose_slot_is_far() {
        let (_dir, store) = store();
        let limit = RateLimit::new(rate(1, 10_000), "s/i", &store);
        assert_eq!(quick(&limit).await, Ok(()));
        match quick(&limit).await {
            Err(Deferred::Until(w)) => {
                assert!(
                    w > Duration::from_secs(9) && w <= Duration::from_secs(10),
                    "{w:?}"
                );
            }
            other => panic!("the next slot is 10 s away: {other:?}"),
        }
        // Another instance's quota is its own.
        let other = RateLimit::new(rate(1, 10_000), "s/j", &store);
        assert_eq!(quick(&other).await, Ok(()));
    }

    #[tokio::test]
    async fn a_stored_quota_waits_in_the_poll_for_a_near_slot() {
        let (_dir, store) = store();
        // A slot taken 300 ms ahead of the quota's own pace.
        assert_eq!(store.take_quota("rate:s/i", 300.0, 1).await.unwrap(), None);
        let limit = RateLimit::new(rate(1, 10_000), "s/i", &store);
        let started = std::time::Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(5), limit.until_ready())
            .await
            .expect("a near slot is waited for, not for long");
        assert_eq!(got, Ok(()));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "went before the slot: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_local_quota_lets_the_first_request_go_at_once() {
        let (_dir, store) = store();
        let limit = RateLimit::new(rate(1, 1_000), "s/i", &store);
        let got = tokio::time::timeout(Duration::from_secs(3), limit.until_ready()).await;
        assert_eq!(got.expect("no wait for the first"), Ok(()));
    }
}
