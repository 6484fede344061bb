//! A rate quota as a reservation: the arithmetic of the generic cell rate
//! algorithm (GCRA) on a stored "theoretical arrival time", for quotas that
//! are counted in the store rather than in one process's memory.
//!
//! Two users, one rule:
//! - a host's `rate` shared by every node of a cluster (PostgreSQL): each
//!   request reserves its slot in one row, so the nodes together keep the
//!   quota whatever their number;
//! - a connector's long-window `rate_limit` (`4/1d`, as open-banking APIs
//!   allow per account): the reservation is durable, so restarting the
//!   daemon cannot spend the day's requests again.
//!
//! governor (the in-memory limiter) refuses a request that does not conform
//! and lets the caller retry; a reservation instead *books* the first slot
//! the quota allows and tells the caller how long to wait for it. One round
//! trip per request, and waiters are served in the order they booked, even
//! across processes.
//!
//! Pure: time comes in as an argument (milliseconds, whatever clock the
//! store uses, the database's own for a cluster so that node clocks never
//! matter).

/// The slot a request gets and the quota's new theoretical arrival time.
///
/// - `now`: the current time;
/// - `tat`: the stored theoretical arrival time (0 when the quota is new);
/// - `paused_until`: no request before this (a host's `Retry-After`);
/// - `interval`: time per request (the window over the count);
/// - `burst`: how many requests may go at once after an idle spell (≥ 1).
///
/// Returns `(start, tat)`: the request goes at `start` (≥ `now`), and the
/// quota's next theoretical arrival time is `tat`. In any window of length
/// `w`, the starts this hands out number at most `burst + w / interval`.
pub fn reserve(now: f64, tat: f64, paused_until: f64, interval: f64, burst: u32) -> (f64, f64) {
    reserve_run(now, tat, paused_until, interval, burst, 1)
}

/// A run of `n` slots booked at once, `interval` apart from `start`: what
/// a node books for the requests queued at a busy host, so that one round
/// trip to the store serves many of them (see `quota::gate`).
///
/// Returns `(start, tat)` as [`reserve`]: slot `i` (from 0) is at
/// `start + i * interval`. The run's slots are never sooner than `n`
/// bookings of one made at `now` would have been (those may use the
/// burst for all of theirs; a run uses it only for its first), so the
/// bound of [`reserve`] holds for runs and single slots mixed. A run of 0
/// is read as 1.
pub fn reserve_run(
    now: f64,
    tat: f64,
    paused_until: f64,
    interval: f64,
    burst: u32,
    n: u32,
) -> (f64, f64) {
    let tolerance = interval * f64::from(burst.max(1) - 1);
    let start = now.max(tat - tolerance).max(paused_until);
    let next = tat.max(start) + interval * f64::from(n.max(1));
    (start, next)
}

