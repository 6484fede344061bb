//! Values with a syntax of their own (durations, rates, schedules,
//! JSONPaths, templates), parsed while deserializing so that their errors
//! carry the YAML location, and their JSON Schemas.
//!
//! Most are read from a string (or a number or bool written without quotes:
//! [`StringLike`]) and checked in a `TryFrom` (`#[serde(try_from)]`): the
//! check's message is the error, at the value's location. Their schemas are
//! derived from schemars attributes. `Rate` and `ScheduleSpec` keep
//! hand-written impls (see there).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::quota::Rate;
use crate::schedule::{self, parse_duration, Schedule, ScheduleError};
use crate::template::{self, TemplateError};

/// `store.lease`: a duration from 1s to 10m.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "StringLike")]
pub struct LeaseDur(pub Duration);

impl TryFrom<StringLike> for LeaseDur {
    type Error = ValueError;
    fn try_from(s: StringLike) -> Result<Self, ValueError> {
        let range = "a lease from 1s to 10m, such as `15s`";
        bounded(
            &s.0,
            Duration::from_secs(1),
            Duration::from_secs(600),
            range,
        )
        .map(LeaseDur)
    }
}

/// Longest duration accepted anywhere: longer is a typo, and adding it to
/// an `Instant` (a probe, a retry, a deadline) would overflow and panic.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// A duration such as `30s`, `5m`, `250ms`; at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(try_from = "StringLike")]
#[schemars(
    rename = "Duration",
    description = "A duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`, `w`, …), possibly several (`1h 30m`); `0` alone is zero. At most 10 years.",
    extend("anyOf" = [duration_string_schema(), { "const": 0 }]),
    extend("examples" = ["30s", "5m", "250ms", "1h 30m"])
)]
pub struct Dur(pub Duration);

impl TryFrom<StringLike> for Dur {
    type Error = ValueError;
    fn try_from(s: StringLike) -> Result<Self, ValueError> {
        let range = "a duration of at most 10 years";
        bounded(&s.0, Duration::ZERO, MAX_DURATION, range).map(Dur)
    }
}

/// Longest timeout accepted: a request (poll, token, delivery) or a drain
/// that takes longer is stuck.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A timeout: more than 0 (a zero timeout fails every request) and at most
/// [`MAX_TIMEOUT`].
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(try_from = "StringLike")]
#[schemars(
    description = "A timeout: a duration more than 0 and at most 1h, e.g. `30s`.",
    extend("allOf" = [duration_string_schema(), { "not": { "pattern": NOT_ZERO } }]),
    extend("examples" = ["10s", "30s", "2m"])
)]
pub struct Timeout(pub Duration);

impl TryFrom<StringLike> for Timeout {
    type Error = ValueError;
    fn try_from(s: StringLike) -> Result<Self, ValueError> {
        let range = "a timeout more than 0 and at most 1h, such as `30s`";
        bounded(&s.0, Duration::from_nanos(1), MAX_TIMEOUT, range).map(Timeout)
    }
}

/// A delay, interval or age that must be more than 0: a zero probe or retry
/// delay would spin on a failing endpoint, a zero `seen_ttl` would forget
/// every id at once and emit it again, a zero retention would delete what
/// it is meant to keep.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(try_from = "StringLike")]
#[schemars(
    rename = "NonZeroDuration",
    description = "A duration more than 0 and at most 10 years: a number and a unit (`ms`, `s`, `m`, `h`, `d`, `w`, …), possibly several (`1h 30m`).",
    extend("allOf" = [duration_string_schema(), { "not": { "pattern": NOT_ZERO } }]),
    extend("examples" = ["30s", "5m", "7d"])
)]
pub struct NonZeroDur(pub Duration);

impl TryFrom<StringLike> for NonZeroDur {
    type Error = ValueError;
    fn try_from(s: StringLike) -> Result<Self, ValueError> {
        let range = "a duration more than 0 and at most 10 years, such as `30s`";
        bounded(&s.0, Duration::from_nanos(1), MAX_DURATION, range).map(NonZeroDur)
    }
}

