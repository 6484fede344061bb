//! What an API says about how often it may be polled, read from its
//! answer: `X-Poll-Interval` (GitHub's notifications API: "poll no more
//! often than every N seconds"), `Cache-Control: max-age` and `Expires`
//! (nothing new before then). pollhook takes the longest as a floor under
//! the instance's schedule (a connector can turn this off with
//! `poll_hints: false`), and `/status` shows it as the reason for a
//! longer interval.
//!
//! Pure: the headers and the time come in as arguments.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// The longest floor a header can impose: a day (a misconfigured
/// `max-age=31536000` must not stop polling for a year).
pub const MAX_FLOOR: Duration = Duration::from_secs(86_400);

/// A floor under the schedule, and which header asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    pub at_least: Duration,
    pub reason: String,
}

/// The floor an answer asks for, if any: the longest of `X-Poll-Interval`
/// (seconds), `Cache-Control: max-age` (seconds; not with `no-cache` or
/// `no-store`, which say nothing about polling) and `Expires` (an HTTP
/// date; relative to the answer's `Date` when it has one, else to `now`).
pub fn floor(headers: &HeaderMap, now: SystemTime) -> Option<Floor> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut found: Vec<(Duration, String)> = Vec::new();
    if let Some(v) = text("x-poll-interval") {
        if let Ok(secs) = v.trim().parse::<u64>() {
            found.push((
                Duration::from_secs(secs),
                format!("X-Poll-Interval: {}", v.trim()),
            ));
        }
    }
    let mut cache_says_nothing = false;
    if let Some(cc) = text("cache-control") {
        let directives: Vec<String> = cc
            .split(',')
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        cache_says_nothing = directives
            .iter()
            .any(|d| d == "no-cache" || d == "no-store");
        if !cache_says_nothing {
            if let Some(secs) = directives
                .iter()
                .find_map(|d| d.strip_prefix("max-age="))
                .and_then(|s| s.trim_matches('"').parse::<u64>().ok())
            {
                found.push((
                    Duration::from_secs(secs),
                    format!("Cache-Control: max-age={secs}"),
                ));
            }
        }
    }
    if !cache_says_nothing && !found.iter().any(|(_, r)| r.starts_with("Cache-Control")) {
        if let Some(expires) = text("expires").and_then(|v| httpdate::parse_http_date(v).ok()) {
            let base = text("date")
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .unwrap_or(now);
            if let Ok(d) = expires.duration_since(base) {
                found.push((
                    d,
                    format!("Expires: {}", text("expires").unwrap_or_default()),
                ));
            }
        }
    }
    // The longest wins; on a tie, the first found: `X-Poll-Interval`, the
    // one header that is about polling (GitHub sends `X-Poll-Interval: 60`
    // with `Cache-Control: max-age=60`), so the reason names it.
    let (d, reason) = found.into_iter().filter(|(d, _)| !d.is_zero()).fold(
        None::<(Duration, String)>,
        |best, (d, r)| match best {
            Some((b, _)) if b >= d => best,
            _ => Some((d, r)),
        },
    )?;
    let reason = if d > MAX_FLOOR {
        format!("{reason} (at most a day is honoured)")
    } else {
        reason
    };
    Some(Floor {
        at_least: d.min(MAX_FLOOR),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn x_poll_interval_is_a_floor_in_seconds() {
        let f = floor(&h(&[("X-Poll-Interval", "60")]), at(0)).unwrap();
        assert_eq!(f.at_least, Duration::from_secs(60));
        assert_eq!(f.reason, "X-Poll-Interval: 60");
        assert_eq!(floor(&h(&[("X-Poll-Interval", "soon")]), at(0)), None);
        assert_eq!(floor(&h(&[("X-Poll-Interval", "0")]), at(0)), None);
        assert_eq!(floor(&HeaderMap::new(), at(0)), None);
    }

    #[test]
    fn cache_control_max_age_unless_no_cache() {
        let f = floor(&h(&[("Cache-Control", "public, max-age=30")]), at(0)).unwrap();
        assert_eq!(f.at_least, Duration::from_secs(30));
        assert_eq!(f.reason, "Cache-Control: max-age=30");
        assert_eq!(
            floor(&h(&[("Cache-Control", "no-cache, max-age=30")]), at(0)),
            None
        );
        assert_eq!(floor(&h(&[("Cache-Control", "no-store")]), at(0)), None);
        // The longest of the two wins.
        let f = floor(
            &h(&[("Cache-Control", "max-age=30"), ("X-Poll-Interval", "60")]),
            at(0),
        )
        .unwrap();
        assert_eq!(f.at_least, Duration::from_secs(60));
        assert_eq!(f.reason, "X-Poll-Interval: 60");
        // GitHub's answers: the same 60 s from both; the reason names the
        // header that is about polling, whatever the order.
        for pairs in [
            [
                ("Cache-Control", "private, max-age=60, s-maxage=60"),
                ("X-Poll-Interval", "60"),
            ],
            [
                ("X-Poll-Interval", "60"),
                ("Cache-Control", "private, max-age=60, s-maxage=60"),
            ],
        ] {
            let f = floor(&h(&pairs), at(0)).unwrap();
            assert_eq!(f.reason, "X-Poll-Interval: 60", "{pairs:?}");
        }
    }

    #[test]
    fn expires_counts_from_the_answers_date_and_is_capped() {
        let date = "Tue, 01 Dec 2026 10:00:00 GMT";
        let expires = "Tue, 01 Dec 2026 10:02:00 GMT";
        let f = floor(&h(&[("Date", date), ("Expires", expires)]), at(0)).unwrap();
        assert_eq!(f.at_least, Duration::from_secs(120));
        assert!(f.reason.starts_with("Expires:"), "{f:?}");
        // Without a Date: from now. In the past: nothing.
        let now = httpdate::parse_http_date(date).unwrap();
        assert_eq!(
            floor(&h(&[("Expires", expires)]), now).unwrap().at_least,
            Duration::from_secs(120)
        );
        assert_eq!(
            floor(&h(&[("Expires", date)]), now + Duration::from_secs(5)),
            None
        );
        // max-age takes precedence over Expires (RFC 9111).
        let f = floor(
            &h(&[("Cache-Control", "max-age=5"), ("Expires", expires)]),
            now,
        )
        .unwrap();
        assert_eq!(f.at_least, Duration::from_secs(5));
        // A year is capped at a day.
        let f = floor(&h(&[("Cache-Control", "max-age=31536000")]), now).unwrap();
        assert_eq!(f.at_least, MAX_FLOOR);
        assert_eq!(
            f.reason,
            "Cache-Control: max-age=31536000 (at most a day is honoured)"
        );
    }
}
