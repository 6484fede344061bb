//! When an instance polls: `every <duration>` or a cron expression, with
//! optional jitter, a time zone, active windows and a catch-up policy. Pure:
//! nothing here sleeps or reads a clock; callers pass the time in, so the
//! arithmetic (DST changes included) is unit-tested without waiting.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

/// Longest spread of prompt first polls: long enough that thousands of
/// instances starting together do not hit upstreams in the same instant,
/// short enough that a new source establishes its baseline at once.
pub const PROMPT_SPREAD: Duration = Duration::from_secs(5);

/// The most first polls a second that one source's prompt start asks for:
/// a larger source spreads its first polls longer (see [`prompt_spread`]).
pub const FIRST_POLLS_PER_SEC: f64 = 1_000.0;

/// How much more than one interval apart an instance's polls start (see
/// [`Schedule::spaced`]): more than a request's time to leave varies.
pub const SPACING_MARGIN: Duration = Duration::from_millis(5);

/// How long the prompt first polls of a source with `instances` instances
/// are spread over: [`PROMPT_SPREAD`], or long enough to ask for at most
/// [`FIRST_POLLS_PER_SEC`]. 100,000 instances spread over 5 s asked a
/// host for 20,000 requests a second; a host quota of 2,000/s then queued
/// them for 50 s, and the queue took minutes to drain, each instance
/// polled at the quota's pace rather than its schedule meanwhile, every
/// queued poll holding its memory. Pure.
pub fn prompt_spread(instances: usize) -> Duration {
    PROMPT_SPREAD.max(Duration::from_secs_f64(
        instances as f64 / FIRST_POLLS_PER_SEC,
    ))
}

/// A parsed schedule. Built once at config load; the hot path only calls
/// [`Schedule::next_after`] (and [`first_due`] at start).
#[derive(Clone)]
pub struct Schedule {
    /// Interval or cron table.
    pub kind: ScheduleKind,
    /// Upper bound of a random delay added to every run, so that many
    /// instances on the same schedule do not all fire on the same second.
    pub jitter: Duration,
    /// Zone of the cron table's and the windows' wall-clock times (UTC
    /// unless `tz:` says otherwise), so `0 9 * * *` stays 09:00 local
    /// across DST changes.
    pub tz: Tz,
    /// When polls may happen; empty means always. A poll due outside every
    /// window moves to the start of the next one.
    pub windows: Vec<Window>,
    /// What a start does about runs missed while the daemon was stopped.
    pub catch_up: CatchUp,
    /// `every` with `min`/`max`: the interval adapts between them (see
    /// [`adapt`]); `None` for a fixed interval or a cron table.
    pub adaptive: Option<(Duration, Duration)>,
}

/// The two ways of saying "when".
#[derive(Clone)]
pub enum ScheduleKind {
    /// Poll again this long after the previous poll was due.
    Every(Duration),
    /// Poll at the times of a cron table (in [`Schedule::tz`]). Boxed:
    /// `cron::Schedule` is large.
    Cron(Box<cron::Schedule>),
}

/// Runs missed while the daemon was stopped (the persisted next run is in
/// the past at start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CatchUp {
    /// One poll promptly at start, however many runs were missed: a poll
    /// sees the upstream's current state, so one is as good as many.
    #[default]
    Once,
    /// No poll off the schedule: wait for the next scheduled time.
    Skip,
}

impl CatchUp {
    /// `once` or `skip`.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        match text.trim() {
            "once" => Ok(CatchUp::Once),
            "skip" => Ok(CatchUp::Skip),
            other => Err(ScheduleError::CatchUp(other.to_string())),
        }
    }
}

/// An IANA time zone name (`Europe/Paris`, `America/New_York`, `UTC`).
pub fn parse_tz(text: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(text.trim()).map_err(|_| ScheduleError::TimeZone(text.to_string()))
}

/// One active window: days of the week and a wall-clock range, such as
/// `Mon-Fri 08:00-18:00`. A range whose end is before its start runs past
/// midnight into the next day (`Fri 22:00-02:00` ends Saturday 02:00).
#[derive(Clone, PartialEq, Eq)]
pub struct Window {
    /// Days the window starts on, Monday first.
    days: [bool; 7],
    /// Start, in minutes after midnight.
    start: u32,
    /// End, in minutes after midnight (1440 for `24:00`); before `start`
    /// when the window wraps past midnight.
    end: u32,
    /// As written, for messages and `Debug`.
    text: String,
}

const WINDOW_SYNTAX: &str = "expected `<days> HH:MM-HH:MM` where days is `Mon`, `Mon-Fri`, `Sat,Sun` or `daily` (e.g. `Mon-Fri 08:00-18:00`, `daily 22:00-02:00`)";

impl Window {
    /// `Mon-Fri 08:00-18:00`, `Sat,Sun 10:00-12:00`, `daily 22:00-02:00`.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let bad = |why: &str| ScheduleError::Window {
            text: text.to_string(),
            why: why.to_string(),
        };
        let mut parts = text.split_whitespace();
        let (Some(days_text), Some(range), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("wrong number of parts"));
        };
        let mut days = [false; 7];
        if days_text.eq_ignore_ascii_case("daily") {
            days = [true; 7];
        } else {
            for item in days_text.split(',') {
                let day = |d: &str| {
                    Weekday::from_str(d)
                        .map(|w| w.num_days_from_monday() as usize)
                        .map_err(|_| bad(&format!("`{d}` is not a day")))
                };
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        // `Fri-Mon` wraps over the weekend.
                        let mut d = a;
                        loop {
                            days[d] = true;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => days[day(item)?] = true,
                }
            }
        }
        let (s, e) = range
            .split_once('-')
            .ok_or_else(|| bad("no `HH:MM-HH:MM` range"))?;
        let time = |t: &str, allow_24: bool| -> Result<u32, ScheduleError> {
            let (h, m) = t
                .split_once(':')
                .ok_or_else(|| bad(&format!("`{t}` is not HH:MM")))?;
            let ok = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
            if !ok(h) || !ok(m) {
                return Err(bad(&format!("`{t}` is not HH:MM")));
            }
            let (h, m): (u32, u32) = (h.parse().unwrap(), m.parse().unwrap());
            if (h < 24 && m < 60) || (allow_24 && h == 24 && m == 0) {
                Ok(h * 60 + m)
            } else {
                Err(bad(&format!("`{t}` is not a time of day")))
            }
        };
        let (start, end) = (time(s, false)?, time(e, true)?);
        if start == end {
            return Err(bad("the range is empty (for all day write `00:00-24:00`)"));
        }
        Ok(Window {
            days,
            start,
            end,
            text: text.trim().to_string(),
        })
    }

    /// The window's wall-clock bounds when it starts on `date`.
    fn bounds(&self, date: NaiveDate) -> (NaiveDateTime, NaiveDateTime) {
        let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
        let minutes = |m: u32| chrono::Duration::minutes(i64::from(m));
        let end = if self.end > self.start {
            self.end
        } else {
            self.end + 24 * 60
        };
        (midnight + minutes(self.start), midnight + minutes(end))
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A wall-clock time in `tz` as an instant. A time in the hour skipped by a
/// DST change maps to the moment the clocks jump (a window starting at 02:30
/// on that day opens at 03:00); one in the repeated hour to its first
/// occurrence.
fn local_to_utc(tz: Tz, mut local: NaiveDateTime) -> DateTime<Utc> {
    // Gaps are whole minutes and at most a few hours long.
    for _ in 0..(4 * 60) {
        if let Some(t) = tz.from_local_datetime(&local).earliest() {
            return t.with_timezone(&Utc);
        }
        local += chrono::Duration::minutes(1);
    }
    Utc.from_utc_datetime(&local)
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ScheduleKind::Every(d) => write!(f, "every {}", humantime::format_duration(*d))?,
            ScheduleKind::Cron(c) => write!(f, "cron {}", c.source())?,
        }
        if self.tz != Tz::UTC {
            write!(f, " ({})", self.tz.name())?;
        }
        if !self.windows.is_empty() {
            write!(f, " active {:?}", self.windows)?;
        }
        if !self.jitter.is_zero() {
            write!(f, " (jitter {})", humantime::format_duration(self.jitter))?;
        }
        if self.catch_up != CatchUp::Once {
            write!(f, " (catch_up {:?})", self.catch_up)?;
        }
        Ok(())
    }
}

