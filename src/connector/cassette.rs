//! Cassettes: a directory of recorded exchanges (`pollhook record`) that
//! `pollhook test --replay` answers a poll's requests from.
//!
//! One file per exchange, `pNNN-MMM.json` (poll NNN, its MMM-th request),
//! so `ls` lists them in order and a re-recording diffs file by file. Each
//! holds the poll number, the time the poll ran (`at`, the clock of the
//! replay) and the instance that sent it, the request (method, URL, headers, body) and the answer
//! (status, headers, body). A JSON body is kept as a pretty JSON value
//! (`body_json`), other text as text (`body`), only binary as base64
//! (`body_base64`), so a diff reads well. Secrets never reach the disk:
//! credential-like headers are replaced whole by `***`, and every text
//! passes [`super::mask`] with the connector's secret params and every
//! secret learned while recording (issued tokens). A cassette is safe to
//! commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::transport::{Canned, Purpose, ReadError};

/// What stands for a secret in a cassette.
pub const MASK: &str = "***";

/// One recorded request and its answer: the file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// The poll it belongs to, from 1.
    pub poll: u32,
    /// When that poll ran: the replay's clock (templates' `now`, event
    /// timestamps).
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// The instance (`source/name`) whose poll sent it: a replay answers
    /// each instance from its own exchanges, so `--instance` may pick one
    /// of a recording of several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// An OAuth2 token request: a replay answers token requests from
    /// these whenever the token cache asks, apart from the pages' order.
    #[serde(default, skip_serializing_if = "is_false")]
    pub token: bool,
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub request_headers: BTreeMap<String, HeaderText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    pub status: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub response_headers: BTreeMap<String, HeaderText>,
    #[serde(flatten)]
    pub body: Body,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `at` as RFC 3339 text to the millisecond (chrono has no serde here).
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// A header's value, or its values when it was sent more than once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderText {
    One(String),
    Many(Vec<String>),
}

/// A response body in its most readable form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Parsed as JSON: a value, pretty in the file.
    BodyJson(Value),
    /// UTF-8 text that is not JSON.
    Body(String),
    /// Anything else.
    BodyBase64(String),
    /// Reading the body failed while recording (`too large`, or what the
    /// network said).
    BodyError(String),
}

/// Why a cassette cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CassetteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a cassette exchange: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}: no exchange files (pNNN-MMM.json): not a cassette")]
    Empty(PathBuf),
}

/// The file name of exchange `n` (from 1) of poll `poll`.
pub fn file_name(poll: u32, n: usize) -> String {
    format!("p{poll:03}-{n:03}.json")
}

/// Whether `name` is an exchange file's name.
fn is_exchange_file(name: &str) -> bool {
    let b = name.as_bytes();
    name.len() == "p001-001.json".len()
        && b[0] == b'p'
        && b[4] == b'-'
        && name.ends_with(".json")
        && b[1..4].iter().chain(&b[5..8]).all(u8::is_ascii_digit)
}

/// Headers whose value is a credential whatever it holds: replaced whole.
fn is_credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || ["key", "token", "secret", "auth", "password", "session"]
        .iter()
        .any(|w| n.contains(w))
}

/// Headers as a sorted map, masked. Pure.
fn header_map(h: &HeaderMap, secrets: &[String]) -> BTreeMap<String, HeaderText> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in h {
        let text = if is_credential_header(name.as_str()) {
            MASK.to_string()
        } else {
            super::mask(&String::from_utf8_lossy(value.as_bytes()), secrets)
        };
        out.entry(name.as_str().to_string()).or_default().push(text);
    }
    out.into_iter()
        .map(|(k, mut v)| {
            let t = if v.len() == 1 {
                HeaderText::One(v.remove(0))
            } else {
                HeaderText::Many(v)
            };
            (k, t)
        })
        .collect()
}

