//! What a host's answer asks of its clients: `Retry-After` and the
//! `RateLimit-*` headers read into a pause and a spacing. Pure: time comes
//! in as an argument.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::MAX_PAUSE;

/// What a host's answer asks of its clients.
#[derive(Debug, Default, PartialEq)]
pub struct Advice {
    /// Send nothing for this long.
    pub pause: Option<Duration>,
    /// Leave at least this long between requests.
    pub spacing: Option<Duration>,
    /// The answer carried rate-limit headers that allow a normal pace.
    pub clears_spacing: bool,
}

/// Reads `Retry-After` (on `429`/`503`) and the rate-limit headers:
/// `RateLimit-Remaining`/`RateLimit-Reset` (IETF draft, reset in seconds),
/// the combined `RateLimit: …, remaining=N, reset=S` (or `r=`/`t=`) form,
/// and `X-RateLimit-Remaining`/`X-RateLimit-Reset` (GitHub style, reset as
/// an epoch time, or seconds when small). Pure.
pub fn advice(status: u16, headers: &HeaderMap, now: SystemTime) -> Advice {
    let mut out = Advice::default();
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if status == 429 || status == 503 {
        out.pause = get("retry-after").and_then(|v| retry_after(v, now));
    }
    let mut remaining = get("ratelimit-remaining")
        .or(get("x-ratelimit-remaining"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut reset = get("ratelimit-reset")
        .or(get("x-ratelimit-reset"))
        .and_then(|v| reset_delay(v, now));
    if let Some(combined) = get("ratelimit") {
        for part in combined.split([',', ';']) {
            let Some((k, v)) = part.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "remaining" | "r" => remaining = remaining.or(v.parse().ok()),
                "reset" | "t" => reset = reset.or(v.parse().ok().map(Duration::from_secs)),
                _ => {}
            }
        }
    }
    match (remaining, reset) {
        (Some(0), Some(r)) => {
            out.pause = Some(out.pause.map_or(r, |p| p.max(r)));
        }
        (Some(n), Some(r)) => {
            // Spread what is left evenly over the time to the reset; with
            // plenty left this is a negligible gap.
            let gap = r / (n.min(u32::MAX as u64) as u32);
            if gap >= Duration::from_millis(1) {
                out.spacing = Some(gap.min(MAX_PAUSE));
            } else {
                out.clears_spacing = true;
            }
        }
        (Some(_), None) => out.clears_spacing = true,
        _ => {}
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date
/// in the past means "now" (zero).
///
/// The date is read by `httpdate`, which accepts the three forms RFC 9110
/// §5.6.7 obliges a recipient to accept (IMF-fixdate, and the obsolete
/// RFC 850 and asctime forms still sent by old servers); an RFC 2822 parser
/// knows only the first, so a throttled upstream's pause was ignored.
/// Two-digit RFC 850 years are resolved without a clock (70–99 are 19xx),
/// so the function stays pure: `now` is the only time it sees.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_PAUSE.as_secs())));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_PAUSE),
    )
}

/// A reset value: seconds from now, or an epoch time (values past year 2001
/// in seconds are epoch times; GitHub sends those).
fn reset_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let n: u64 = value.trim().parse().ok()?;
    let d = if n > 1_000_000_000 {
        match SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(n)) {
            Some(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
            None => MAX_PAUSE,
        }
    } else {
        Duration::from_secs(n)
    };
    Some(d.min(MAX_PAUSE))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        // Sun, 29 Nov 2026 10:00:00 GMT = 1795946400.
        let now = at(1_795_946_400);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 10:00:30", now),
            None,
            "no zone"
        );
        // Absurd values are capped, never a panic.
        assert_eq!(retry_after("18446744073709551615", now), Some(MAX_PAUSE));
        assert_eq!(reset_delay("18446744073709551615", now), Some(MAX_PAUSE));
    }

    #[test]
    fn retry_after_reads_the_three_http_date_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777; ask 90 s before it.
        let now = at(784_111_777 - 90);
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",  // IMF-fixdate
            "Sunday, 06-Nov-94 08:49:37 GMT", // RFC 850
            "Sun Nov  6 08:49:37 1994",       // asctime
        ] {
            assert_eq!(
                retry_after(form, now),
                Some(Duration::from_secs(90)),
                "{form}"
            );
            assert_eq!(
                retry_after(form, at(784_111_777 + 5)),
                Some(Duration::ZERO),
                "{form}: past means now"
            );
        }
        // A date years ahead is capped like delay-seconds are.
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at(0)),
            Some(MAX_PAUSE)
        );
    }

    #[test]
    fn throttling_answers_pause_and_rate_headers_space() {
        let now = at(1_795_946_400);
        assert_eq!(
            advice(429, &headers(&[("retry-after", "5")]), now).pause,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            advice(
                503,
                &headers(&[("retry-after", "Sun, 29 Nov 2026 10:00:02 GMT")]),
                now
            )
            .pause,
            Some(Duration::from_secs(2))
        );
        // Retry-After on a 200 means nothing.
        assert_eq!(
            advice(200, &headers(&[("retry-after", "5")]), now),
            Advice::default()
        );
        // Nothing left: pause until the reset (seconds, or GitHub's epoch).
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit-remaining", "0"), ("ratelimit-reset", "7")]),
                now
            )
            .pause,
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            advice(
                200,
                &headers(&[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1795946460")
                ]),
                now
            )
            .pause,
            Some(Duration::from_secs(60))
        );
        // 10 left over 20 s: one every 2 s.
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit-remaining", "10"), ("ratelimit-reset", "20")]),
                now
            )
            .spacing,
            Some(Duration::from_secs(2))
        );
        // The combined header.
        assert_eq!(
            advice(
                200,
                &headers(&[("ratelimit", "limit=100, remaining=4, reset=8")]),
                now
            )
            .spacing,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            advice(200, &headers(&[("ratelimit", "\"default\";r=0;t=3")]), now).pause,
            Some(Duration::from_secs(3))
        );
        // Plenty left: no spacing, and an earlier one is cleared.
        let a = advice(
            200,
            &headers(&[("ratelimit-remaining", "100000"), ("ratelimit-reset", "1")]),
            now,
        );
        assert!(a.spacing.is_none() && a.clears_spacing);
    }

    #[test]
    fn the_bounds_of_resets_and_spacings() {
        let now = at(1_795_946_400);
        let h = |pairs: &[(&str, &str)]| advice(200, &headers(pairs), now);
        // 1,000,000,000 is still seconds (capped), one more an epoch time.
        assert_eq!(
            h(&[
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", "1000000000")
            ])
            .pause,
            Some(MAX_PAUSE)
        );
        assert_eq!(
            h(&[
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", "1000000001")
            ])
            .pause,
            Some(Duration::ZERO),
            "an epoch time in the past"
        );
        // A gap of exactly a millisecond is kept.
        assert_eq!(
            h(&[("ratelimit-remaining", "1000"), ("ratelimit-reset", "1")]),
            Advice {
                spacing: Some(Duration::from_millis(1)),
                ..Advice::default()
            }
        );
        // The combined header's reset is not capped: its spacing is.
        assert_eq!(
            h(&[("ratelimit", "remaining=1, reset=100000")]).spacing,
            Some(MAX_PAUSE)
        );
        // The separate headers win over the combined one.
        assert_eq!(
            h(&[
                ("ratelimit-remaining", "10"),
                ("ratelimit-reset", "20"),
                ("ratelimit", "remaining=1, reset=1")
            ])
            .spacing,
            Some(Duration::from_secs(2))
        );
        // What is left without a reset allows a normal pace.
        assert_eq!(
            h(&[("x-ratelimit-remaining", "5")]),
            Advice {
                clears_spacing: true,
                ..Advice::default()
            }
        );
        // A reset alone, or nothing readable, says nothing.
        assert_eq!(h(&[("ratelimit-reset", "5")]), Advice::default());
        assert_eq!(
            h(&[("ratelimit-remaining", "many"), ("ratelimit-reset", "5")]),
            Advice::default()
        );
    }

    #[test]
    fn the_longer_of_retry_after_and_an_exhausted_quota_holds() {
        let now = at(1_795_946_400);
        let pause = |retry: &str| {
            advice(
                429,
                &headers(&[
                    ("retry-after", retry),
                    ("ratelimit-remaining", "0"),
                    ("ratelimit-reset", "7"),
                ]),
                now,
            )
            .pause
        };
        assert_eq!(pause("5"), Some(Duration::from_secs(7)));
        assert_eq!(pause("9"), Some(Duration::from_secs(9)));
    }
}