impl Schedule {
    fn of(kind: ScheduleKind) -> Self {
        Schedule {
            kind,
            jitter: Duration::ZERO,
            tz: Tz::UTC,
            windows: Vec::new(),
            catch_up: CatchUp::Once,
            adaptive: None,
        }
    }

    /// Makes an `every` schedule adaptive between `min` and `max` (each
    /// defaults to the interval itself).
    pub fn set_adaptive(
        &mut self,
        min: Option<Duration>,
        max: Option<Duration>,
    ) -> Result<(), ScheduleError> {
        let ScheduleKind::Every(every) = self.kind else {
            return Err(ScheduleError::AdaptiveCron);
        };
        let (min, max) = (min.unwrap_or(every), max.unwrap_or(every));
        if min.is_zero() || !(min <= every && every <= max) {
            return Err(ScheduleError::Adaptive { min, every, max });
        }
        self.adaptive = Some((min, max));
        Ok(())
    }

    /// The next regular poll of an `every` schedule after `after`, on this
    /// instance's own slot: the times `phase × interval + k × interval`
    /// counted from the Unix epoch. Instances hash to different phases, so
    /// a thousand instances on `every 1m` spread over the minute instead of
    /// firing together, and keep their spacing across restarts and
    /// stretches of scarcity. Cron tables have no slots of their own: their
    /// next time. Windows apply.
    pub fn next_slot(&self, after: DateTime<Utc>, phase: f64) -> Option<DateTime<Utc>> {
        let ScheduleKind::Every(d) = self.kind else {
            return self.next_after(after);
        };
        let period = d.as_millis().max(1) as i64;
        let offset = (phase.clamp(0.0, 1.0) * period as f64) as i64;
        let t = after.timestamp_millis();
        let k = (t - offset).div_euclid(period) + 1;
        let slot = DateTime::from_timestamp_millis(offset + k * period)?;
        self.in_window(slot)
    }

