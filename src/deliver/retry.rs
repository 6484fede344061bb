//! Retry policy and response classification (pure, no I/O).

use std::time::Duration;

/// When to try a failed delivery again, and when to give up.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. After the last one fails the
    /// event goes to the dead-letter tree.
    pub max_attempts: u32,
    /// Delay before the second attempt; each later delay doubles.
    pub first: Duration,
    /// Cap on any one delay, so a long outage does not push retries out to
    /// days.
    pub max: Duration,
    /// Relative jitter (0.2 = ±20%), so that retries of many events after an
    /// outage do not arrive at the receiver all at once.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            first: Duration::from_secs(5),
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt number `attempt` (1-based), or `None` when
    /// that was the last attempt. `unit` is a random number in `[0, 1)`; it is
    /// a parameter so the function stays pure and testable.
    pub fn delay_after(&self, attempt: u32, unit: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = attempt.saturating_sub(1).min(32);
        let base = self.first.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = base.min(self.max.as_secs_f64());
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        Some(Duration::from_secs_f64((capped * factor).max(0.0)))
    }
}

/// What a delivery attempt's outcome means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: delivered.
    Delivered,
    /// Anything else: try again later (or dead-letter after the last attempt).
    Failed(String),
}

/// Classifies an HTTP status. Only 2xx is success; a 3xx is a failure too,
/// since redirects are never followed (a webhook must not be re-sent to
/// wherever a `Location` header points).
pub fn classify(status: u16) -> Outcome {
    if (200..300).contains(&status) {
        Outcome::Delivered
    } else {
        Outcome::Failed(format!("endpoint answered HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            first: Duration::from_secs(1),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
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

    #[test]
    fn only_2xx_is_delivered() {
        assert_eq!(classify(200), Outcome::Delivered);
        assert_eq!(classify(204), Outcome::Delivered);
        assert!(matches!(classify(301), Outcome::Failed(_)));
        assert!(matches!(classify(500), Outcome::Failed(_)));
    }
}
