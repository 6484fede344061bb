//! One poll's HTTP: render the request, send it politely (quotas,
//! conditional headers), read a bounded body, follow pages.

use chrono::{DateTime, SecondsFormat, Utc};
use minijinja::Value as Ctx;
use reqwest::header::{
    HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use serde_json::{Map, Value};

use crate::config::{Auth, Connector, Instance};
use crate::quota::HostGates;
use crate::store::InstanceState;

/// Why a poll failed. Messages name the URL (masked by the caller) and say
/// what was wrong; they never include request headers (credentials).
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("template error in {field}: {detail}")]
    Template { field: String, detail: String },
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{url}: upstream answered HTTP {status}{snippet}")]
    Status {
        url: String,
        status: u16,
        snippet: String,
    },
    #[error("{url}: response larger than the {limit}-byte cap (request.max_response_bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: response is not valid JSON ({detail}){snippet}")]
    NotJson {
        url: String,
        detail: String,
        snippet: String,
    },
    #[error("detection failed: {0}")]
    Detect(String),
}

impl PollError {
    /// A short label for metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            PollError::Template { .. } => "template",
            PollError::Transport { .. } => "transport",
            PollError::Status { .. } => "status",
            PollError::TooLarge { .. } => "too_large",
            PollError::NotJson { .. } => "not_json",
            PollError::Detect(_) => "detect",
        }
    }
}

/// What the upstream answered in one poll.
#[derive(Debug, Default)]
pub struct Fetched {
    /// `304 Not Modified` to a conditional request: nothing changed.
    pub not_modified: bool,
    /// Parsed bodies, in page order.
    pub pages: Vec<Value>,
    /// Validators of the first page, to store for the next conditional request.
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The first page's URL, which the validators belong to.
    pub first_url: Option<String>,
    /// Each request made, for `pollhook test`.
    pub log: Vec<RequestLog>,
}

/// One request of a poll, as shown by `pollhook test`.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub method: String,
    pub url: String,
    pub status: u16,
    pub bytes: usize,
}

