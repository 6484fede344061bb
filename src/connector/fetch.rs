//! One poll's HTTP: render the request, authenticate, send it politely
//! (quotas, conditional headers), read a bounded body in any supported
//! format, follow pages.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use minijinja::Value as Ctx;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, LINK, USER_AGENT,
};
use serde_json::{Map, Value};
use std::sync::Arc;

use super::auth::{form_encode, TokenCache, TokenRequest};
use super::detect::Listing;
use super::format::{link_next, parse_body, Format};
use crate::connector::spec::Instance;
use crate::connector::spec::{Auth, Body, Connector, KeyLocation, PageStyle};
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
    #[error("{url}: response larger than the {limit}-byte cap (request.max_response_bytes, counted after decompression)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: response is {detail}{snippet}")]
    BadBody {
        url: String,
        detail: String,
        snippet: String,
    },
    #[error("{url}: {detail}")]
    Paging { url: String, detail: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("detection failed: {0}")]
    Detect(String),
    /// The poll worked but its result could not be committed; nothing
    /// was written, so the next poll detects the same changes again.
    #[error("cannot commit to the store: {0}")]
    Store(String),
    /// The connector's `rate_limit` (counted in the store) allows no
    /// request before `wait`: the poll is put off, nothing was sent. Not
    /// a failure.
    #[error("the connector's rate_limit allows the next request in {}", humantime::format_duration(Duration::from_secs(wait.as_secs())))]
    Deferred { wait: Duration },
    /// A cluster node lost the instance's lease during the poll: its
    /// commit was refused, and the node that holds the lease now polls.
    #[error("{0}")]
    Fenced(String),
}

impl PollError {
    /// A short label for metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            PollError::Template { .. } => "template",
            PollError::Transport { .. } => "transport",
            PollError::Status { .. } => "status",
            PollError::TooLarge { .. } => "too_large",
            PollError::BadBody { .. } => "bad_body",
            PollError::Paging { .. } => "paging",
            PollError::Auth(_) => "auth",
            PollError::Detect(_) => "detect",
            PollError::Store(_) => "store",
            PollError::Fenced(_) => "fenced",
            PollError::Deferred { .. } => "deferred",
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
    /// Paging stopped early (`max_pages`, a loop): what happened. The pages
    /// read are still processed; the listing is not complete.
    pub warning: Option<String>,
    /// Some page was XML.
    pub xml: bool,
    /// What the first answer said about polling again (`X-Poll-Interval`,
    /// `Cache-Control`, `Expires`), when the connector honours it.
    pub floor: Option<crate::hints::Floor>,
}

impl Fetched {
    /// True when the pages are the whole listing (paging ended on its own).
    pub fn complete(&self) -> bool {
        self.warning.is_none()
    }

    /// What detection needs to know about the listing.
    pub fn listing(&self) -> Listing {
        Listing {
            complete: self.complete(),
            xml: self.xml,
        }
    }
}

/// One request of a poll, as shown by `pollhook test`.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub method: String,
    pub url: String,
    pub status: u16,
    pub bytes: usize,
    /// Items found on the page (when the connector has `items:`).
    pub items: Option<usize>,
}