    /// `every 30s`, `every 5m`, or a cron line of 5 fields (`*/5 * * * *`) or
    /// 6 fields (with seconds first).
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("every ") {
            return Ok(Self::of(ScheduleKind::Every(parse_interval(rest)?)));
        }
        if let Some(rest) = text.strip_prefix("cron ") {
            return Self::cron(rest);
        }
        if text.split_whitespace().count() >= 5 {
            return Self::cron(text);
        }
        Err(ScheduleError::Syntax(text.to_string()))
    }

    /// A cron line of 5 fields (minute first, as crontab) or 6/7 fields
    /// (seconds first, optional year).
    pub fn cron(line: &str) -> Result<Self, ScheduleError> {
        let line = line.trim();
        let fields = line.split_whitespace().count();
        // The `cron` crate wants seconds first; crontab's 5 fields start at
        // minutes, so they get a leading `0` (at second 0 of each minute).
        let full = match fields {
            5 => format!("0 {line}"),
            6 | 7 => line.to_string(),
            fields => {
                return Err(ScheduleError::CronFields {
                    line: line.to_string(),
                    fields,
                })
            }
        };
        let parsed = cron::Schedule::from_str(&full).map_err(|e| ScheduleError::Cron {
            line: line.to_string(),
            reason: e.to_string(),
        })?;
        if parsed.upcoming(Utc).next().is_none() {
            return Err(ScheduleError::NeverFires(line.to_string()));
        }
        Ok(Self::of(ScheduleKind::Cron(Box::new(parsed))))
    }

    /// The next time of the interval or cron table strictly after `after`,
    /// ignoring windows. Cron times are wall-clock times in `tz`: a time
    /// skipped by a DST change does not fire that day, a repeated one fires
    /// at its first occurrence only (the `cron` crate's rules when asked for
    /// the time after an instant).
    fn raw_next(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Every(d) => Some(after + chrono::Duration::from_std(*d).ok()?),
            ScheduleKind::Cron(c) => c
                .after(&after.with_timezone(&self.tz))
                .next()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The next time a poll is due strictly after `after`, before jitter,
    /// moved to the start of the next active window if it falls outside
    /// every window. `None` only for a cron table that has no future time
    /// left.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.in_window(self.raw_next(after)?)
    }

    /// `t` itself when it is inside an active window (or there are none),
    /// else the start of the next window.
    pub fn in_window(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.windows.is_empty() {
            return Some(t);
        }
        let today = t.with_timezone(&self.tz).date_naive();
        let mut next_start: Option<DateTime<Utc>> = None;
        // Yesterday's window may run past midnight into today; every window
        // has a day, so one starts within the next 7 days.
        for offset in -1..=7 {
            let Some(date) = today.checked_add_signed(chrono::Duration::days(offset)) else {
                continue;
            };
            let day = date.weekday().num_days_from_monday() as usize;
            for w in self.windows.iter().filter(|w| w.days[day]) {
                let (s, e) = w.bounds(date);
                let (s, e) = (local_to_utc(self.tz, s), local_to_utc(self.tz, e));
                if s <= t && t < e {
                    return Some(t);
                }
                if s > t && next_start.is_none_or(|n| s < n) {
                    next_start = Some(s);
                }
            }
        }
        next_start
    }

    /// `due` plus `fraction` (0..1) of the jitter, unless that would leave
    /// the active window `due` is in: no poll happens outside windows.
    pub fn jittered(&self, due: DateTime<Utc>, fraction: f64) -> DateTime<Utc> {
        if self.jitter.is_zero() {
            return due;
        }
        let t = due
            + chrono::Duration::from_std(self.jitter.mul_f64(fraction.clamp(0.0, 1.0)))
                .unwrap_or_default();
        if self.in_window(t) == Some(t) {
            t
        } else {
            due
        }
    }

    /// `due`, or one `interval` and [`SPACING_MARGIN`] after the last poll
    /// started when that is later (moved into an active window like any
    /// due time): an instance on `every 1s` is never asked twice within a
    /// second.
    ///
    /// Why it is needed: slots are fixed ([`Schedule::next_slot`]), but a
    /// poll starts a little after its slot, by however late the runtime's
    /// timer (1 ms ticks) and the worker woke. When one poll was 0.8 ms
    /// late and the next 0.1 ms, the two were 999.3 ms apart: the idle
    /// bench saw 52 requests in one second from 50 instances on `every 1s`,
    /// and an API that counts one request a second per key would refuse
    /// the second. The price is a drift of that lateness (under a
    /// millisecond a poll) behind the slot, which no instance notices:
    /// slots only spread instances apart, and hashed phases drifting alike
    /// stay spread. `interval` is zero for a cron table (its times are the
    /// table's, not intervals).
    ///
    /// The margin: polls one interval apart at their start still reached
    /// the upstream 999 ms apart, as the time from a poll's start to its
    /// request leaving varies by a millisecond or so (a pooled connection
    /// or a new one, a busy worker); the idle bench's busiest second still
    /// held 52. A few milliseconds more per poll cost 0.5% of the polls of
    /// an `every 1s` instance, and nothing that anyone counts at longer
    /// intervals.
    pub fn spaced(
        &self,
        due: DateTime<Utc>,
        last_start: Option<DateTime<Utc>>,
        interval: Duration,
    ) -> DateTime<Utc> {
        let Some(start) = last_start else {
            return due;
        };
        if interval.is_zero() {
            return due;
        }
        let earliest =
            start + chrono::Duration::from_std(interval + SPACING_MARGIN).unwrap_or_default();
        if due >= earliest {
            return due;
        }
        self.in_window(earliest).unwrap_or(earliest)
    }

    /// Whether a restart needs the stored next run time. A short `every`
    /// (at most [`PROMPT_SPREAD`]) starts at the instance's next slot
    /// whatever was stored (see [`first_due`]), so writing the time at
    /// every poll would be a store write per poll for nothing: 50 writes a
    /// second for the bank example's 50 balances every second.
    pub fn keeps_next_run(&self) -> bool {
        !matches!(self.kind, ScheduleKind::Every(d) if d <= PROMPT_SPREAD)
    }

    /// The nominal period, for status and for spreading first polls: the
    /// interval itself, or the gap between the next two cron times.
    pub fn period(&self, now: DateTime<Utc>) -> Duration {
        match &self.kind {
            ScheduleKind::Every(d) => *d,
            ScheduleKind::Cron(_) => match self.raw_next(now) {
                Some(a) => match self.raw_next(a) {
                    Some(b) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
                    None => Duration::from_secs(60),
                },
                None => Duration::from_secs(60),
            },
        }
    }
}

/// When an instance first polls after the daemon starts. `persisted` is the
/// next run stored by the previous process (if any), `spread_fraction` a
/// stable per-instance number in 0..1 that spreads instances apart.
///
/// - Persisted and still ahead: wait for it, so a quick restart does not
///   poll early. It is capped at the current schedule's next time (plus
///   jitter), so a shortened schedule takes effect at once.
/// - Persisted and past (runs were missed while stopped): `once` polls
///   promptly (spread over at most [`PROMPT_SPREAD`], so thousands of
///   instances do not burst), a single poll for all missed runs; `skip`
///   waits for the next scheduled time.
/// - Never run (new instance, or state from before `next_run_ms` existed):
///   `once` polls promptly too, because a newly added source is expected to
///   take its baseline at once, not up to a period later; `skip` never polls
///   off the schedule: the next cron time, or for `every` a point spread
///   over the first period (an interval has no phase of its own).
///
/// Every result honours the active windows. `None` only when a cron table
/// has no future time left.
pub fn first_due(
    persisted: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    schedule: &Schedule,
    spread_fraction: f64,
) -> Option<DateTime<Utc>> {
    first_due_within(persisted, now, schedule, spread_fraction, PROMPT_SPREAD)
}

/// [`first_due`], with prompt polls spread over `prompt` (see
/// [`prompt_spread`]) rather than [`PROMPT_SPREAD`]: an `every` no longer
/// than `prompt` starts at the instance's own slot.
pub fn first_due_within(
    persisted: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    schedule: &Schedule,
    spread_fraction: f64,
    prompt: Duration,
) -> Option<DateTime<Utc>> {
    let fraction = spread_fraction.clamp(0.0, 1.0);
    let spread_over =
        |d: Duration| now + chrono::Duration::from_std(d.mul_f64(fraction)).unwrap_or_default();
    // A short `every` polls first at the instance's own slot (see
    // [`Schedule::next_slot`]), which comes within one period: the prompt
    // poll and every later one then keep the same spacing. Spreading from
    // `now` instead put first polls at other phases than the later ones,
    // and 50 instances on `every 1s` made 84 requests in the first second.
    let slot = match schedule.kind {
        ScheduleKind::Every(d) if d <= prompt => schedule.next_slot(now, fraction),
        _ => None,
    };
    match (persisted, schedule.catch_up) {
        (Some(p), _) if p > now => {
            let cap = schedule
                .next_after(now)
                .map(|n| n + chrono::Duration::from_std(schedule.jitter).unwrap_or_default());
            let p = match cap {
                Some(c) if c < p => c,
                _ => p,
            };
            schedule.in_window(p)
        }
        (_, CatchUp::Once) if slot.is_some() => slot,
        (_, CatchUp::Once) => schedule.in_window(spread_over(schedule.period(now).min(prompt))),
        (Some(_), CatchUp::Skip) => schedule.next_after(now),
        (None, CatchUp::Skip) => match schedule.kind {
            ScheduleKind::Every(_) if slot.is_some() => slot,
            ScheduleKind::Every(d) => schedule.in_window(spread_over(d)),
            ScheduleKind::Cron(_) => schedule.next_after(now),
        },
    }
}

