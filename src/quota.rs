//! Politeness: per-host quotas (rate, burst, requests in flight) shared by
//! every source calling the host, and per-instance connector rate limits.
//! Rate limiting is governor's GCRA, which never lets more than `burst`
//! requests through at once and holds the rate over any window.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::raw::Rate;
use crate::config::HostQuota;

/// The gate of one host.
pub struct HostGate {
    limiter: Option<DefaultDirectRateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
}

impl HostGate {
    /// Waits until the host quota lets one more request through. The permit
    /// (if the host caps requests in flight) must be held until the response
    /// body is read.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let permit = match &self.in_flight {
            Some(s) => Some(s.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
        permit
    }
}

/// A rate limiter for `rate`, allowing `burst` at once.
pub fn limiter(rate: Rate, burst: u32) -> DefaultDirectRateLimiter {
    let period = rate.per / rate.count;
    let quota = Quota::with_period(period.max(std::time::Duration::from_nanos(1)))
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("burst >= 1"));
    RateLimiter::direct(quota)
}

/// Gates of every configured host.
#[derive(Default)]
pub struct HostGates {
    gates: BTreeMap<String, Arc<HostGate>>,
}

impl HostGates {
    pub fn new(hosts: &BTreeMap<String, HostQuota>) -> Self {
        let gates = hosts
            .iter()
            .map(|(name, q)| {
                let gate = HostGate {
                    limiter: q.rate.map(|r| limiter(r, q.burst)),
                    in_flight: q
                        .max_in_flight
                        .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
                };
                (name.to_ascii_lowercase(), Arc::new(gate))
            })
            .collect();
        HostGates { gates }
    }

    /// The gate of a URL's host: `host:port` first, then `host`.
    pub fn for_url(&self, url: &reqwest::Url) -> Option<Arc<HostGate>> {
        let host = url.host_str()?.to_ascii_lowercase();
        if let Some(port) = url.port_or_known_default() {
            if let Some(g) = self.gates.get(&format!("{host}:{port}")) {
                return Some(g.clone());
            }
        }
        self.gates.get(&host).cloned()
    }
}
