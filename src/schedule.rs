//! When an instance polls: `every <duration>` or a cron expression, with
//! optional jitter. Pure: nothing here sleeps or reads a clock; callers pass
//! the time in, so the arithmetic is unit-tested without waiting.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A parsed schedule. Built once at config load; the hot path only calls
/// [`Schedule::next_after`].
#[derive(Clone)]
pub struct Schedule {
    /// Interval or cron table.
    pub kind: ScheduleKind,
    /// Upper bound of a random delay added to every run, so that many
    /// instances on the same schedule do not all fire on the same second.
    pub jitter: Duration,
}

/// The two ways of saying "when".
#[derive(Clone)]
pub enum ScheduleKind {
    /// Poll again this long after the previous poll was due.
    Every(Duration),
    /// Poll at the times of a cron table (UTC). Boxed: `cron::Schedule` is large.
    Cron(Box<cron::Schedule>),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ScheduleKind::Every(d) => write!(f, "every {}", humantime::format_duration(*d))?,
            ScheduleKind::Cron(c) => write!(f, "cron {}", c.source())?,
        }
        if !self.jitter.is_zero() {
            write!(f, " (jitter {})", humantime::format_duration(self.jitter))?;
        }
        Ok(())
    }
}

impl Schedule {
    /// `every 30s`, `every 5m`, or a cron line of 5 fields (`*/5 * * * *`) or
    /// 6 fields (with seconds first).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("every ") {
            return Ok(Schedule {
                kind: ScheduleKind::Every(parse_interval(rest)?),
                jitter: Duration::ZERO,
            });
        }
        if let Some(rest) = text.strip_prefix("cron ") {
            return Self::cron(rest);
        }
        if text.split_whitespace().count() >= 5 {
            return Self::cron(text);
        }
        Err(format!(
            "expected `every <duration>` (e.g. `every 30s`) or a cron line (e.g. `*/5 * * * *`), got `{text}`"
        ))
    }

    /// A cron line of 5 fields (minute first, as crontab) or 6/7 fields
    /// (seconds first, optional year).
    pub fn cron(line: &str) -> Result<Self, String> {
        let line = line.trim();
        let fields = line.split_whitespace().count();
        // The `cron` crate wants seconds first; crontab's 5 fields start at
        // minutes, so they get a leading `0` (at second 0 of each minute).
        let full = match fields {
            5 => format!("0 {line}"),
            6 | 7 => line.to_string(),
            n => {
                return Err(format!(
                    "expected a cron line of 5 fields (`min hour day month weekday`) or 6 (seconds first), got {n} fields in `{line}`"
                ))
            }
        };
        let parsed = cron::Schedule::from_str(&full)
            .map_err(|e| format!("invalid cron line `{line}`: {e}"))?;
        if parsed.upcoming(Utc).next().is_none() {
            return Err(format!("cron line `{line}` never fires"));
        }
        Ok(Schedule {
            kind: ScheduleKind::Cron(Box::new(parsed)),
            jitter: Duration::ZERO,
        })
    }

    /// The next time a poll is due strictly after `after`, before jitter.
    /// `None` only for a cron table that has no future time left.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Every(d) => Some(after + chrono::Duration::from_std(*d).ok()?),
            ScheduleKind::Cron(c) => c.after(&after).next(),
        }
    }

    /// The nominal period, for status and for spreading first polls: the
    /// interval itself, or the gap between the next two cron times.
    pub fn period(&self, now: DateTime<Utc>) -> Duration {
        match &self.kind {
            ScheduleKind::Every(d) => *d,
            ScheduleKind::Cron(c) => {
                let mut it = c.after(&now);
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
                    _ => Duration::from_secs(60),
                }
            }
        }
    }
}

/// Parses a positive interval (`30s`, `5m`, `1h`, `250ms`).
fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("an interval must be longer than zero".into());
    }
    Ok(d)
}

/// Parses a duration such as `30s`, `5m`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("expected a duration such as `500ms`, `30s`, `5m` or `1h`, got `{text}` ({e})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, h, m, s).unwrap()
    }

    #[test]
    fn every_adds_the_interval() {
        let s = Schedule::parse("every 30s").unwrap();
        assert_eq!(s.next_after(at(10, 0, 0)), Some(at(10, 0, 30)));
        assert_eq!(s.period(at(0, 0, 0)), Duration::from_secs(30));
    }

    #[test]
    fn five_field_cron_fires_on_the_minute() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(s.next_after(at(10, 3, 17)), Some(at(10, 5, 0)));
        assert_eq!(s.period(at(10, 0, 0)), Duration::from_secs(300));
    }

    #[test]
    fn six_field_cron_has_seconds() {
        let s = Schedule::parse("cron */10 * * * * *").unwrap();
        assert_eq!(s.next_after(at(10, 0, 1)), Some(at(10, 0, 10)));
    }

    #[test]
    fn bad_schedules_say_what_was_expected() {
        assert!(Schedule::parse("every").unwrap_err().contains("expected"));
        assert!(Schedule::parse("every 0s")
            .unwrap_err()
            .contains("longer than zero"));
        assert!(Schedule::parse("every 5 parsecs")
            .unwrap_err()
            .contains("duration"));
        assert!(Schedule::parse("61 * * * *")
            .unwrap_err()
            .contains("invalid cron"));
        assert!(Schedule::parse("* * *").unwrap_err().contains("expected"));
    }
}
