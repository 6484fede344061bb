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