/// Every string (and key) of a JSON value masked. Pure.
fn mask_json(v: &Value, secrets: &[String]) -> Value {
    match v {
        Value::String(s) => Value::String(super::mask(s, secrets)),
        Value::Array(a) => Value::Array(a.iter().map(|x| mask_json(x, secrets)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (super::mask(k, secrets), mask_json(x, secrets)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A body in its most readable form, masked. Pure.
fn body_of(bytes: &[u8], secrets: &[String]) -> Body {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            return Body::BodyJson(mask_json(&v, secrets));
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(t) => Body::Body(super::mask(t, secrets)),
        Err(_) => Body::BodyBase64(base64::engine::general_purpose::STANDARD.encode(bytes)),
    }
}

/// The bytes a recorded body stands for. Pure.
fn bytes_of(body: &Body) -> Result<Vec<u8>, ReadError> {
    match body {
        Body::BodyJson(v) => Ok(serde_json::to_vec(v).expect("a JSON value serializes")),
        Body::Body(t) => Ok(t.clone().into_bytes()),
        Body::BodyBase64(b) => Ok(base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default()),
        Body::BodyError(e) if e == &ReadError::TooLarge.to_string() => Err(ReadError::TooLarge),
        Body::BodyError(e) => Err(ReadError::Network(e.clone())),
    }
}

/// An exchange as seen on the wire, before masking.
struct Raw {
    poll: u32,
    at: DateTime<Utc>,
    instance: Option<String>,
    token: bool,
    method: Method,
    url: Url,
    request_headers: HeaderMap,
    request_body: Option<Vec<u8>>,
    answer: Canned,
}

/// A request as it was sent, for the recorder.
pub struct Sent<'a> {
    pub purpose: Purpose,
    pub method: &'a Method,
    pub url: &'a Url,
    pub headers: &'a HeaderMap,
    pub body: Option<&'a [u8]>,
}

/// Keeps the exchanges of a recording (`pollhook record`) in memory, in
/// order, until [`Recorder::write`]: masking waits until then, so a token
/// issued during the recording is masked in the exchanges before it too.
#[derive(Default)]
pub struct Recorder {
    current: Mutex<Option<(u32, DateTime<Utc>, String)>>,
    exchanges: Mutex<Vec<Raw>>,
}

impl Recorder {
    /// Exchanges from now on belong to poll `poll` (from 1) of `instance`,
    /// run at `at`.
    pub fn begin_poll(&self, poll: u32, at: DateTime<Utc>, instance: &str) {
        *self.current.lock() = Some((poll, at, instance.to_string()));
    }

    /// Keeps one exchange (called by the transport).
    pub fn record(&self, sent: Sent<'_>, answer: &Canned) {
        let (poll, at, instance) = match self.current.lock().clone() {
            Some((p, at, i)) => (p, at, Some(i)),
            None => (1, Utc::now(), None),
        };
        self.exchanges.lock().push(Raw {
            poll,
            at,
            instance,
            token: sent.purpose == Purpose::Token,
            method: sent.method.clone(),
            url: sent.url.clone(),
            request_headers: sent.headers.clone(),
            request_body: sent.body.map(<[u8]>::to_vec),
            answer: answer.clone(),
        });
    }

    /// The exchanges so far, masked with `secrets` and every learned
    /// secret.
    pub fn exchanges(&self, secrets: &[String]) -> Vec<Exchange> {
        self.exchanges
            .lock()
            .iter()
            .map(|r| Exchange {
                poll: r.poll,
                at: r.at,
                instance: r.instance.clone(),
                token: r.token,
                method: r.method.to_string(),
                url: super::mask(r.url.as_str(), secrets),
                request_headers: header_map(&r.request_headers, secrets),
                request_body: r
                    .request_body
                    .as_ref()
                    .map(|b| super::mask(&String::from_utf8_lossy(b), secrets)),
                status: r.answer.status.as_u16(),
                response_headers: header_map(&r.answer.headers, secrets),
                body: match &r.answer.body {
                    Ok(b) => body_of(b, secrets),
                    Err(e) => Body::BodyError(e.to_string()),
                },
            })
            .collect()
    }

    /// Writes the cassette into `dir` (created if needed), replacing the
    /// exchange files of an earlier recording there. Returns the number of
    /// files written.
    pub fn write(&self, dir: &Path, secrets: &[String]) -> Result<usize, CassetteError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CassetteError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            if is_exchange_file(&entry.file_name().to_string_lossy()) {
                std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        let exchanges = self.exchanges(secrets);
        let mut n = 0;
        let mut last_poll = 0;
        for e in &exchanges {
            if e.poll != last_poll {
                last_poll = e.poll;
                n = 0;
            }
            n += 1;
            let path = dir.join(file_name(e.poll, n));
            let mut text = serde_json::to_string_pretty(e).expect("an exchange serializes");
            text.push('\n');
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        Ok(exchanges.len())
    }
}

/// One poll of a cassette.
#[derive(Debug, Clone)]
pub struct TapePoll {
    pub poll: u32,
    pub at: DateTime<Utc>,
    /// Exchanges in order, with their file names.
    pub exchanges: Vec<(String, Exchange)>,
}

/// A cassette read back, answering requests in order (`--replay`).
pub struct Cassette {
    dir: PathBuf,
    polls: Vec<TapePoll>,
    /// Masked from the URLs the pipeline sends before they are compared
    /// with the recorded (masked) ones.
    secrets: Vec<String>,
    /// What is being answered: (index into `polls`, the instance, its
    /// next exchange).
    at: Mutex<(usize, String, usize)>,
}

impl Cassette {
    /// Reads every exchange file of `dir`.
    pub fn load(dir: &Path, secrets: Vec<String>) -> Result<Cassette, CassetteError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CassetteError::Io { path, source }
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let name = entry.map_err(io(dir))?.file_name();
            let name = name.to_string_lossy().to_string();
            if is_exchange_file(&name) {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(CassetteError::Empty(dir.to_path_buf()));
        }
        let mut polls: Vec<TapePoll> = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let e: Exchange = serde_json::from_str(&text)
                .map_err(|source| CassetteError::Format { path, source })?;
            match polls.last_mut() {
                Some(p) if p.poll == e.poll => p.exchanges.push((name, e)),
                _ => polls.push(TapePoll {
                    poll: e.poll,
                    at: e.at,
                    exchanges: vec![(name, e)],
                }),
            }
        }
        Ok(Cassette {
            dir: dir.to_path_buf(),
            polls,
            secrets,
            at: Mutex::new((0, String::new(), 0)),
        })
    }

    /// The recorded polls, in order.
    pub fn polls(&self) -> &[TapePoll] {
        &self.polls
    }

    /// Requests from now on are `instance`'s in the `index`-th poll (from
    /// 0), answered in order by its exchanges there (and by those recorded
    /// without an instance).
    pub fn begin_poll(&self, index: usize, instance: &str) {
        *self.at.lock() = (index, instance.to_string(), 0);
    }

    /// The exchanges of the current poll and instance that no request has
    /// asked for (the pipeline sent fewer requests than were recorded), by
    /// file name.
    pub fn unasked(&self) -> Vec<String> {
        let at = self.at.lock();
        let Some(poll) = self.polls.get(at.0) else {
            return Vec::new();
        };
        poll.exchanges
            .iter()
            .filter(|(_, e)| !e.token && e.instance.as_deref().is_none_or(|i| i == at.1))
            .skip(at.2)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The answer to the next request of the current poll: the next
    /// exchange, if its method and URL are the request's (after masking).
    pub fn answer(&self, method: &Method, url: &Url) -> Result<Canned, Mismatch> {
        let mut at = self.at.lock();
        let (p, n) = (at.0, at.2);
        let instance = at.1.clone();
        let sent = self.sent(method, url);
        let Some(poll) = self.polls.get(p) else {
            return Err(Mismatch::NoPoll {
                dir: self.dir.clone(),
                poll: p + 1,
                sent,
            });
        };
        let mine: Vec<&(String, Exchange)> = poll
            .exchanges
            .iter()
            .filter(|(_, e)| !e.token && e.instance.as_deref().is_none_or(|i| i == instance))
            .collect();
        let Some((name, e)) = mine.get(n) else {
            return Err(Mismatch::OneMore {
                dir: self.dir.clone(),
                recorded: mine.len(),
                instance,
                poll: poll.poll,
                sent,
            });
        };
        let recorded = request_line(e);
        if recorded != sent {
            return Err(Mismatch::Differs {
                n: n + 1,
                instance,
                poll: poll.poll,
                sent,
                file: name.clone(),
                recorded,
            });
        }
        at.2 += 1;
        Ok(canned(e))
    }

    /// The answer to a token request: the last recorded token exchange
    /// with its method and URL up to the current poll (or, if it first
    /// asked later in the recording, the first one after).
    pub fn answer_token(&self, method: &Method, url: &Url) -> Result<Canned, Mismatch> {
        let current = self.at.lock().0;
        let sent = self.sent(method, url);
        let mut tokens = self.polls.iter().enumerate().flat_map(|(i, p)| {
            p.exchanges
                .iter()
                .filter(|(_, e)| e.token && request_line(e) == sent)
                .map(move |(_, e)| (i, e))
        });
        let mut chosen = None;
        for (i, e) in tokens.by_ref() {
            if i > current && chosen.is_some() {
                break;
            }
            chosen = Some(e);
            if i > current {
                break;
            }
        }
        chosen.map(canned).ok_or_else(|| Mismatch::NoToken {
            dir: self.dir.clone(),
            sent,
        })
    }

    /// `METHOD url` of a request as the cassette holds it: masked with
    /// the instances' secrets, so it compares with a recorded one.
    fn sent(&self, method: &Method, url: &Url) -> String {
        format!("{method} {}", super::mask(url.as_str(), &self.secrets))
    }
}

/// `METHOD url` of a recorded exchange.
fn request_line(e: &Exchange) -> String {
    format!("{} {}", e.method, e.url)
}

/// Why a replayed request has no answer: the pipeline asked for something
/// other than what was recorded. The messages are what `pollhook test
/// --replay` reports as the poll's transport error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The replay runs more polls than were recorded.
    #[error("the cassette {} has no poll {poll} for the request {sent}", dir.display())]
    NoPoll {
        dir: PathBuf,
        poll: usize,
        sent: String,
    },
    /// The instance sent more requests in this poll than were recorded.
    #[error("the cassette {} has {recorded} request(s) of {instance} in poll {poll}, the pipeline sent one more: {sent}", dir.display())]
    OneMore {
        dir: PathBuf,
        recorded: usize,
        instance: String,
        poll: u32,
        sent: String,
    },
    /// The `n`-th request is not the `n`-th recorded one (`file`).
    #[error("request {n} of {instance} in poll {poll} differs from the cassette: the pipeline sent {sent}, {file} recorded {recorded}")]
    Differs {
        n: usize,
        instance: String,
        poll: u32,
        sent: String,
        file: String,
        recorded: String,
    },
    /// No token exchange with this method and URL was recorded.
    #[error("the cassette {} has no token request {sent}", dir.display())]
    NoToken { dir: PathBuf, sent: String },
}

/// A recorded answer as the transport gives it.
fn canned(e: &Exchange) -> Canned {
    let mut headers = HeaderMap::new();
    for (k, v) in &e.response_headers {
        let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
            continue;
        };
        let values = match v {
            HeaderText::One(t) => std::slice::from_ref(t),
            HeaderText::Many(ts) => ts.as_slice(),
        };
        for t in values {
            if let Ok(value) = HeaderValue::from_str(t) {
                headers.append(name.clone(), value);
            }
        }
    }
    // The body is given as it now is (a pretty JSON value serialized
    // again): its length is no longer what the server sent.
    headers.remove(reqwest::header::CONTENT_LENGTH);
    headers.remove(reqwest::header::CONTENT_ENCODING);
    Canned {
        status: StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        body: bytes_of(&e.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_files_sort_in_poll_then_request_order() {
        assert_eq!(file_name(1, 2), "p001-002.json");
        assert!(is_exchange_file("p012-003.json"));
        assert!(!is_exchange_file("p12-003.json"));
        assert!(!is_exchange_file("expected.txt"));
        let mut names = vec![file_name(2, 1), file_name(1, 10), file_name(1, 2)];
        names.sort();
        assert_eq!(names, ["p001-002.json", "p001-010.json", "p002-001.json"]);
    }

    #[test]
    fn credentials_are_masked_in_headers_and_bodies() {
        let secrets = vec!["s3cr3t-value".to_string()];
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        h.insert("x-api-key", HeaderValue::from_static("abc"));
        h.insert("x-note", HeaderValue::from_static("has s3cr3t-value in"));
        h.append("link", HeaderValue::from_static("<a>"));
        h.append("link", HeaderValue::from_static("<b>"));
        let m = header_map(&h, &secrets);
        assert_eq!(m["authorization"], HeaderText::One(MASK.into()));
        assert_eq!(m["x-api-key"], HeaderText::One(MASK.into()));
        assert_eq!(m["x-note"], HeaderText::One("has *** in".into()));
        assert_eq!(
            m["link"],
            HeaderText::Many(vec!["<a>".into(), "<b>".into()])
        );
        let b = body_of(br#"{"token":"s3cr3t-value","n":1}"#, &secrets);
        assert_eq!(
            b,
            Body::BodyJson(serde_json::json!({"token": "***", "n": 1}))
        );
        assert_eq!(
            body_of(b"plain s3cr3t-value", &secrets),
            Body::Body("plain ***".into())
        );
        assert!(matches!(
            body_of(&[0xff, 0x00], &secrets),
            Body::BodyBase64(_)
        ));
    }

    fn exchange(poll: u32, instance: &str, url: &str) -> Exchange {
        Exchange {
            poll,
            at: "2026-12-05T05:00:00Z".parse().unwrap(),
            instance: Some(instance.into()),
            token: false,
            method: "GET".into(),
            url: url.into(),
            request_headers: BTreeMap::new(),
            request_body: None,
            status: 200,
            response_headers: BTreeMap::new(),
            body: Body::Body(format!("{instance} {url}")),
        }
    }

    #[test]
    fn each_instance_is_answered_in_order_and_a_mismatch_names_both_requests() {
        let dir = tempfile::tempdir().unwrap();
        let mut token = exchange(1, "s/a", "http://h/token");
        token.token = true;
        token.method = "POST".into();
        let files = [
            (1, 1, exchange(1, "s/a", "http://h/a?k=***")),
            (1, 2, exchange(1, "s/b", "http://h/b")),
            (1, 3, exchange(1, "s/a", "http://h/a2")),
            (1, 4, token),
            (2, 1, exchange(2, "s/a", "http://h/a")),
        ];
        for (p, n, e) in &files {
            let text = serde_json::to_string_pretty(e).unwrap();
            std::fs::write(dir.path().join(file_name(*p, *n)), text).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an exchange").unwrap();
        let c = Cassette::load(dir.path(), vec!["key-123".into()]).unwrap();
        assert_eq!(c.polls().len(), 2);
        let url = |u: &str| Url::parse(u).unwrap();
        // Only instance b, as `--instance b` would.
        c.begin_poll(0, "s/b");
        let b = c.answer(&Method::GET, &url("http://h/b")).unwrap();
        assert_eq!(b.body.unwrap(), b"s/b http://h/b");
        assert!(c.unasked().is_empty());
        // Instance a: its secret is masked before the URLs are compared.
        c.begin_poll(0, "s/a");
        c.answer(&Method::GET, &url("http://h/a?k=key-123"))
            .unwrap();
        assert_eq!(c.unasked(), ["p001-003.json"]);
        let e = c
            .answer(&Method::POST, &url("http://h/a2"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("request 2 of s/a in poll 1")
                && e.contains("sent POST http://h/a2")
                && e.contains("p001-003.json recorded GET http://h/a2"),
            "{e}"
        );
        c.begin_poll(1, "s/a");
        // The token request recorded in poll 1 answers one made later.
        let t = c
            .answer_token(&Method::POST, &url("http://h/token"))
            .unwrap();
        assert_eq!(t.body.unwrap(), b"s/a http://h/token");
        c.answer(&Method::GET, &url("http://h/a")).unwrap();
        let e = c
            .answer(&Method::GET, &url("http://h/a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 1 request(s) of s/a in poll 2"), "{e}");
    }

    #[test]
    fn bodies_round_trip_through_the_file_format() {
        let e = Exchange {
            poll: 1,
            at: "2026-12-05T05:00:00Z".parse().unwrap(),
            instance: Some("s/i".into()),
            token: false,
            method: "GET".into(),
            url: "http://127.0.0.1/x".into(),
            request_headers: BTreeMap::new(),
            request_body: None,
            status: 200,
            response_headers: BTreeMap::from([(
                "etag".to_string(),
                HeaderText::One("\"v1\"".into()),
            )]),
            body: Body::BodyJson(serde_json::json!({"a": [1, 2]})),
        };
        let text = serde_json::to_string_pretty(&e).unwrap();
        assert!(text.contains("\"body_json\": {"), "{text}");
        let back: Exchange = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        let c = canned(&back);
        assert_eq!(c.body.unwrap(), br#"{"a":[1,2]}"#);
        assert_eq!(c.headers["etag"], "\"v1\"");
        let too_large = Body::BodyError(ReadError::TooLarge.to_string());
        assert_eq!(bytes_of(&too_large), Err(ReadError::TooLarge));
    }
}