/// Parses a duration and checks it lies in `min..=max`, saying `range`
/// (what was expected) otherwise.
fn bounded(
    text: &str,
    min: Duration,
    max: Duration,
    range: &'static str,
) -> Result<Duration, ValueError> {
    let d = parse_duration(text)?;
    if d < min || d > max {
        let got = text.trim().to_string();
        return Err(ValueError::Range { range, got });
    }
    Ok(d)
}

/// Why a value was refused: the message serde reports at its location.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// Not a duration (or an interval, a schedule's part).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("expected {range}, got `{got}`")]
    Range { range: &'static str, got: String },
    #[error("invalid JSONPath `{text}` ({reason}); expected RFC 9535 syntax such as `$.items[*]`")]
    JsonPath { text: String, reason: String },
    #[error("invalid template `{text}`: {reason}")]
    Template { text: String, reason: TemplateError },
    #[error("invalid condition `{text}`: {reason}")]
    Condition { text: String, reason: TemplateError },
    /// A string of a value template (its message names it).
    #[error(transparent)]
    Value(TemplateError),
}

// `Rate` lives in `quota` (a plain value type, see `config::raw`'s doc): its
// `Deserialize` and `JsonSchema` are written here rather than derived there,
// so that `quota` knows nothing of YAML or schemas.
impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Rate::parse(&StringLike::deserialize(d)?.0).map_err(de::Error::custom)
    }
}

/// A JSONPath (RFC 9535), checked at load.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "String")]
#[schemars(
    rename = "JsonPath",
    description = "A JSONPath query (RFC 9535), starting at the root `$`.",
    extend("pattern" = r"^\$", "examples" = ["$.items[*]", "$.next_cursor", "$[*]"])
)]
pub struct JsonPathSrc(pub String);

impl TryFrom<String> for JsonPathSrc {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        match serde_json_path::JsonPath::parse(&s) {
            Ok(_) => Ok(JsonPathSrc(s)),
            Err(e) => Err(ValueError::JsonPath {
                text: s,
                reason: e.to_string(),
            }),
        }
    }
}

/// A template, syntax-checked at load.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "StringLike")]
#[schemars(
    rename = "Template",
    description = "A minijinja (Jinja2) template, e.g. `{{ base_url }}/items`; a number or boolean stands for its text.",
    extend("type" = ["string", "number", "boolean"]),
    extend("examples" = ["{{ base_url }}/accounts/{{ account }}", "{{ item.id }}"])
)]
pub struct TemplateSrc(pub String);

impl TryFrom<StringLike> for TemplateSrc {
    type Error = ValueError;
    fn try_from(StringLike(s): StringLike) -> Result<Self, ValueError> {
        match template::check_template(&s) {
            Ok(()) => Ok(TemplateSrc(s)),
            Err(reason) => Err(ValueError::Template { text: s, reason }),
        }
    }
}

/// A value whose strings are templates, syntax-checked at load.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "serde_json::Value")]
#[schemars(
    rename = "ValueTemplate",
    description = "Any YAML value; every string in it is a minijinja template, and a string that is a lone `{{ expr }}` keeps the expression's type."
)]
pub struct ValueSrc(pub serde_json::Value);

impl TryFrom<serde_json::Value> for ValueSrc {
    type Error = ValueError;
    fn try_from(v: serde_json::Value) -> Result<Self, ValueError> {
        template::check_value(&v).map_err(ValueError::Value)?;
        Ok(ValueSrc(v))
    }
}

/// A condition (a template expression), syntax-checked at load.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(try_from = "String")]
#[schemars(
    rename = "Condition",
    description = "A minijinja expression (no `{{ }}`), true or false, e.g. `current.available < low_threshold`; an unquoted number or boolean stands for its text.",
    extend("type" = ["string", "number", "boolean"]),
    extend("examples" = ["current.available != previous.available", "count == 0"])
)]
pub struct ConditionSrc(pub String);

impl TryFrom<String> for ConditionSrc {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        match template::check_condition(&s) {
            Ok(()) => Ok(ConditionSrc(s)),
            Err(reason) => Err(ValueError::Condition { text: s, reason }),
        }
    }
}

/// A schedule: `every 30s`, a cron line, or
/// `{ every | cron, jitter, tz, active, catch_up }`.
#[derive(Clone, Debug)]
pub struct ScheduleSpec(pub Schedule);

