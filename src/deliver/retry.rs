//! Retry policy and response classification (pure, no I/O).

use std::time::Duration;

/// When to try a failed delivery again, and when to give up.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. After the last one fails the
    /// event goes to the dead-letter tree.
    pub max_attempts: u32,
    /// The delays between attempts.
    pub delays: Delays,
    /// Relative jitter (0.2 = ±20%), so that retries of many events after an
    /// outage do not arrive at the receiver all at once.
    pub jitter: f64,
}

/// The shape of the delays between attempts.
#[derive(Debug, Clone, PartialEq)]
pub enum Delays {
    /// Fixed delays after attempt 1, 2, …; the last one repeats if there
    /// are more attempts than delays.
    Schedule(Vec<Duration>),
    /// `first`, doubling, capped at `max`.
    Exponential { first: Duration, max: Duration },
}

/// Svix's schedule: after the first attempt, 5 s, 5 min, 30 min, 2 h, 5 h,
/// 10 h, 10 h: eight attempts over about 28 hours, so a receiver that is
/// down for a day still gets every event.
pub fn svix_schedule() -> Vec<Duration> {
    [5, 300, 1800, 7200, 18000, 36000, 36000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let schedule = svix_schedule();
        RetryPolicy {
            max_attempts: schedule.len() as u32 + 1,
            delays: Delays::Schedule(schedule),
            jitter: 0.2,
        }
    }
}

/// The longest a receiver's `Retry-After` may delay an event: a receiver
/// cannot park events for a year by answering `Retry-After: 31536000`.
pub const MAX_RECEIVER_RETRY_AFTER: Duration = Duration::from_secs(3600);

impl RetryPolicy {
    /// Delay after failed attempt number `attempt` (1-based), or `None` when
    /// that was the last attempt. `unit` is a random number in `[0, 1)`; it is
    /// a parameter so the function stays pure and testable.
    pub fn delay_after(&self, attempt: u32, unit: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let base = match &self.delays {
            Delays::Schedule(d) => d
                .get(attempt.saturating_sub(1) as usize)
                .or(d.last())
                .copied()
                .unwrap_or(Duration::from_secs(5))
                .as_secs_f64(),
            Delays::Exponential { first, max } => {
                let exp = attempt.saturating_sub(1).min(32);
                (first.as_secs_f64() * 2f64.powi(exp as i32)).min(max.as_secs_f64())
            }
        };
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        Some(Duration::from_secs_f64((base * factor).max(0.0)))
    }

    /// The delay after a failed attempt whose answer said `Retry-After`:
    /// the receiver's wish (clamped to 1 s … [`MAX_RECEIVER_RETRY_AFTER`])
    /// instead of the schedule's, as long as attempts remain.
    pub fn delay_with(
        &self,
        attempt: u32,
        unit: f64,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let scheduled = self.delay_after(attempt, unit)?;
        Some(match retry_after {
            Some(r) => r.clamp(Duration::from_secs(1), MAX_RECEIVER_RETRY_AFTER),
            None => scheduled,
        })
    }
}

/// What a delivery attempt's outcome means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: delivered.
    Delivered,
    /// `410 Gone`: the receiver says this endpoint no longer exists; the
    /// endpoint is disabled (its events stay in the outbox).
    Gone,
    /// Anything else: try again later (or dead-letter after the last
    /// attempt); with the receiver's `Retry-After`, if it sent one.
    Failed {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// Classifies an HTTP answer. Only 2xx is success; a 3xx is a failure too,
/// since redirects are never followed (a webhook must not be re-sent to
/// wherever a `Location` header points). `Retry-After` counts on 429 and 503;
/// in its HTTP-date form it is read against `now`, which is passed in so
/// that classification stays pure (invariant 4) and testable with a date.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    snippet: &str,
    now: std::time::SystemTime,
) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Gone,
        _ => Outcome::Failed {
            reason: if snippet.is_empty() {
                format!("endpoint answered HTTP {status}")
            } else {
                format!("endpoint answered HTTP {status}: {snippet}")
            },
            retry_after: match status {
                429 | 503 => retry_after.and_then(|v| crate::quota::retry_after(v, now)),
                _ => None,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            delays: Delays::Exponential {
                first: Duration::from_secs(1),
                max: Duration::from_secs(5),
            },
            jitter: 0.2,
        }
    }

    #[test]
    fn the_default_is_svix_s_schedule() {
        let p = RetryPolicy::default();
        let mid: Vec<u64> = (1..=8)
            .filter_map(|a| p.delay_after(a, 0.5))
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(mid, [5, 300, 1800, 7200, 18000, 36000, 36000]);
        assert_eq!(p.max_attempts, 8);
        // More attempts than delays: the last delay repeats.
        let long = RetryPolicy {
            max_attempts: 10,
            ..RetryPolicy::default()
        };
        assert_eq!(long.delay_after(9, 0.5), Some(Duration::from_secs(36000)));
    }

    #[test]
    fn a_receiver_s_retry_after_is_honoured_but_clamped() {
        let p = RetryPolicy::default();
        let d = |r| p.delay_with(1, 0.5, r);
        assert_eq!(
            d(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            d(Some(Duration::from_secs(365 * 86400))),
            Some(MAX_RECEIVER_RETRY_AFTER)
        );
        assert_eq!(d(Some(Duration::ZERO)), Some(Duration::from_secs(1)));
        assert_eq!(d(None), Some(Duration::from_secs(5)));
        assert_eq!(
            p.delay_with(8, 0.5, Some(Duration::from_secs(30))),
            None,
            "no attempts left"
        );
    }

    #[test]
    fn doubles_then_caps_then_gives_up() {
        let p = policy();
        let mid = |a| p.delay_after(a, 0.5).map(|d| d.as_secs_f64());
        assert_eq!(mid(1), Some(1.0));
        assert_eq!(mid(2), Some(2.0));
        assert_eq!(mid(3), Some(4.0));
        assert_eq!(mid(4), Some(5.0));
        assert_eq!(mid(5), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy();
        let lo = p.delay_after(2, 0.0).unwrap().as_secs_f64();
        let hi = p.delay_after(2, 0.999_999).unwrap().as_secs_f64();
        assert!((1.6..1.61).contains(&lo), "{lo}");
        assert!((2.39..2.4).contains(&hi), "{hi}");
    }

    fn now() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(784_111_777 - 42)
    }

    #[test]
    fn a_receiver_s_retry_after_date_is_read_in_every_http_date_form() {
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                classify(503, Some(form), "", now()),
                Outcome::Failed {
                    reason: "endpoint answered HTTP 503".into(),
                    retry_after: Some(Duration::from_secs(42))
                },
                "{form}"
            );
        }
    }

    #[test]
    fn only_2xx_is_delivered_410_is_gone_and_retry_after_counts_on_429_503() {
        assert_eq!(classify(200, None, "", now()), Outcome::Delivered);
        assert_eq!(classify(204, None, "", now()), Outcome::Delivered);
        assert_eq!(classify(410, None, "", now()), Outcome::Gone);
        assert!(matches!(
            classify(301, Some("5"), "", now()),
            Outcome::Failed {
                retry_after: None,
                ..
            }
        ));
        assert_eq!(
            classify(429, Some("7"), "busy", now()),
            Outcome::Failed {
                reason: "endpoint answered HTTP 429: busy".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(503, Some("2"), "", now()),
            Outcome::Failed {
                retry_after: Some(_),
                ..
            }
        ));
        assert!(matches!(
            classify(500, Some("2"), "", now()),
            Outcome::Failed {
                retry_after: None,
                ..
            }
        ));
    }
}