/// The template context of requests: params, `cursor` (only when there is
/// one, so `cursor | default('')` works; moved back by `lookback`) and `now`.
pub fn request_context(
    c: &Connector,
    instance: &Instance,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> Map<String, Value> {
    let mut ctx = instance.vars.clone();
    if let Some(cur) = &state.cursor {
        let shown = match c.lookback {
            Some(lb) => shift_cursor(cur, lb),
            None => cur.clone(),
        };
        ctx.insert("cursor".into(), Value::String(shown));
    }
    ctx.insert(
        "now".into(),
        Value::String(now.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    ctx
}

/// A cursor moved back by `lookback`: RFC 3339 timestamps (same precision
/// and offset style), epoch seconds, or epoch milliseconds (13+ digits).
/// Anything else (an opaque token) is returned unchanged.
pub fn shift_cursor(cursor: &str, lookback: Duration) -> String {
    if let Ok(t) = DateTime::parse_from_rfc3339(cursor) {
        let shifted = t - chrono::Duration::from_std(lookback).unwrap_or_default();
        let secs = if cursor.contains('.') {
            SecondsFormat::AutoSi
        } else {
            SecondsFormat::Secs
        };
        return if cursor.ends_with('Z') || cursor.ends_with('z') {
            shifted.with_timezone(&Utc).to_rfc3339_opts(secs, true)
        } else {
            shifted.to_rfc3339_opts(secs, false)
        };
    }
    if let Ok(n) = cursor.parse::<i64>() {
        let back = if cursor.trim_start_matches('-').len() >= 13 {
            lookback.as_millis() as i64
        } else {
            lookback.as_secs() as i64
        };
        return (n - back).to_string();
    }
    cursor.to_string()
}

/// Everything a poll needs besides the connector and the instance.
pub struct FetchEnv<'a> {
    pub client: &'a reqwest::Client,
    /// Host quotas; each request (page) passes its host's gate.
    pub hosts: &'a HostGates,
    /// This instance's connector `rate_limit`.
    pub rate_limit: Option<&'a crate::quota::RateLimit>,
    /// OAuth2 tokens, shared by every instance.
    pub tokens: &'a TokenCache,
    /// The bridge's `user_agent`, for connectors that set none.
    pub user_agent: Option<Arc<str>>,
}

/// The rendered request, before paging changes its URL.
struct Prepared {
    url: reqwest::Url,
    headers: HeaderMap,
    basic: Option<(String, Option<String>)>,
    body: Option<String>,
    oauth: Option<TokenRequest>,
    /// Every credential as rendered (token, password, API key, client
    /// secret, refresh token): masked wherever text is shown.
    credentials: Vec<String>,
}

fn prepare(c: &Connector, ctx: &Ctx) -> Result<Prepared, PollError> {
    let render = |tpl, field: &str| {
        c.engine
            .render(tpl, ctx)
            .map_err(|detail| PollError::Template {
                field: field.to_string(),
                detail,
            })
    };
    let header_value = |v: &str, field: &str| {
        HeaderValue::from_str(v).map_err(|_| PollError::Template {
            field: field.to_string(),
            detail: "rendered to a value that is not a valid header".into(),
        })
    };
    // URL templates encode the values they interpolate (see
    // `Engine::render_url`): a param cannot move the request elsewhere.
    let render_url = |tpl, field: &str| {
        c.engine
            .render_url(tpl, ctx)
            .map_err(|detail| PollError::Template {
                field: field.to_string(),
                detail,
            })
    };
    let url_text = render_url(&c.request.url, "request.url")?;
    let mut url = reqwest::Url::parse(url_text.trim()).map_err(|e| PollError::Template {
        field: "request.url".into(),
        detail: format!("`{url_text}` is not a URL: {e}"),
    })?;
    let mut pairs = Vec::new();
    for (k, t) in &c.request.query {
        let v = render(t, &format!("request.query.{k}"))?;
        if !v.is_empty() {
            pairs.push((k.clone(), v));
        }
    }
    let mut headers = HeaderMap::new();
    for (k, t) in &c.request.headers {
        let field = format!("request.headers.{k}");
        let v = render(t, &field)?;
        if v.is_empty() {
            continue;
        }
        let name = HeaderName::from_bytes(k.as_bytes()).expect("checked at load");
        headers.insert(name, header_value(&v, &field)?);
    }
    let mut basic = None;
    let mut oauth = None;
    let mut credentials = Vec::new();
    match &c.request.auth {
        None => {}
        Some(Auth::Bearer(t)) => {
            let token = render(t, "request.auth.token")?;
            credentials.push(token.clone());
            if !token.is_empty() {
                let mut v = header_value(&format!("Bearer {token}"), "request.auth.token")?;
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
            credentials.extend(pass.clone());
            basic = Some((user, pass));
        }
        Some(Auth::ApiKey {
            location,
            name,
            value,
        }) => {
            let v = render(value, "request.auth.value")?;
            credentials.push(v.clone());
            match location {
                KeyLocation::Header => {
                    let mut hv = header_value(&v, "request.auth.value")?;
                    hv.set_sensitive(true);
                    headers.insert(
                        HeaderName::from_bytes(name.as_bytes()).expect("checked at load"),
                        hv,
                    );
                }
                KeyLocation::Query => pairs.push((name.clone(), v)),
            }
        }
        Some(Auth::OAuth2(o)) => {
            let mut params = Vec::new();
            for (k, t) in &o.params {
                params.push((k.clone(), render(t, &format!("request.auth.params.{k}"))?));
            }
            let o = TokenRequest {
                token_url: render_url(&o.token_url, "request.auth.token_url")?,
                client_id: render(&o.client_id, "request.auth.client_id")?,
                client_secret: render(&o.client_secret, "request.auth.client_secret")?,
                scope: o
                    .scope
                    .as_ref()
                    .map(|s| render(s, "request.auth.scope"))
                    .transpose()?,
                params,
                client_auth: o.client_auth,
                refresh_seed: o
                    .refresh_token
                    .as_ref()
                    .map(|t| render(t, "request.auth.refresh_token"))
                    .transpose()?,
                max_body: c.request.max_response_bytes,
            };
            credentials.push(o.client_secret.clone());
            credentials.extend(o.refresh_seed.clone());
            oauth = Some(o);
        }
    }
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    let (body, content_type) = match &c.request.body {
        None => (None, None),
        Some(Body::Raw(t)) => (Some(render(t, "request.body")?), Some("application/json")),
        Some(Body::Json(t)) => {
            let v = c
                .engine
                .render_value(t, ctx)
                .map_err(|detail| PollError::Template {
                    field: "request.json".into(),
                    detail,
                })?;
            (Some(v.to_string()), Some("application/json"))
        }
        Some(Body::Form(fields)) => {
            let mut pairs = Vec::new();
            for (k, t) in fields {
                pairs.push((k.clone(), render(t, &format!("request.form.{k}"))?));
            }
            (
                Some(form_encode(&pairs)),
                Some("application/x-www-form-urlencoded"),
            )
        }
    };
    if let Some(ct) = content_type {
        if !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
    }
    Ok(Prepared {
        url,
        headers,
        basic,
        body,
        oauth,
        credentials,
    })
}

/// Polls once: the first request, then pages while `paginate` says so.
pub async fn fetch(
    c: &Connector,
    inst: &Instance,
    state: &InstanceState,
    env: &FetchEnv<'_>,
    now: DateTime<Utc>,
) -> Result<Fetched, PollError> {
    let vars = request_context(c, inst, state, now);
    let ctx = Ctx::from_serialize(&vars);
    let p = prepare(c, &ctx)?;
    // What an error body may echo: the secret params, and the basic auth
    // credential as sent (whole, so a short password is masked too).
    let mut secrets = inst.secrets.clone();
    // A credential that is not made of the instance's secret params (a
    // literal in the connector, a param not marked secret) is masked
    // everywhere from now on, whoever shows a text.
    for cred in &p.credentials {
        let from_params = inst
            .secrets
            .iter()
            .any(|s| s.len() >= 3 && cred.contains(s.as_str()));
        if !from_params {
            super::learn(cred);
        }
        secrets.push(cred.clone());
    }
    if let Some((u, pw)) = &p.basic {
        use base64::Engine as _;
        let pair = format!("{u}:{}", pw.as_deref().unwrap_or(""));
        secrets.push(base64::engine::general_purpose::STANDARD.encode(pair));
    }
    let mut url = p.url.clone();
    let first_host = host_of(&url);

    // Page/offset styles number the first request too.
    let mut page_no_param: u64 = 0;
    match c.paginate.as_ref().map(|p| &p.style) {
        Some(PageStyle::Page { param, start, size }) => {
            page_no_param = *start;
            set_query_param(&mut url, param, &start.to_string());
            if let Some((Some(sp), n)) = size {
                set_query_param(&mut url, sp, &n.to_string());
            }
        }
        Some(PageStyle::Offset {
            param,
            limit_param,
            limit,
        }) => {
            set_query_param(&mut url, param, "0");
            if let Some(lp) = limit_param {
                set_query_param(&mut url, lp, &limit.to_string());
            }
        }
        _ => {}
    }

    let mut out = Fetched::default();
    let max_pages = c.paginate.as_ref().map(|p| p.max_pages).unwrap_or(1);
    let mut position = state.cursor.clone();
    let mut offset: u64 = 0;
    let mut visited = std::collections::HashSet::new();
    let mut token: Option<String> = None;
    for page_no in 0..max_pages {
        let first = page_no == 0;
        visited.insert(url.to_string());
        // Only unpaged polls are conditional: a 304 on page 1 says nothing
        // about page 2, where a change may be; unless the connector says
        // page 1 speaks for the listing (`paginate.conditional`).
        let conditional = first
            && c.paginate.as_ref().is_none_or(|p| p.conditional)
            && state.validator_url.as_deref() == Some(url.as_str());
        let shown = url.to_string();
        let mut retried_auth = false;
        let mut throttle_retries = 0;
        // Held until this page's body is read: `max_in_flight` counts
        // requests whose bodies are still arriving.
        let mut _permit = None;
        let resp = loop {
            if let (Some(o), None) = (&p.oauth, &token) {
                token = Some(
                    env.tokens
                        .token(env.client, o, None)
                        .await
                        .map_err(PollError::Auth)?,
                );
            }
            let mut req = env
                .client
                .request(c.request.method.clone(), url.clone())
                .headers(p.headers.clone())
                .timeout(c.request.timeout);
            if !p.headers.contains_key(USER_AGENT) {
                if let Some(ua) = &env.user_agent {
                    req = req.header(USER_AGENT, ua.as_ref());
                }
            }
            if let Some((u, pw)) = &p.basic {
                req = req.basic_auth(u, pw.as_ref());
            }
            if let Some(t) = &token {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| PollError::Auth("the token is not a valid header value".into()))?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            if let Some(b) = &p.body {
                req = req.body(b.clone());
            }
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
                match l.until_ready().await {
                    Ok(()) => {}
                    Err(crate::quota::Deferred::Until(wait)) => {
                        return Err(PollError::Deferred { wait })
                    }
                    Err(crate::quota::Deferred::Store(e)) => {
                        return Err(PollError::Store(format!(
                            "cannot take a request from the connector's rate_limit: {e}"
                        )))
                    }
                }
            }
            let gate = env.hosts.for_url(&url);
            _permit = gate.acquire().await;
            let resp = req.send().await.map_err(|e| PollError::Transport {
                url: shown.clone(),
                detail: crate::transport_detail(&e),
            })?;
            // The host's throttling signals pause it for everyone. A short
            // pause is waited out within this poll (the gate holds the
            // request until then), so a throttled poll still completes and
            // no change waits a whole interval longer than it must.
            let pause = gate.observe(resp.status().as_u16(), resp.headers());
            if matches!(resp.status().as_u16(), 429 | 503)
                && pause.is_some_and(|p| p <= MAX_WAIT_IN_POLL)
                && throttle_retries < MAX_THROTTLE_RETRIES
            {
                throttle_retries += 1;
                continue;
            }
            // A 401 with an OAuth2 token: the token was revoked or expired
            // early. Fetch a new one, once, and try again.
            if resp.status() == 401 && !retried_auth {
                if let Some(o) = &p.oauth {
                    retried_auth = true;
                    token = Some(
                        env.tokens
                            .token(env.client, o, token.as_deref())
                            .await
                            .map_err(PollError::Auth)?,
                    );
                    continue;
                }
            }
            break resp;
        };
        let status = resp.status().as_u16();
        if first && c.poll_hints {
            out.floor = crate::hints::floor(resp.headers(), std::time::SystemTime::now());
        }
        if status == 304 && conditional {
            out.log.push(RequestLog {
                method: c.request.method.to_string(),
                url: shown,
                status,
                bytes: 0,
                items: None,
            });
            out.not_modified = true;
            return Ok(out);
        }
        let headers = resp.headers().clone();
        if first {
            out.etag = headers
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            out.last_modified = headers
                .get(LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            out.first_url = Some(url.to_string());
        }
        if !(200..300).contains(&status) {
            let bytes = read_capped(resp, SNIPPET_READ as u64, &shown)
                .await
                .unwrap_or_default();
            return Err(PollError::Status {
                url: shown,
                status,
                snippet: snippet(&bytes, &secrets),
            });
        }
        let bytes = read_capped(resp, c.request.max_response_bytes, &shown).await?;
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let (page, format) =
            parse_body(&bytes, content_type, c.format).map_err(|detail| PollError::BadBody {
                url: shown.clone(),
                detail: detail.to_string(),
                snippet: snippet(&bytes, &secrets),
            })?;
        out.xml |= format == Format::Xml;
        // Counted as detection lists them (a lone XML entry is one record).
        let count = c
            .items
            .as_ref()
            .map(|items| super::detect::items_of(c, items, &page, format == Format::Xml).len());
        out.log.push(RequestLog {
            method: c.request.method.to_string(),
            url: shown.clone(),
            status,
            bytes: bytes.len(),
            items: count,
        });

        // Next page?
        let Some(pg) = &c.paginate else {
            out.pages.push(page);
            break;
        };
        let mut stop = count == Some(0);
        if let Some(w) = &pg.stop_when {
            let mut sctx = vars.clone();
            sctx.insert("page".into(), page.clone());
            sctx.insert("count".into(), Value::from(count.unwrap_or(0)));
            stop |=
                c.engine
                    .test(w, &Ctx::from_serialize(&sctx))
                    .map_err(|e| PollError::Paging {
                        url: shown.clone(),
                        detail: format!("paginate.stop_when: {e}"),
                    })?;
        }
        let next: Option<reqwest::Url> = if stop {
            None
        } else {
            match &pg.style {
                PageStyle::Cursor { from, param } => {
                    let next = from.query(&page).first().and_then(cursor_text);
                    match next {
                        Some(n) if Some(&n) != position.as_ref() => {
                            let mut u = url.clone();
                            set_query_param(&mut u, param, &n);
                            position = Some(n);
                            Some(u)
                        }
                        _ => None,
                    }
                }
                PageStyle::NextUrl(path) => match path.query(&page).first() {
                    Some(Value::String(s)) if !s.is_empty() => Some(join_next(&url, s, &shown)?),
                    _ => None,
                },
                PageStyle::Link => headers
                    .get_all(LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(link_next)
                    .map(|n| join_next(&url, &n, &shown))
                    .transpose()?,
                PageStyle::Page { param, size, .. } => {
                    let short = matches!((size, count), (Some((_, n)), Some(k)) if (k as u64) < *n);
                    if short {
                        None
                    } else {
                        page_no_param += 1;
                        let mut u = url.clone();
                        set_query_param(&mut u, param, &page_no_param.to_string());
                        Some(u)
                    }
                }
                PageStyle::Offset { param, limit, .. } => {
                    if count.is_some_and(|k| (k as u64) < *limit) {
                        None
                    } else {
                        offset += limit;
                        let mut u = url.clone();
                        set_query_param(&mut u, param, &offset.to_string());
                        Some(u)
                    }
                }
            }
        };
        out.pages.push(page);
        let Some(next) = next else { break };
        // Credentials go with every page: never to a host nobody allowed.
        let host = host_of(&next);
        if host != first_host && !pg.allow_hosts.contains(&host) {
            return Err(PollError::Paging {
                url: shown,
                detail: format!(
                    "the next page is on another host ({host}); pollhook does not follow it (and send credentials there) unless `paginate.allow_hosts` lists it"
                ),
            });
        }
        if visited.contains(next.as_str()) {
            out.warning = Some(format!(
                "paging stopped: the next page ({next}) was already read in this poll"
            ));
            break;
        }
        if page_no + 1 == max_pages {
            out.warning = Some(format!(
                "paging stopped at paginate.max_pages = {max_pages} with more pages to read; the listing is incomplete"
            ));
            break;
        }
        url = next;
    }
    Ok(out)
}

/// The longest host pause a poll waits out before failing with the
/// throttling answer (its instance then backs off like any failing poll).
const MAX_WAIT_IN_POLL: Duration = Duration::from_secs(60);
/// Throttled answers one request may get before its poll fails.
const MAX_THROTTLE_RETRIES: u32 = 5;

/// `host` or `host:port` (lower case), as quotas and `allow_hosts` name them.
fn host_of(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

/// A next-page reference, absolute or relative to the current page.
fn join_next(current: &reqwest::Url, next: &str, shown: &str) -> Result<reqwest::Url, PollError> {
    current.join(next.trim()).map_err(|e| PollError::Paging {
        url: shown.to_string(),
        detail: format!("the next page reference `{next}` is not a URL: {e}"),
    })
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
        detail: crate::transport_detail(&e),
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

/// Bytes of a body read for an error message: more than is shown, so that
/// a secret crossing the shown length is still whole when masked.
const SNIPPET_READ: usize = 512;
/// Characters of a body an error message shows.
const SNIPPET_SHOWN: usize = 80;

/// The start of a body, for error messages, with the instance's secrets
/// masked. Masked *before* it is cut: cutting first would leave the head of
/// a secret that crosses the cut, which no later masking recognises.
fn snippet(bytes: &[u8], secrets: &[String]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let read = &bytes[..bytes.len().min(SNIPPET_READ)];
    let text = String::from_utf8_lossy(read);
    let text = if bytes.len() >= SNIPPET_READ {
        super::mask_cut(&text, secrets)
    } else {
        super::mask(&text, secrets)
    };
    let text: String = text
        .chars()
        .take(SNIPPET_SHOWN)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("; body starts with: {}", text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookback_moves_timestamps_and_epochs_back() {
        let m5 = Duration::from_secs(300);
        assert_eq!(
            shift_cursor("2026-11-29T10:00:00Z", m5),
            "2026-11-29T09:55:00Z"
        );
        assert_eq!(
            shift_cursor("2026-11-29T10:00:00.250Z", m5),
            "2026-11-29T09:55:00.250Z"
        );
        assert_eq!(
            shift_cursor("2026-11-29T10:00:00+01:00", m5),
            "2026-11-29T09:55:00+01:00"
        );
        assert_eq!(shift_cursor("1700000000", m5), "1699999700");
        assert_eq!(shift_cursor("1700000000000", m5), "1699999700000");
        assert_eq!(shift_cursor("cur_abc", m5), "cur_abc");
    }
}