// Hand-written, with its schema: the two forms are one value (untagged, an
// error in the map form would lose its location), the map form's fields are
// checked together (exactly one of `every` and `cron`, a non-empty
// `active`), and its schema says so with a `oneOf` of required keys, which
// schemars does not derive.

impl<'de> Deserialize<'de> for ScheduleSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ScheduleSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`every <duration>`, a cron line, or `{ every: 30s }` / `{ cron: \"0 9 * * 1-5\", tz: Europe/Paris, active: [\"Mon-Fri 08:00-18:00\"], jitter: 10s, catch_up: once | skip }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScheduleSpec, E> {
                Schedule::parse(v).map(ScheduleSpec).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ScheduleSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct M {
                    every: Option<String>,
                    cron: Option<String>,
                    jitter: Option<Dur>,
                    tz: Option<String>,
                    active: Option<Vec<String>>,
                    catch_up: Option<String>,
                    min: Option<Dur>,
                    max: Option<Dur>,
                }
                let m = M::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let mut s = match (m.every, m.cron) {
                    (Some(e), None) => Schedule::parse(&format!("every {e}")),
                    (None, Some(c)) => Schedule::cron(&c),
                    _ => {
                        let e = "give exactly one of `every` and `cron`";
                        return Err(de::Error::custom(e));
                    }
                }
                .map_err(de::Error::custom)?;
                s.jitter = m.jitter.map(|j| j.0).unwrap_or_default();
                if let Some(tz) = m.tz {
                    s.tz = schedule::parse_tz(&tz).map_err(de::Error::custom)?;
                }
                if let Some(active) = m.active {
                    if active.is_empty() {
                        return Err(de::Error::custom(
                            "`active: []` would never poll; list windows such as `Mon-Fri 08:00-18:00`, or leave `active` out",
                        ));
                    }
                    s.windows = active
                        .iter()
                        .map(|w| schedule::Window::parse(w))
                        .collect::<Result<_, _>>()
                        .map_err(de::Error::custom)?;
                }
                if let Some(c) = m.catch_up {
                    s.catch_up = schedule::CatchUp::parse(&c).map_err(de::Error::custom)?;
                }
                if m.min.is_some() || m.max.is_some() {
                    s.set_adaptive(m.min.map(|d| d.0), m.max.map(|d| d.0))
                        .map_err(de::Error::custom)?;
                }
                Ok(ScheduleSpec(s))
            }
        }
        d.deserialize_any(V)
    }
}

// ------------------------------------------------------------ JSON Schema
//
// Each schema says what the `Deserialize` accepts; checks made later (cron
// fields, time zones, template syntax) are described, not encoded.

/// Units `humantime` (hence [`parse_duration`]) accepts.
const DURATION_UNITS: &str = "nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y";

/// One or more `<number><unit>` spans, e.g. `1h 30m` or `1.5s`.
fn duration_spans() -> String {
    format!(r"([0-9]+(\.[0-9]+)?\s*({DURATION_UNITS})\s*)+")
}

/// What a duration more than 0 is not (zero in any unit).
const NOT_ZERO: &str = r"^\s*0+\s*[a-zA-Zµ]*\s*$";

/// A string holding a duration.
fn duration_string_schema() -> Schema {
    json_schema!({
        "type": "string",
        "pattern": format!(r"^\s*(0|{})\s*$", duration_spans()),
    })
}

impl JsonSchema for Rate {
    fn schema_name() -> Cow<'static, str> {
        "Rate".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A rate `N/unit`: N ≥ 1 requests per `s`, `min`, `h`, `day` or any duration (`5/2s`).",
            "type": "string",
            "pattern": r"^\s*[0-9]*[1-9][0-9]*\s*/\s*\S.*$",
            "examples": ["10/s", "60/min", "1000/h", "5/2s"],
        })
    }
}

impl JsonSchema for ScheduleSpec {
    fn schema_name() -> Cow<'static, str> {
        "Schedule".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let spans = duration_spans();
        let cron_fields = r"\S+(\s+\S+){4,6}";
        json_schema!({
            "description": "When to poll: `every <duration>`, a cron line (5 fields, or 6–7 with seconds first), or a map with `every` or `cron` and options.",
            "oneOf": [
                {
                    "type": "string",
                    "pattern": format!(r"^\s*(every +{spans}|(cron\s+)?{cron_fields})\s*$"),
                    "examples": ["every 30s", "every 5m", "*/5 * * * *", "0 9 * * 1-5"],
                },
                {
                    "type": "object",
                    "properties": {
                        "every": {
                            "description": "Interval between polls, e.g. `30s`.",
                            "type": "string",
                            "pattern": format!(r"^\s*{spans}$"),
                        },
                        "cron": {
                            "description": "A cron line: 5 fields (`min hour day month weekday`) or 6–7 with seconds first.",
                            "type": "string",
                            "pattern": format!(r"^\s*{cron_fields}\s*$"),
                        },
                        "jitter": generator.subschema_for::<Dur>(),
                        "tz": {
                            "description": "IANA time zone of the cron line and the active windows (UTC by default).",
                            "type": "string",
                            "examples": ["Europe/Paris", "America/New_York", "UTC"],
                        },
                        "active": {
                            "description": "Windows in which polls may happen, e.g. `Mon-Fri 08:00-18:00`, `Sat,Sun 10:00-12:00`, `daily 22:00-02:00`.",
                            "type": "array",
                            "items": { "type": "string" },
                            "minItems": 1,
                        },
                        "catch_up": {
                            "description": "Runs missed while the daemon was stopped: one poll at start (`once`, default) or none (`skip`).",
                            "enum": ["once", "skip"],
                        },
                        "min": {
                            "description": "Adaptive interval (with `every`): the interval right after a change.",
                            "type": "string",
                            "pattern": format!(r"^\s*{spans}$"),
                        },
                        "max": {
                            "description": "Adaptive interval (with `every`): the longest interval while nothing changes.",
                            "type": "string",
                            "pattern": format!(r"^\s*{spans}$"),
                        },
                    },
                    "oneOf": [
                        { "required": ["every"] },
                        { "required": ["cron"] },
                    ],
                    "additionalProperties": false,
                },
            ],
        })
    }
}

/// A string, or a number/bool written without quotes (`timeout: 30` is
/// read as `30`, which then fails with the duration's own message): what
/// the types above are read from (`#[serde(try_from = "StringLike")]`).
/// Its schema says nothing (`true`); each type says what it accepts.
#[derive(JsonSchema)]
#[schemars(with = "serde_json::Value")]
pub struct StringLike(String);