/// The next interval of an adaptive schedule: back to `min` right after a
/// change (changes come in bursts), otherwise half as fast again, up to
/// `max`, so the quota is spent where changes are. Pure.
pub fn adapt(current: Duration, changed: bool, min: Duration, max: Duration) -> Duration {
    if changed {
        min
    } else {
        current.mul_f64(1.5).clamp(min, max)
    }
}

/// How long a failing instance waits before its next attempt: 1 s after
/// the first failure, doubling, capped at `max`, ±20% by `jitter` (a
/// random number in 0..1). The instance polls at the later of this and its
/// schedule, so backing off never makes it poll more often. Pure.
pub fn error_backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << (failures - 1).min(20))
        .min(max);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// Parses a positive interval (`30s`, `5m`, `1h`, `250ms`).
fn parse_interval(text: &str) -> Result<Duration, ScheduleError> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(ScheduleError::ZeroInterval);
    }
    Ok(d)
}

/// Parses a duration such as `30s`, `5m`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    humantime::parse_duration(text.trim()).map_err(|source| ScheduleError::Duration {
        text: text.to_string(),
        source,
    })
}

/// Why a schedule, a duration or a part of a schedule was refused; each
/// message says what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("expected a duration such as `500ms`, `30s`, `5m` or `1h`, got `{text}` ({source})")]
    Duration {
        text: String,
        source: humantime::DurationError,
    },
    #[error("an interval must be longer than zero")]
    ZeroInterval,
    #[error("expected `once` or `skip`, got `{0}`")]
    CatchUp(String),
    #[error("unknown time zone `{0}`; expected an IANA name such as `Europe/Paris`, `America/New_York` or `UTC`")]
    TimeZone(String),
    #[error("invalid active window `{text}`: {why}; {WINDOW_SYNTAX}")]
    Window { text: String, why: String },
    #[error("`min` and `max` (an adaptive interval) go with `every`, not `cron`")]
    AdaptiveCron,
    #[error(
        "an adaptive interval needs 0 < min <= every <= max, got min {}, every {}, max {}",
        humantime::format_duration(*.min),
        humantime::format_duration(*.every),
        humantime::format_duration(*.max)
    )]
    Adaptive {
        min: Duration,
        every: Duration,
        max: Duration,
    },
    #[error("expected `every <duration>` (e.g. `every 30s`) or a cron line (e.g. `*/5 * * * *`), got `{0}`")]
    Syntax(String),
    #[error("expected a cron line of 5 fields (`min hour day month weekday`) or 6 (seconds first), got {fields} fields in `{line}`")]
    CronFields { line: String, fields: usize },
    #[error("invalid cron line `{line}`: {reason}")]
    Cron { line: String, reason: String },
    #[error("cron line `{0}` never fires")]
    NeverFires(String),
}

/// When an instance whose lease this node just took over from a silent
/// node (dead, stopped, cut off), silent for at least `gone_for`, is due
/// first. A run that came due while the lease was lapsing was not missed
/// by a stopped daemon (what `catch_up` is about, see [`first_due`]) but
/// only put off by the takeover: it is due now, at once rather than
/// spread over the next seconds or skipped, so the takeover costs the
/// instance no more than the lease's lapse. A run came due when the
/// stored next run is past or, for a short `every` that stores none (see
/// [`Schedule::keeps_next_run`]), when the holder has been gone for a
/// whole period (its last poll was before it fell silent). A run still
/// ahead, or an instance never run, is due as [`first_due`] says (no
/// earlier poll than its holder would have made). Honours the active
/// windows; `None` only when a cron table has no future time left.
pub fn first_due_taken_over(
    persisted: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    schedule: &Schedule,
    spread_fraction: f64,
    gone_for: Duration,
) -> Option<DateTime<Utc>> {
    let came_due = if schedule.keeps_next_run() {
        persisted.is_some_and(|p| p <= now)
    } else {
        schedule.period(now) <= gone_for
    };
    if came_due {
        schedule.in_window(now)
    } else {
        first_due(persisted, now, schedule, spread_fraction)
    }
}