/// The template context of requests: params, `cursor` (only when there is
/// one, so `cursor | default('')` works) and `now`.
pub fn request_context(
    instance: &Instance,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> Map<String, Value> {
    let mut ctx = instance.vars.clone();
    if let Some(c) = &state.cursor {
        ctx.insert("cursor".into(), Value::String(c.clone()));
    }
    ctx.insert(
        "now".into(),
        Value::String(now.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    ctx
}

/// Everything a poll needs besides the connector and the instance.
pub struct FetchEnv<'a> {
    pub client: &'a reqwest::Client,
    /// Host quotas; each request (page) passes its host's gate.
    pub hosts: &'a HostGates,
    /// This instance's connector `rate_limit`.
    pub rate_limit: Option<&'a governor::DefaultDirectRateLimiter>,
}

/// Polls once: the first request, then pages while `paginate` says so.
pub async fn fetch(
    c: &Connector,
    inst: &Instance,
    state: &InstanceState,
    env: &FetchEnv<'_>,
    now: DateTime<Utc>,
) -> Result<Fetched, PollError> {
    let ctx = Ctx::from_serialize(request_context(inst, state, now));
    let render = |tpl, field: &str| {
        c.engine
            .render(tpl, &ctx)
            .map_err(|detail| PollError::Template {
                field: field.to_string(),
                detail,
            })
    };
    let url_text = render(&c.request.url, "request.url")?;
    let mut url = reqwest::Url::parse(url_text.trim()).map_err(|e| PollError::Template {
        field: "request.url".into(),
        detail: format!("`{url_text}` is not a URL: {e}"),
    })?;
    {
        let mut pairs = Vec::new();
        for (k, t) in &c.request.query {
            let v = render(t, &format!("request.query.{k}"))?;
            if !v.is_empty() {
                pairs.push((k.clone(), v));
            }
        }
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
    }
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, t) in &c.request.headers {
        let v = render(t, &format!("request.headers.{k}"))?;
        if v.is_empty() {
            continue;
        }
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("checked at load");
        let value = HeaderValue::from_str(&v).map_err(|_| PollError::Template {
            field: format!("request.headers.{k}"),
            detail: "rendered to a value that is not a valid header".into(),
        })?;
        headers.insert(name, value);
    }
    let mut basic: Option<(String, Option<String>)> = None;
    match &c.request.auth {
        None => {}
        Some(Auth::Bearer(t)) => {
            let token = render(t, "request.auth.token")?;
            if !token.is_empty() {
                let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    PollError::Template {
                        field: "request.auth.token".into(),
                        detail: "rendered to a value that is not a valid header".into(),
                    }
                })?;
                v.set_sensitive(true);
                headers.insert(AUTHORIZATION, v);
            }
        }
        Some(Auth::Basic(u, p)) => {
            let user = render(u, "request.auth.username")?;
            let pass = p
                .as_ref()
                .map(|p| render(p, "request.auth.password"))
                .transpose()?;
            basic = Some((user, pass));
        }
    }
    let body = c
        .request
        .body
        .as_ref()
        .map(|b| render(b, "request.body"))
        .transpose()?;
    if body.is_some() && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }

    let mut out = Fetched::default();
    let max_pages = c.paginate.as_ref().map(|p| p.max_pages).unwrap_or(1);
    let mut position = state.cursor.clone();
    for page_no in 0..max_pages {
        let first = page_no == 0;
        let mut req = env
            .client
            .request(c.request.method.clone(), url.clone())
            .headers(headers.clone())
            .timeout(c.request.timeout);
        if let Some((u, p)) = &basic {
            req = req.basic_auth(u, p.as_ref());
        }
        if let Some(b) = &body {
            req = req.body(b.clone());
        }
        let conditional = first && state.validator_url.as_deref() == Some(url.as_str());
        if conditional {
            if let Some(e) = &state.etag {
                req = req.header(IF_NONE_MATCH, e);
            }
            if let Some(m) = &state.last_modified {
                req = req.header(IF_MODIFIED_SINCE, m);
            }
        }
        // Politeness: the connector's own quota, then the host's.
        if let Some(l) = env.rate_limit {
            l.until_ready().await;
        }
        let _permit = match env.hosts.for_url(&url) {
            Some(g) => g.acquire().await,
            None => None,
        };
        let shown = url.to_string();
        let resp = req.send().await.map_err(|e| PollError::Transport {
            url: shown.clone(),
            detail: transport_detail(&e),
        })?;
        let status = resp.status().as_u16();
        if status == 304 && conditional {
            out.log.push(RequestLog {
                method: c.request.method.to_string(),
                url: shown,
                status,
                bytes: 0,
            });
            out.not_modified = true;
            return Ok(out);
        }
        if first {
            let h = resp.headers();
            out.etag = h
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            out.last_modified = h
                .get(LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            out.first_url = Some(url.to_string());
        }
        if !(200..300).contains(&status) {
            let bytes = read_capped(resp, 512, &shown).await.unwrap_or_default();
            return Err(PollError::Status {
                url: shown,
                status,
                snippet: snippet(&bytes),
            });
        }
        let bytes = read_capped(resp, c.request.max_response_bytes, &shown).await?;
        out.log.push(RequestLog {
            method: c.request.method.to_string(),
            url: shown.clone(),
            status,
            bytes: bytes.len(),
        });
        let page: Value = serde_json::from_slice(&bytes).map_err(|e| PollError::NotJson {
            url: shown.clone(),
            detail: e.to_string(),
            snippet: snippet(&bytes),
        })?;

        // Next page?
        let next = c.paginate.as_ref().and_then(|p| {
            let empty = c
                .items
                .as_ref()
                .is_some_and(|items| items.query(&page).is_empty());
            let next = p.cursor_from.query(&page).first().and_then(cursor_text);
            if empty || next.is_none() || next == position {
                None
            } else {
                next.map(|n| (p.param.clone(), n))
            }
        });
        out.pages.push(page);
        let Some((param, next)) = next else { break };
        set_query_param(&mut url, &param, &next);
        position = Some(next);
    }
    Ok(out)
}

/// A cursor value as text: strings as they are, numbers in JSON form, and
/// nothing for null or empty.
pub fn cursor_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn set_query_param(url: &mut reqwest::Url, name: &str, value: &str) {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair(name, value);
}

/// Reads a body, refusing more than `limit` bytes (checked against
/// `Content-Length` first, then while streaming, so a lying or missing
/// length cannot make pollhook buffer an unbounded body).
async fn read_capped(
    mut resp: reqwest::Response,
    limit: u64,
    url: &str,
) -> Result<Vec<u8>, PollError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(PollError::TooLarge {
            url: url.to_string(),
            limit,
        });
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| PollError::Transport {
        url: url.to_string(),
        detail: transport_detail(&e),
    })? {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(PollError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// reqwest's error chain without the URL (we print it once, masked).
fn transport_detail(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("request timed out".to_string());
    } else if e.is_connect() {
        parts.push("cannot connect".to_string());
    } else if e.is_body() || e.is_decode() {
        parts.push("error reading the response body".to_string());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let t = s.to_string();
        if !parts.contains(&t) {
            parts.push(t);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push("request failed".into());
    }
    parts.join(": ")
}

/// The start of a body, for error messages.
fn snippet(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("; body starts with: {}", text.trim())
}