impl<'de> Deserialize<'de> for StringLike {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'a> Visitor<'a> for V {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
        }
        d.deserialize_any(V).map(StringLike)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{RawBridge, RawConnector};

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("60/min").unwrap(),
            Rate {
                count: 60,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(Rate::parse("5/2s").unwrap().per, Duration::from_secs(2));
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("fast")
            .unwrap_err()
            .to_string()
            .contains("expected a rate"));
    }

    /// The YAML reader's own error: tests read its message.
    fn parse<T: for<'de> Deserialize<'de>>(v: &str) -> Result<T, serde_saphyr::Error> {
        serde_saphyr::from_str::<T>(v)
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse::<Dur>("0").unwrap().0, Duration::ZERO);
        assert!(parse::<Dur>("10y").is_ok());
        // Past this, adding it to an `Instant` panics.
        let e = parse::<Dur>("100000000 years").unwrap_err().to_string();
        assert!(e.contains("at most 10 years"), "{e}");
        assert!(parse::<Timeout>("1h").is_ok());
        for bad in ["0", "0s", "61m", "10 years"] {
            let e = parse::<Timeout>(bad).unwrap_err().to_string();
            assert!(e.contains("more than 0 and at most 1h"), "{bad}: {e}");
        }
        assert!(parse::<NonZeroDur>("1ms").is_ok());
        for bad in ["0ms", "11y"] {
            let e = parse::<NonZeroDur>(bad).unwrap_err().to_string();
            assert!(e.contains("more than 0 and at most 10 years"), "{bad}: {e}");
        }
    }
    /// Each value read through `try_from`: the message and location of
    /// its error, as they were when these `Deserialize`s were written by
    /// hand (the text of `serde_saphyr`'s error, location included).
    const PINNED_CASES: &[&str] = &[
        "request: { url: u, timeout: 0 }",
        "request: { url: u, timeout: [1] }",
        "request:\n  url: u\n  timeout: 2h",
        "cursor: { lookback: 100000000 years }",
        "cursor:\n  lookback:\n    - 1s",
        "seen_ttl: 0ms",
        "seen_ttl: 30",
        "items: 'items[*]'",
        "items: [a]",
        "request: { url: '{{ x' }",
        "request: { url: 3.5, body: '{% if %}' }",
        "emit: [{ type: t, when: 'a ==' }]",
        "emit: [{ type: t, when: [a] }]",
        "emit:\n  - type: t\n    data: { n: '{{ a' }",
        "rate_limit: fast",
        "rate_limit: 0/s",
        "rate_limit: [1]",
    ];
    const PINNED_ERRORS: &[&str] = &[
        "error: line 1 column 29: expected a timeout more than 0 and at most 1h, such as `30s`, got `0`",
        "error: line 1 column 20: invalid type: sequence, expected a string",
        "error: line 3 column 12: expected a timeout more than 0 and at most 1h, such as `30s`, got `2h`",
        "error: line 1 column 21: expected a duration of at most 10 years, got `100000000 years`",
        "error: line 2 column 3: invalid type: sequence, expected a string",
        "error: line 1 column 11: expected a duration more than 0 and at most 10 years, such as `30s`, got `0ms`",
        "error: line 1 column 11: expected a duration such as `500ms`, `30s`, `5m` or `1h`, got `30` (time unit needed, for example 30sec or 30ms)",
        "error: line 1 column 8: invalid JSONPath `items[*]` (at position 0, parser error); expected RFC 9535 syntax such as `$.items[*]`",
        "error: line 1 column 8: expected string scalar",
        "error: line 1 column 17: invalid template `{{ x`: syntax error: unexpected end of input, expected end of variable block",
        "error: line 1 column 28: invalid template `{% if %}`: syntax error: unexpected end of block",
        "error: line 1 column 25: invalid condition `a ==`: syntax error: unexpected end of input, expected expression",
        "error: line 1 column 25: expected string scalar",
        "error: line 3 column 11: invalid template `{{ a`: syntax error: unexpected end of input, expected end of variable block",
        "error: line 1 column 13: expected a rate such as `10/s`, `60/min` or `1000/h`, got `fast`",
        "error: line 1 column 13: expected a rate such as `10/s`, `60/min` or `1000/h`, got `0/s`: the count must be at least 1",
        "error: line 1 column 1: invalid type: sequence, expected a string",
        "error: line 1 column 17: expected a lease from 1s to 10m, such as `15s`, got `0s`",
        "error: line 2 column 10: expected a lease from 1s to 10m, such as `15s`, got `11m`",
        "error: line 1 column 19: expected a timeout more than 0 and at most 1h, such as `30s`, got `0`",
        "error: line 1 column 21: expected a rate such as `10/s`, `60/min` or `1000/h`, got `1/0s`",
    ];

    const BRIDGE_CASES: &[&str] = &[
        "store: { lease: 0s }",
        "store:\n  lease: 11m",
        "shutdown_timeout: 0",
        "hosts: { a: { rate: 1/0s } }",
    ];

    /// A connector file of `case` and the required keys it does not set.
    fn connector_with(case: &str) -> String {
        let mut doc = format!("{case}\n");
        for (key, line) in [
            ("name:", "name: c"),
            ("request:", "request: { url: u }"),
            ("detect:", "detect: snapshot"),
            ("emit:", "emit: [{ type: t }]"),
        ] {
            if !case.starts_with(key) {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        doc
    }

    fn pinned_errors() -> Vec<String> {
        let mut out: Vec<String> = PINNED_CASES
            .iter()
            .map(|c| {
                parse::<RawConnector>(&connector_with(c))
                    .unwrap_err()
                    .to_string()
            })
            .collect();
        out.extend(
            BRIDGE_CASES
                .iter()
                .map(|c| parse::<RawBridge>(c).unwrap_err().to_string()),
        );
        out
    }

    #[test]
    fn errors_keep_their_message_and_location() {
        let got = pinned_errors();
        assert_eq!(got.len(), PINNED_ERRORS.len());
        for (got, wanted) in got.iter().zip(PINNED_ERRORS) {
            assert_eq!(got.lines().next(), Some(*wanted), "{got}");
        }
    }
}