/// When an instance whose lease a live node just gave back (leaving, or
/// shedding leases for this node's share) is due first here. A stored
/// next run that is past came due while the lease moved: it was put off
/// by the move, not missed by a stopped daemon, so it is due at once
/// rather than at the instance's slot (up to an interval later for a
/// large source, see [`prompt_spread`]) or skipped. The node giving the
/// lease back stored its next run just before, so "past" is exact. A
/// short `every` stores no next run (see [`Schedule::keeps_next_run`]):
/// it starts at its slot, within one short period, as after a restart,
/// which keeps its spacing (polling at once and again at the slot
/// would poll twice within a period). Otherwise as [`first_due_within`].
/// Honours the active windows; `None` only when a cron table has no
/// future time left.
pub fn first_due_handed_over(
    persisted: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    schedule: &Schedule,
    spread_fraction: f64,
    prompt: Duration,
) -> Option<DateTime<Utc>> {
    match persisted {
        Some(p) if p <= now && schedule.keeps_next_run() => schedule.in_window(now),
        _ => first_due_within(persisted, now, schedule, spread_fraction, prompt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn slots_spread_instances_over_the_interval_and_keep_their_phase() {
        let s = Schedule::parse("every 1m").unwrap();
        let t = at(10, 0, 10);
        assert_eq!(s.next_slot(t, 0.0), Some(at(10, 1, 0)));
        assert_eq!(s.next_slot(t, 0.5), Some(at(10, 0, 30)));
        assert_eq!(
            s.next_slot(at(10, 0, 30), 0.5),
            Some(at(10, 1, 30)),
            "strictly after"
        );
        // Late (scarcity): the next slot after now, never a burst of missed ones.
        assert_eq!(s.next_slot(at(10, 7, 45), 0.5), Some(at(10, 8, 30)));
        let c = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(c.next_slot(t, 0.7), c.next_after(t), "cron keeps its times");
    }

    #[test]
    fn a_poll_comes_no_sooner_than_one_interval_after_the_last_started() {
        let s = Schedule::parse("every 1s").unwrap();
        let ms = chrono::Duration::milliseconds;
        let second = Duration::from_secs(1);
        let slot = at(10, 0, 1);
        // The last poll started 0.7 ms after its slot: the next slot would
        // come 999.3 ms after it; it waits the full second instead.
        let started = at(10, 0, 0) + chrono::Duration::microseconds(700);
        assert_eq!(
            s.spaced(slot, Some(started), second),
            started + ms(1000) + ms(5)
        );
        // Exactly one interval after is not enough: the margin is added.
        assert_eq!(s.spaced(slot, Some(at(10, 0, 0)), second), slot + ms(5));
        // Exactly the interval and the margin after is due as it is;
        // later stays later.
        assert_eq!(s.spaced(slot, Some(at(10, 0, 0) - ms(5)), second), slot);
        assert_eq!(
            s.spaced(slot + ms(300), Some(started), second),
            slot + ms(300)
        );
        // No poll yet (a start, a lease taken over): the due time stands.
        assert_eq!(s.spaced(slot, None, second), slot);
        // A cron table's times are its own (no interval).
        let c = Schedule::parse("* * * * * *").unwrap();
        assert_eq!(c.spaced(slot, Some(started), Duration::ZERO), slot);
        // Nor does it get the margin.
        assert_eq!(c.spaced(slot, Some(slot - ms(2)), Duration::ZERO), slot);
        // One interval after lands outside the windows: the next window.
        let mut w = Schedule::parse("every 1h").unwrap();
        w.windows = vec![Window::parse("mon-fri 09:00-17:00").unwrap()];
        // 2026-11-23 is a Monday; the last poll started at 16:30.
        assert_eq!(
            w.spaced(
                at(16, 45, 0),
                Some(at(16, 30, 0)),
                Duration::from_secs(3600)
            ),
            Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap()
        );
    }

    #[test]
    fn adaptive_intervals_speed_up_on_change_and_relax_to_max() {
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let mut i = Duration::from_secs(30);
        i = adapt(i, true, min, max);
        assert_eq!(i, min);
        for _ in 0..20 {
            i = adapt(i, false, min, max);
        }
        assert_eq!(i, max);
        let mut s = Schedule::parse("every 30s").unwrap();
        assert!(s.set_adaptive(Some(Duration::from_secs(40)), None).is_err());
        s.set_adaptive(Some(min), Some(max)).unwrap();
        assert_eq!(s.adaptive, Some((min, max)));
        assert!(Schedule::parse("* * * * *")
            .unwrap()
            .set_adaptive(Some(min), None)
            .unwrap_err()
            .to_string()
            .contains("go with `every`"));
    }

    #[test]
    fn failing_instances_back_off_exponentially_with_a_cap() {
        let max = Duration::from_secs(300);
        assert_eq!(error_backoff(0, max, 0.5), Duration::ZERO);
        assert_eq!(error_backoff(1, max, 0.5), Duration::from_secs(1));
        assert_eq!(error_backoff(4, max, 0.5), Duration::from_secs(8));
        assert_eq!(error_backoff(30, max, 0.5), max);
        assert_eq!(error_backoff(1, max, 0.0), Duration::from_millis(800));
        assert_eq!(error_backoff(1, max, 1.0), Duration::from_millis(1200));
    }

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
        assert!(Schedule::parse("every")
            .unwrap_err()
            .to_string()
            .contains("expected"));
        assert!(Schedule::parse("every 0s")
            .unwrap_err()
            .to_string()
            .contains("longer than zero"));
        assert!(Schedule::parse("every 5 parsecs")
            .unwrap_err()
            .to_string()
            .contains("duration"));
        assert!(Schedule::parse("61 * * * *")
            .unwrap_err()
            .to_string()
            .contains("invalid cron"));
        assert!(Schedule::parse("* * *")
            .unwrap_err()
            .to_string()
            .contains("expected"));
    }
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn with(mut s: Schedule, tz: &str, windows: &[&str]) -> Schedule {
        s.tz = parse_tz(tz).unwrap();
        s.windows = windows.iter().map(|w| Window::parse(w).unwrap()).collect();
        s
    }

    #[test]
    fn tz_cron_keeps_local_time_across_the_spring_dst_change() {
        // Europe/Paris goes from UTC+1 to UTC+2 on 2026-03-29 at 02:00 local.
        let s = with(Schedule::parse("0 9 * * *").unwrap(), "Europe/Paris", &[]);
        assert_eq!(
            s.next_after(utc(2026, 3, 27, 12, 0)),
            Some(utc(2026, 3, 28, 8, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 3, 28, 8, 0)),
            Some(utc(2026, 3, 29, 7, 0))
        );
        // 02:30 does not exist on that day: that run is skipped.
        let s = with(Schedule::parse("30 2 * * *").unwrap(), "Europe/Paris", &[]);
        assert_eq!(
            s.next_after(utc(2026, 3, 28, 1, 30)),
            Some(utc(2026, 3, 30, 0, 30))
        );
    }

    #[test]
    fn tz_cron_keeps_local_time_across_the_autumn_dst_change() {
        // Back from UTC+2 to UTC+1 on 2026-10-25 at 03:00 local.
        let s = with(Schedule::parse("0 9 * * *").unwrap(), "Europe/Paris", &[]);
        assert_eq!(
            s.next_after(utc(2026, 10, 24, 12, 0)),
            Some(utc(2026, 10, 25, 8, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 10, 23, 12, 0)),
            Some(utc(2026, 10, 24, 7, 0))
        );
        // 02:30 happens twice that night; it fires once, at the first.
        let s = with(Schedule::parse("30 2 * * *").unwrap(), "Europe/Paris", &[]);
        let first = s.next_after(utc(2026, 10, 24, 12, 0)).unwrap();
        assert_eq!(first, utc(2026, 10, 25, 0, 30));
        assert_eq!(s.next_after(first), Some(utc(2026, 10, 26, 1, 30)));
        // Without tz, the same line is UTC.
        let s = Schedule::parse("0 9 * * *").unwrap();
        assert_eq!(
            s.next_after(utc(2026, 10, 24, 12, 0)),
            Some(utc(2026, 10, 25, 9, 0))
        );
    }

    #[test]
    fn a_poll_outside_the_windows_moves_to_the_next_window() {
        // 2026-11-27 is a Friday; 18:30 is past the window: Monday 08:00.
        let s = with(
            Schedule::parse("*/15 * * * *").unwrap(),
            "UTC",
            &["Mon-Fri 08:00-18:00"],
        );
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 18, 30)),
            Some(utc(2026, 11, 30, 8, 0))
        );
        // The end is exclusive: 18:00 is already outside.
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 17, 50)),
            Some(utc(2026, 11, 30, 8, 0))
        );
        // Inside, nothing moves.
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 9, 1)),
            Some(utc(2026, 11, 27, 9, 15))
        );
        // A second window on Saturday comes first.
        let s = with(
            Schedule::parse("*/15 * * * *").unwrap(),
            "UTC",
            &["Mon-Fri 08:00-18:00", "Sat 10:00-12:00"],
        );
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 18, 30)),
            Some(utc(2026, 11, 28, 10, 0))
        );
    }

    #[test]
    fn windows_are_wall_clock_times_in_the_zone() {
        // Europe/Paris is UTC+1 in November: 08:00 local is 07:00 UTC.
        let s = with(
            Schedule::parse("every 1h").unwrap(),
            "Europe/Paris",
            &["Mon-Fri 08:00-18:00"],
        );
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 17, 30)),
            Some(utc(2026, 11, 30, 7, 0))
        );
    }

    #[test]
    fn an_overnight_window_runs_past_midnight() {
        let s = with(
            Schedule::parse("every 30m").unwrap(),
            "UTC",
            &["Fri 22:00-02:00"],
        );
        // Saturday 01:00 is still in Friday's window.
        assert_eq!(
            s.next_after(utc(2026, 11, 28, 0, 30)),
            Some(utc(2026, 11, 28, 1, 0))
        );
        // Saturday 02:00 is out: next Friday 22:00.
        assert_eq!(
            s.next_after(utc(2026, 11, 28, 1, 30)),
            Some(utc(2026, 12, 4, 22, 0))
        );
        // Friday afternoon: that evening.
        assert_eq!(
            s.next_after(utc(2026, 11, 27, 12, 0)),
            Some(utc(2026, 11, 27, 22, 0))
        );
    }

    #[test]
    fn every_honours_windows_and_jitter_stays_inside() {
        let mut s = with(
            Schedule::parse("every 20m").unwrap(),
            "UTC",
            &["daily 09:00-10:00"],
        );
        assert_eq!(
            s.next_after(utc(2026, 11, 23, 9, 30)),
            Some(utc(2026, 11, 23, 9, 50))
        );
        assert_eq!(
            s.next_after(utc(2026, 11, 23, 9, 50)),
            Some(utc(2026, 11, 24, 9, 0))
        );
        s.jitter = Duration::from_secs(20 * 60);
        // 09:50 + 15m would be outside: the poll keeps its unjittered time.
        assert_eq!(
            s.jittered(utc(2026, 11, 23, 9, 50), 0.75),
            utc(2026, 11, 23, 9, 50)
        );
        assert_eq!(
            s.jittered(utc(2026, 11, 23, 9, 0), 0.5),
            utc(2026, 11, 23, 9, 10)
        );
    }

    #[test]
    fn window_and_tz_errors_name_the_expected_syntax() {
        for bad in [
            "Mon-Fri",
            "Mon-Fri 8-18",
            "Mon-Fri 08:00",
            "Funday 08:00-18:00",
            "Mon 25:00-26:00",
            "Mon 08:00-08:00",
            "Mon 08:00-18:00 extra",
        ] {
            let e = Window::parse(bad).unwrap_err().to_string();
            assert!(e.contains("HH:MM-HH:MM"), "{bad}: {e}");
            assert!(e.contains(bad), "{bad}: {e}");
        }
        let w = Window::parse("sat,sun 00:00-24:00").unwrap();
        assert!(w.days[5] && w.days[6] && !w.days[0]);
        let w = Window::parse("Fri-Mon 10:00-11:00").unwrap();
        assert_eq!(w.days, [true, false, false, false, true, true, true]);
        assert!(parse_tz("Europe/Pariss")
            .unwrap_err()
            .to_string()
            .contains("IANA name such as `Europe/Paris`"));
        assert_eq!(
            parse_tz("America/New_York").unwrap(),
            chrono_tz::America::New_York
        );
        assert!(CatchUp::parse("always")
            .unwrap_err()
            .to_string()
            .contains("`once` or `skip`"));
    }

    #[test]
    fn first_due_after_missed_runs_with_once_is_one_prompt_poll() {
        let s = Schedule::parse("every 1h").unwrap();
        let now = utc(2026, 11, 23, 12, 0);
        let missed = Some(utc(2026, 11, 23, 9, 0));
        assert_eq!(first_due(missed, now, &s, 0.0), Some(now));
        // Spread over at most 5s, not over the hour.
        assert_eq!(
            first_due(missed, now, &s, 0.5),
            Some(now + chrono::Duration::milliseconds(2500))
        );
        // A short period spreads over itself.
        let s = Schedule::parse("every 2s").unwrap();
        assert_eq!(
            first_due(missed, now, &s, 0.5),
            Some(now + chrono::Duration::seconds(1))
        );
    }

    #[test]
    fn first_due_after_missed_runs_with_skip_waits_for_the_schedule() {
        let mut s = Schedule::parse("0 0 1 1 *").unwrap();
        s.catch_up = CatchUp::Skip;
        let now = utc(2026, 11, 23, 12, 0);
        assert_eq!(
            first_due(Some(utc(2026, 1, 1, 0, 0)), now, &s, 0.3),
            Some(utc(2027, 1, 1, 0, 0))
        );
    }

    #[test]
    fn first_due_in_the_future_is_kept_but_capped_by_the_schedule() {
        let s = Schedule::parse("every 1h").unwrap();
        let now = utc(2026, 11, 23, 12, 0);
        let ahead = utc(2026, 11, 23, 12, 40);
        assert_eq!(first_due(Some(ahead), now, &s, 0.0), Some(ahead));
        // Persisted by a daily schedule, now hourly: the hour wins.
        assert_eq!(
            first_due(Some(utc(2026, 11, 24, 12, 0)), now, &s, 0.0),
            Some(utc(2026, 11, 23, 13, 0))
        );
    }

    #[test]
    fn first_due_of_a_new_instance() {
        let now = utc(2026, 11, 23, 12, 0);
        let s = Schedule::parse("every 1h").unwrap();
        assert_eq!(
            first_due(None, now, &s, 0.2),
            Some(now + chrono::Duration::seconds(1))
        );
        let mut s = Schedule::parse("every 1h").unwrap();
        s.catch_up = CatchUp::Skip;
        assert_eq!(
            first_due(None, now, &s, 0.5),
            Some(utc(2026, 11, 23, 12, 30))
        );
        let mut s = Schedule::parse("0 9 * * *").unwrap();
        s.catch_up = CatchUp::Skip;
        assert_eq!(first_due(None, now, &s, 0.5), Some(utc(2026, 11, 24, 9, 0)));
    }

    /// What `keeps_next_run` claims: for short periods, the first due time
    /// is the same with or without a stored one (so it need not be stored);
    /// for longer ones it is not.
    #[test]
    fn short_periods_need_no_stored_next_run() {
        let now = utc(2026, 11, 23, 12, 0) + chrono::Duration::milliseconds(437);
        for text in ["every 1s", "every 5s"] {
            let s = Schedule::parse(text).unwrap();
            assert!(!s.keeps_next_run(), "{text}");
            for stored in [
                now - chrono::Duration::hours(3),
                s.next_slot(now, 0.3).unwrap(),
            ] {
                assert_eq!(
                    first_due(Some(stored), now, &s, 0.3),
                    first_due(None, now, &s, 0.3),
                    "{text}, stored {stored}"
                );
            }
        }
        for text in ["every 6s", "every 1h", "*/5 * * * *"] {
            let s = Schedule::parse(text).unwrap();
            assert!(s.keeps_next_run(), "{text}");
        }
        let s = Schedule::parse("every 1h").unwrap();
        let ahead = now + chrono::Duration::minutes(40);
        assert_ne!(
            first_due(Some(ahead), now, &s, 0.3),
            first_due(None, now, &s, 0.3)
        );
    }

    /// 50 instances on `every 1s`, started at an instant off the second:
    /// each first poll is on the instance's slot, one period before its
    /// second, so no 1-second window holds more than N/T + 1 polls.
    #[test]
    fn first_polls_of_short_periods_keep_each_instance_on_its_slot() {
        let s = Schedule::parse("every 1s").unwrap();
        let now = utc(2026, 11, 23, 12, 0) + chrono::Duration::milliseconds(437);
        let mut polls = Vec::new();
        for i in 0..50 {
            let phase = i as f64 / 50.0 + 0.003;
            let first = first_due(None, now, &s, phase).unwrap();
            assert_eq!(Some(first), s.next_slot(now, phase), "instance {i}");
            let mut t = first;
            for _ in 0..5 {
                polls.push(t);
                let next = s.next_slot(t, phase).unwrap();
                assert_eq!(next - t, chrono::Duration::seconds(1), "instance {i}");
                t = next;
            }
        }
        for start in 0..5_000 {
            let from = now + chrono::Duration::milliseconds(start);
            let to = from + chrono::Duration::seconds(1);
            let n = polls.iter().filter(|p| **p >= from && **p < to).count();
            assert!(n <= 51, "{n} polls in the second from {from}");
        }
    }

    /// A source too large for a 5 s start spreads its first polls at 1,000
    /// a second at most: 100,000 instances on `every 60s` (100 s at that
    /// pace, longer than the period) each start at their own slot, so no
    /// second of the start asks for more than the schedule's own 1,667
    /// (plus one), and the second poll comes one period after the first.
    /// 2,000 instances spread over 5 s as before; 20,000 over 20 s.
    #[test]
    fn a_large_sources_first_polls_ask_no_more_than_its_schedule() {
        assert_eq!(prompt_spread(50), PROMPT_SPREAD);
        assert_eq!(prompt_spread(5_000), PROMPT_SPREAD);
        assert_eq!(prompt_spread(20_000), Duration::from_secs(20));
        let s = Schedule::parse("every 60s").unwrap();
        let now = utc(2026, 11, 23, 12, 0) + chrono::Duration::milliseconds(437);
        let n = 100_000;
        let mut per_second = std::collections::BTreeMap::<i64, usize>::new();
        for i in 0..n {
            let phase = (i as f64 + 0.5) / n as f64;
            let first = first_due_within(None, now, &s, phase, prompt_spread(n)).unwrap();
            assert!(first > now && first <= now + chrono::Duration::seconds(60));
            assert_eq!(
                s.next_slot(first, phase).map(|t| t - first),
                Some(chrono::Duration::seconds(60)),
                "instance {i}"
            );
            *per_second.entry((first - now).num_seconds()).or_default() += 1;
        }
        let busiest = per_second.values().max().copied().unwrap_or(0);
        assert!(busiest <= 1_668, "{busiest} first polls in one second");
        // Small: within 5 s, as before; a mid-sized source: within 20 s.
        for (n, within) in [(2_000, 5), (20_000, 20)] {
            let first = first_due_within(None, now, &s, 0.999, prompt_spread(n)).unwrap();
            assert!(
                first <= now + chrono::Duration::seconds(within),
                "{n}: {first}"
            );
            assert!(
                first > now + chrono::Duration::seconds(within - 1),
                "{n}: {first}"
            );
        }
    }

    #[test]
    fn first_due_applies_the_windows() {
        // Friday 2026-11-27 20:00, windows on weekdays from 08:00.
        let now = utc(2026, 11, 27, 20, 0);
        let s = with(
            Schedule::parse("every 1h").unwrap(),
            "UTC",
            &["Mon-Fri 08:00-18:00"],
        );
        let monday = utc(2026, 11, 30, 8, 0);
        assert_eq!(first_due(None, now, &s, 0.9), Some(monday));
        assert_eq!(
            first_due(Some(utc(2026, 11, 27, 17, 0)), now, &s, 0.0),
            Some(monday)
        );
        let mut s = s;
        s.catch_up = CatchUp::Skip;
        assert_eq!(
            first_due(Some(utc(2026, 11, 27, 17, 0)), now, &s, 0.0),
            Some(monday)
        );
    }

    #[test]
    fn first_due_handed_over_is_now_for_a_run_that_came_due_while_the_lease_moved() {
        let now = utc(2026, 12, 6, 10, 0);
        let big = prompt_spread(100_000);
        let s = Schedule::parse("every 1m").unwrap();
        let past = Some(now - chrono::Duration::seconds(3));
        // A cold start waits for the instance's slot (up to a minute here)...
        let cold = first_due_within(past, now, &s, 0.9, big).unwrap();
        assert!(cold > now + chrono::Duration::seconds(30), "{cold}");
        // ...a handed-over instance whose run came due polls at once.
        assert_eq!(first_due_handed_over(past, now, &s, 0.9, big), Some(now));
        assert_eq!(
            first_due_handed_over(Some(now), now, &s, 0.9, big),
            Some(now)
        );
        // Also where a stop would skip the missed run.
        let mut skip = Schedule::parse("every 1m").unwrap();
        skip.catch_up = CatchUp::Skip;
        assert_eq!(first_due_handed_over(past, now, &skip, 0.9, big), Some(now));
        // A run still ahead, or never run: as at a start.
        let ahead = Some(now + chrono::Duration::seconds(20));
        assert_eq!(
            first_due_handed_over(ahead, now, &s, 0.9, big),
            first_due_within(ahead, now, &s, 0.9, big)
        );
        assert_eq!(first_due_handed_over(ahead, now, &s, 0.9, big), ahead);
        assert_eq!(
            first_due_handed_over(None, now, &s, 0.9, big),
            first_due_within(None, now, &s, 0.9, big)
        );
        // A short `every` keeps its slot (no stored run to tell by).
        let short = Schedule::parse("every 2s").unwrap();
        assert!(!short.keeps_next_run());
        assert_eq!(
            first_due_handed_over(past, now, &short, 0.5, big),
            short.next_slot(now, 0.5)
        );
        assert_ne!(short.next_slot(now, 0.5), Some(now));
        // Outside the active window: at its next opening, not now.
        let w = with(
            Schedule::parse("every 1m").unwrap(),
            "UTC",
            &["Mon-Fri 08:00-18:00"],
        );
        let friday_night = utc(2026, 11, 27, 20, 0);
        assert_eq!(
            first_due_handed_over(Some(utc(2026, 11, 27, 19, 59)), friday_night, &w, 0.0, big),
            Some(utc(2026, 11, 30, 8, 0))
        );
    }

    #[test]
    fn first_due_taken_over_is_now_for_a_run_put_off_by_the_takeover() {
        let now = utc(2026, 11, 23, 12, 0);
        let overdue = Some(utc(2026, 11, 23, 11, 59));
        let gone = Duration::from_secs(10);
        // Not spread over the next seconds, nor skipped: due now.
        let s = Schedule::parse("every 1h").unwrap();
        assert_eq!(first_due_taken_over(overdue, now, &s, 0.9, gone), Some(now));
        assert_eq!(
            first_due_taken_over(Some(now), now, &s, 0.9, gone),
            Some(now)
        );
        let mut skip = Schedule::parse("every 10s").unwrap();
        skip.catch_up = CatchUp::Skip;
        assert_eq!(
            first_due_taken_over(overdue, now, &skip, 0.9, gone),
            Some(now)
        );
        // A run still ahead keeps its time; a new instance is due as
        // `first_due` says.
        let ahead = utc(2026, 11, 23, 12, 40);
        assert_eq!(
            first_due_taken_over(Some(ahead), now, &s, 0.0, gone),
            Some(ahead)
        );
        assert_eq!(
            first_due_taken_over(None, now, &s, 0.2, gone),
            first_due(None, now, &s, 0.2)
        );
        assert_eq!(
            first_due_taken_over(None, now, &skip, 0.5, gone),
            first_due(None, now, &skip, 0.5)
        );
        // A short `every` stores no next run: due now once the holder has
        // been gone a whole period, at its slot otherwise.
        let short = Schedule::parse("every 2s").unwrap();
        assert!(!short.keeps_next_run());
        let two = Duration::from_secs(2);
        assert_eq!(first_due_taken_over(None, now, &short, 0.5, two), Some(now));
        assert_eq!(
            first_due_taken_over(overdue, now, &short, 0.5, two),
            Some(now)
        );
        assert_eq!(
            first_due_taken_over(None, now, &short, 0.5, Duration::from_secs(1)),
            first_due(None, now, &short, 0.5)
        );
        // Outside the active windows: at the next window, as any poll.
        let friday_night = utc(2026, 11, 27, 20, 0);
        let w = with(
            Schedule::parse("every 1h").unwrap(),
            "UTC",
            &["Mon-Fri 08:00-18:00"],
        );
        assert_eq!(
            first_due_taken_over(Some(utc(2026, 11, 27, 19, 59)), friday_night, &w, 0.0, gone),
            Some(utc(2026, 11, 30, 8, 0))
        );
    }

    fn pinned_schedule_errors() -> Vec<String> {
        let mut every = Schedule::parse("every 30s").unwrap();
        let mut cron = Schedule::parse("* * * * *").unwrap();
        vec![
            CatchUp::parse("always").unwrap_err().to_string(),
            parse_tz("Europe/Pariss").unwrap_err().to_string(),
            Window::parse("Mon 25:00-26:00").unwrap_err().to_string(),
            Window::parse("Mon-Fri").unwrap_err().to_string(),
            cron.set_adaptive(Some(Duration::from_secs(1)), None)
                .unwrap_err()
                .to_string(),
            every
                .set_adaptive(Some(Duration::from_secs(40)), None)
                .unwrap_err()
                .to_string(),
            Schedule::parse("sometimes").unwrap_err().to_string(),
            Schedule::parse("every 0s").unwrap_err().to_string(),
            Schedule::parse("every 5 parsecs").unwrap_err().to_string(),
            Schedule::parse("cron * *").unwrap_err().to_string(),
            Schedule::parse("61 * * * *").unwrap_err().to_string(),
            Schedule::parse("0 0 0 30 2 * 2020")
                .unwrap_err()
                .to_string(),
            parse_duration("ten").unwrap_err().to_string(),
        ]
    }

    /// The messages as they were when these errors were strings.
    const PINNED_SCHEDULE_ERRORS: &[&str] = &[
        "expected `once` or `skip`, got `always`",
        "unknown time zone `Europe/Pariss`; expected an IANA name such as `Europe/Paris`, `America/New_York` or `UTC`",
        "invalid active window `Mon 25:00-26:00`: `25:00` is not a time of day; expected `<days> HH:MM-HH:MM` where days is `Mon`, `Mon-Fri`, `Sat,Sun` or `daily` (e.g. `Mon-Fri 08:00-18:00`, `daily 22:00-02:00`)",
        "invalid active window `Mon-Fri`: wrong number of parts; expected `<days> HH:MM-HH:MM` where days is `Mon`, `Mon-Fri`, `Sat,Sun` or `daily` (e.g. `Mon-Fri 08:00-18:00`, `daily 22:00-02:00`)",
        "`min` and `max` (an adaptive interval) go with `every`, not `cron`",
        "an adaptive interval needs 0 < min <= every <= max, got min 40s, every 30s, max 30s",
        "expected `every <duration>` (e.g. `every 30s`) or a cron line (e.g. `*/5 * * * *`), got `sometimes`",
        "an interval must be longer than zero",
        "expected a duration such as `500ms`, `30s`, `5m` or `1h`, got `5 parsecs` (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations))",
        "expected a cron line of 5 fields (`min hour day month weekday`) or 6 (seconds first), got 2 fields in `* *`",
        "invalid cron line `61 * * * *`: 0 61 * * * *\n  ^\nMinutes must be less than 59. ('61' specified.)",
        "cron line `0 0 0 30 2 * 2020` never fires",
        "expected a duration such as `500ms`, `30s`, `5m` or `1h`, got `ten` (expected number at 0)",
    ];

    #[test]
    fn typed_errors_read_as_the_former_messages() {
        assert_eq!(pinned_schedule_errors(), PINNED_SCHEDULE_ERRORS);
    }
}
