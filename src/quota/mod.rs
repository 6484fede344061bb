//! Politeness: per-host quotas (rate, burst, requests in flight) shared by
//! every source calling the host, per-instance connector rate limits, and
//! the host's own throttling signals (`Retry-After`, `RateLimit-*`).
//!
//! Rate limiting is governor's GCRA, which never lets more than `burst`
//! requests through at once and holds the rate over any window. Two things
//! are added around it, each for a reason:
//!
//! - **A FIFO turn per host.** governor's `until_ready` lets waiters race:
//!   whoever wakes first wins, so under scarcity some instances can lose
//!   again and again. Requests instead take a turn in a fair (FIFO) tokio
//!   mutex and pass the limiter one at a time in arrival order; an instance
//!   that was just served queues behind everyone already waiting, which
//!   makes scarcity round-robin and stretches every instance's effective
//!   interval evenly.
//! - **A host pause and a spacing.** A `429`/`503` with `Retry-After`, or
//!   `RateLimit-Remaining: 0`, pauses the host for every connector and
//!   instance until then; `RateLimit-Remaining`/`-Reset` also spread the
//!   remaining requests over the time to the reset, so that pollhook slows
//!   down before the upstream has to refuse anything.
//!
//! The header arithmetic ([`retry_after`], [`advice`]) is pure and tested
//! beside the code; time comes in as arguments.
//!
//! The module is a folder of its concerns:
//!
//! - `gate.rs`: the host gates (`HostGate`, `HostGates`): turn, limiter,
//!   pauses and spacing, and in a cluster the booking of each request;
//! - `advice.rs`: what an answer's headers ask of us (pure);
//! - `limit.rs`: a connector's per-instance `rate_limit` (`RateLimit`);
//! - `report.rs`: what the gates count and tell (`HostStats`, `HostReport`
//!   for `/status`, and `PauseListener`, told of the long pauses).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::schedule::parse_duration;

mod advice;
mod gate;
mod limit;
mod report;

pub use advice::{advice, retry_after, Advice};
pub use gate::{HostGate, HostGates};
pub use limit::{Deferred, RateLimit, STORED_INTERVAL, WAIT_IN_POLL};
pub use report::{HostReport, HostStats, PauseListener};

/// A quota shared by everything calling one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostQuota {
    pub rate: Option<Rate>,
    pub burst: u32,
    pub max_in_flight: Option<u32>,
}

/// A rate such as `60/min`, `10/s`, `5/2s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per `per`.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

/// Why a rate is not one; the message is the config error's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not `N/unit` with a known unit or a duration.
    #[error("expected a rate such as `10/s`, `60/min` or `1000/h`, got `{0}`")]
    Malformed(String),
    /// `0/…`: a rate that lets nothing through.
    #[error("expected a rate such as `10/s`, `60/min` or `1000/h`, got `{0}`: the count must be at least 1")]
    ZeroCount(String),
}

impl Rate {
    /// Parses `N/unit`, where unit is `s`, `min`, `h`, `day` or a duration.
    pub fn parse(text: &str) -> Result<Rate, RateError> {
        let expected = || RateError::Malformed(text.to_string());
        let (n, unit) = text.split_once('/').ok_or_else(expected)?;
        let count: u32 = n.trim().parse().map_err(|_| expected())?;
        if count == 0 {
            return Err(RateError::ZeroCount(text.to_string()));
        }
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            other => parse_duration(other).map_err(|_| expected())?,
        };
        if per.is_zero() {
            return Err(expected());
        }
        Ok(Rate { count, per })
    }
}

/// The longest pause a host's headers can impose; a longer `Retry-After`
/// (or a reset an hour away) is capped here and re-learned on the next answer.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);
/// A rate limiter for `rate`, allowing `burst` at once.
pub fn limiter(rate: Rate, burst: u32) -> DefaultDirectRateLimiter {
    let period = rate.per / rate.count;
    let quota = Quota::with_period(period.max(std::time::Duration::from_nanos(1)))
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("burst >= 1"));
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_counts_over_units_and_durations() {
        let r = |t| Rate::parse(t);
        assert_eq!(r("10/s").unwrap().per, Duration::from_secs(1));
        assert_eq!(r("60 / min").unwrap().count, 60);
        assert_eq!(r("1000/h").unwrap().per, Duration::from_secs(3600));
        assert_eq!(r("4/day").unwrap().per, Duration::from_secs(86400));
        assert_eq!(r("5/2s").unwrap().per, Duration::from_secs(2));
        assert!(r("0/s").unwrap_err().to_string().contains("at least 1"));
        for bad in ["10", "ten/s", "10/fortnight", "10/0s", "-1/s"] {
            assert!(r(bad).is_err(), "{bad}");
        }
    }

    /// How long the limiter of `rate` and `burst` lets requests wait once
    /// its burst is spent, and how many went at once.
    fn burst_then_wait(rate: Rate, burst: u32) -> (u32, Duration) {
        use governor::clock::{Clock, DefaultClock};
        let l = limiter(rate, burst);
        let mut went = 0;
        loop {
            match l.check() {
                Ok(()) => went += 1,
                Err(not_until) => {
                    return (
                        went,
                        not_until.wait_time_from(DefaultClock::default().now()),
                    )
                }
            }
            assert!(went <= 1000, "the limiter never refuses");
        }
    }

    #[test]
    fn a_limiter_lets_the_burst_through_then_keeps_the_rate() {
        let per_s = |count| Rate {
            count,
            per: Duration::from_secs(1),
        };
        // 2/s with a burst of 3: three at once, then one every 500 ms.
        let (went, wait) = burst_then_wait(per_s(2), 3);
        assert_eq!(went, 3);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // A burst of 0 is read as 1.
        let (went, wait) = burst_then_wait(per_s(4), 0);
        assert_eq!(went, 1);
        assert!(
            wait > Duration::from_millis(200) && wait <= Duration::from_millis(250),
            "{wait:?}"
        );
    }
}