/// A request that takes its slot only if the quota allows it now (the
/// check governor makes): `Ok(tat)`, the quota's new theoretical arrival
/// time, or `Err(wait)`, how long until it would, with nothing taken. For
/// a connector's long-window `rate_limit`, where the poll is put off
/// rather than held for hours (and a put-off poll books nothing).
pub fn take(now: f64, tat: f64, interval: f64, burst: u32) -> Result<f64, f64> {
    let tolerance = interval * f64::from(burst.max(1) - 1);
    let allowed_at = tat - tolerance;
    if now >= allowed_at {
        Ok(tat.max(now) + interval)
    } else {
        Err(allowed_at - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_allows_the_burst_then_says_how_long_to_wait() {
        let mut tat = 0.0;
        for _ in 0..2 {
            tat = take(1000.0, tat, 100.0, 2).unwrap();
        }
        assert_eq!(tat, 1200.0);
        assert_eq!(take(1000.0, tat, 100.0, 2), Err(100.0));
        // Nothing was taken: the wait does not grow by asking.
        assert_eq!(take(1050.0, tat, 100.0, 2), Err(50.0));
        assert_eq!(take(1100.0, tat, 100.0, 2), Ok(1300.0));
        // An idle quota: from now.
        assert_eq!(take(5000.0, 1300.0, 100.0, 1), Ok(5100.0));
        // A burst of 3: three at once, the fourth one interval later.
        let mut tat = 0.0;
        for _ in 0..3 {
            tat = take(0.0, tat, 100.0, 3).unwrap();
        }
        assert_eq!(take(0.0, tat, 100.0, 3), Err(100.0));
        assert_eq!(take(99.0, tat, 100.0, 3), Err(1.0));
    }

    /// Books `n` requests all asked for at `now`, returning their starts.
    fn book(n: usize, now: f64, interval: f64, burst: u32) -> Vec<f64> {
        let mut tat = 0.0;
        (0..n)
            .map(|_| {
                let (start, next) = reserve(now, tat, 0.0, interval, burst);
                tat = next;
                start
            })
            .collect()
    }

    #[test]
    fn a_burst_goes_at_once_then_one_per_interval() {
        assert_eq!(
            book(6, 1000.0, 50.0, 3),
            vec![1000.0, 1000.0, 1000.0, 1050.0, 1100.0, 1150.0]
        );
        assert_eq!(book(3, 0.0, 100.0, 1), vec![0.0, 100.0, 200.0]);
        // A burst of 0 is read as 1 (never a negative tolerance).
        assert_eq!(book(2, 0.0, 100.0, 0), vec![0.0, 100.0]);
    }

    #[test]
    fn no_window_holds_more_than_burst_plus_rate() {
        // 20/s with a burst of 5, booked as fast as possible for 3 s.
        let starts = book(80, 0.0, 50.0, 5);
        for (i, s) in starts.iter().enumerate() {
            let within = starts[i..].iter().filter(|t| **t < s + 1000.0).count();
            assert!(within <= 25, "{within} in the second from {s}");
        }
        assert_eq!(starts.iter().filter(|t| **t < 1000.0).count(), 24);
    }

    #[test]
    fn runs_and_single_slots_mixed_keep_the_bound() {
        // 20/s with a burst of 3: runs of 1 to 7 slots and single slots,
        // asked for every 30 ms (faster than the quota) for 4 s.
        let (interval, burst) = (50.0, 3);
        let (mut tat, mut starts) = (0.0, Vec::new());
        for k in 0..134u32 {
            let now = f64::from(k) * 30.0;
            let n = k % 8;
            let (start, next) = reserve_run(now, tat, 0.0, interval, burst, n);
            assert!(start >= now);
            tat = next;
            starts.extend((0..n.max(1)).map(|i| start + f64::from(i) * interval));
        }
        starts.sort_by(f64::total_cmp);
        for (i, s) in starts.iter().enumerate() {
            let within = starts[i..].iter().filter(|t| **t < s + 1000.0).count();
            assert!(within <= 23, "{within} in the second from {s}");
        }
        // The run takes its whole length off the quota.
        assert_eq!(reserve_run(0.0, 0.0, 0.0, 10.0, 1, 5), (0.0, 50.0));
        assert_eq!(reserve_run(20.0, 50.0, 0.0, 10.0, 1, 3), (50.0, 80.0));
        // Its first slot may use the burst, as one booking's would.
        assert_eq!(reserve_run(0.0, 30.0, 0.0, 10.0, 3, 2), (10.0, 50.0));
        // A pause holds it; a run of 0 is one slot.
        assert_eq!(reserve_run(0.0, 0.0, 500.0, 10.0, 1, 0), (500.0, 510.0));
    }

    #[test]
    fn an_idle_quota_refills_only_up_to_its_burst() {
        let (start, tat) = reserve(10_000.0, 500.0, 0.0, 100.0, 2);
        assert_eq!((start, tat), (10_000.0, 10_100.0));
        let (start, tat) = reserve(10_000.0, tat, 0.0, 100.0, 2);
        assert_eq!((start, tat), (10_000.0, 10_200.0));
        let (start, _) = reserve(10_000.0, tat, 0.0, 100.0, 2);
        assert_eq!(start, 10_100.0);
    }

    #[test]
    fn a_pause_holds_the_slot_and_the_rate_resumes_after_it() {
        let (start, tat) = reserve(0.0, 0.0, 5_000.0, 100.0, 3);
        assert_eq!((start, tat), (5_000.0, 5_100.0));
        // The burst that follows is measured from the pause's end.
        let (start, _) = reserve(0.0, tat, 5_000.0, 100.0, 3);
        assert_eq!(start, 5_000.0);
        // A pause in the past changes nothing.
        assert_eq!(reserve(7_000.0, 0.0, 5_000.0, 100.0, 1), (7_000.0, 7_100.0));
    }

    #[test]
    fn four_a_day_means_four_a_day_whatever_the_restarts() {
        let day = 86_400_000.0;
        let interval = day / 4.0;
        let mut tat = 0.0;
        let mut starts = Vec::new();
        // Ten "restarts" an hour apart, each asking once: the stored tat
        // carries over, so the slots stay six hours apart.
        for hour in 0..10 {
            let now = 1e12 + f64::from(hour) * 3_600_000.0;
            let (start, next) = reserve(now, tat, 0.0, interval, 1);
            tat = next;
            starts.push(start);
        }
        assert!(starts.windows(2).all(|w| w[1] - w[0] == interval));
        assert_eq!(starts.iter().filter(|s| **s < 1e12 + day).count(), 4);
    }
}
