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
use super::transport::{ReadError, Reply, Transport};
use crate::connector::spec::Instance;
use crate::connector::spec::{Auth, Body, Connector, KeyLocation, PageStyle, Paginate};
use crate::quota::HostGates;
use crate::store::{InstanceState, UrlTag};

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
    Auth(crate::connector::auth::TokenError),
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
    /// A template of `field` failed to render: the poll's error says which
    /// field, with the template's message.
    fn template(field: &str, e: &crate::template::TemplateError) -> PollError {
        PollError::Template {
            field: field.to_string(),
            detail: e.to_string(),
        }
    }

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
    let mut ctx = instance.vars();
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

/// Renders a connector's templates with one context, each error naming
/// its field.
struct Render<'a> {
    c: &'a Connector,
    ctx: &'a Ctx,
}

impl Render<'_> {
    fn text(&self, tpl: &crate::template::Tpl, field: &str) -> Result<String, PollError> {
        self.c
            .engine
            .render(tpl, self.ctx)
            .map_err(|e| PollError::template(field, &e))
    }

    /// URL templates encode the values they interpolate (see
    /// `Engine::render_url`): a param cannot move the request elsewhere.
    fn url(&self, tpl: &crate::template::Tpl, field: &str) -> Result<String, PollError> {
        self.c
            .engine
            .render_url(tpl, self.ctx)
            .map_err(|e| PollError::template(field, &e))
    }
}

fn header_value(v: &str, field: &str) -> Result<HeaderValue, PollError> {
    HeaderValue::from_str(v).map_err(|_| PollError::Template {
        field: field.to_string(),
        detail: "rendered to a value that is not a valid header".into(),
    })
}

fn prepare(c: &Connector, ctx: &Ctx) -> Result<Prepared, PollError> {
    let r = Render { c, ctx };
    let url_text = r.url(&c.request.url, "request.url")?;
    let mut url = reqwest::Url::parse(url_text.trim()).map_err(|e| PollError::Template {
        field: "request.url".into(),
        detail: format!("`{url_text}` is not a URL: {e}"),
    })?;
    let mut pairs = Vec::new();
    for (k, t) in &c.request.query {
        let v = r.text(t, &format!("request.query.{k}"))?;
        if !v.is_empty() {
            pairs.push((k.clone(), v));
        }
    }
    let mut headers = HeaderMap::new();
    for (k, t) in &c.request.headers {
        let field = format!("request.headers.{k}");
        let v = r.text(t, &field)?;
        if v.is_empty() {
            continue;
        }
        let name = HeaderName::from_bytes(k.as_bytes()).expect("checked at load");
        headers.insert(name, header_value(&v, &field)?);
    }
    let auth = render_auth(&r, &mut headers, &mut pairs)?;
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    let (body, content_type) = render_body(&r)?;
    if let Some(ct) = content_type {
        if !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
    }
    Ok(Prepared {
        url,
        headers,
        basic: auth.basic,
        body,
        oauth: auth.oauth,
        credentials: auth.credentials,
    })
}

/// What `request.auth` rendered to, besides the headers and query pairs
/// it added.
#[derive(Default)]
struct RenderedAuth {
    basic: Option<(String, Option<String>)>,
    oauth: Option<TokenRequest>,
    credentials: Vec<String>,
}

/// Renders `request.auth`: a bearer token or an API key header goes into
/// `headers` (marked sensitive), an API key in the query into `pairs`.
fn render_auth(
    r: &Render<'_>,
    headers: &mut HeaderMap,
    pairs: &mut Vec<(String, String)>,
) -> Result<RenderedAuth, PollError> {
    let c = r.c;
    let mut out = RenderedAuth::default();
    match &c.request.auth {
        None => {}
        Some(Auth::Bearer(t)) => {
            let token = r.text(t, "request.auth.token")?;
            out.credentials.push(token.clone());
            if !token.is_empty() {
                let mut v = header_value(&format!("Bearer {token}"), "request.auth.token")?;
                v.set_sensitive(true);
                headers.insert(AUTHORIZATION, v);
            }
        }
        Some(Auth::Basic(u, p)) => {
            let user = r.text(u, "request.auth.username")?;
            let pass = p
                .as_ref()
                .map(|p| r.text(p, "request.auth.password"))
                .transpose()?;
            out.credentials.extend(pass.clone());
            out.basic = Some((user, pass));
        }
        Some(Auth::ApiKey {
            location,
            name,
            value,
        }) => {
            let v = r.text(value, "request.auth.value")?;
            out.credentials.push(v.clone());
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
                params.push((k.clone(), r.text(t, &format!("request.auth.params.{k}"))?));
            }
            let o = TokenRequest {
                token_url: r.url(&o.token_url, "request.auth.token_url")?,
                client_id: r.text(&o.client_id, "request.auth.client_id")?,
                client_secret: r.text(&o.client_secret, "request.auth.client_secret")?,
                scope: o
                    .scope
                    .as_ref()
                    .map(|s| r.text(s, "request.auth.scope"))
                    .transpose()?,
                params,
                client_auth: o.client_auth,
                refresh_seed: o
                    .refresh_token
                    .as_ref()
                    .map(|t| r.text(t, "request.auth.refresh_token"))
                    .transpose()?,
                max_body: c.request.max_response_bytes,
            };
            out.credentials.push(o.client_secret.clone());
            out.credentials.extend(o.refresh_seed.clone());
            out.oauth = Some(o);
        }
    }
    Ok(out)
}

/// The request body and its content type (`body`, `json`, `form`).
fn render_body(r: &Render<'_>) -> Result<(Option<String>, Option<&'static str>), PollError> {
    Ok(match &r.c.request.body {
        None => (None, None),
        Some(Body::Raw(t)) => (Some(r.text(t, "request.body")?), Some("application/json")),
        Some(Body::Json(t)) => {
            let v =
                r.c.engine
                    .render_value(t, r.ctx)
                    .map_err(|e| PollError::template("request.json", &e))?;
            (Some(v.to_string()), Some("application/json"))
        }
        Some(Body::Form(fields)) => {
            let mut pairs = Vec::new();
            for (k, t) in fields {
                pairs.push((k.clone(), r.text(t, &format!("request.form.{k}"))?));
            }
            (
                Some(form_encode(&pairs)),
                Some("application/x-www-form-urlencoded"),
            )
        }
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
    fetch_via(c, inst, state, env, Transport::Live(env.client), now, None).await
}

/// An instance's first request as its last poll made it, kept by its poll
/// task (not while it is parked) and sent again while nothing it was made
/// from changed: the connector's request reads no clock
/// ([`RequestSpec::steady`](crate::connector::spec::RequestSpec::steady)),
/// it has no pages to follow, and the cursor is the one it was made with
/// (the instance's values do not change under a running task: a reload
/// that changes them starts a new one). Rendering the templates, building
/// the variables and parsing the URL were a sixth of an `every 1s`
/// instance's CPU (idle bench, perf), for the same request every second.
#[derive(Default)]
pub struct Memo {
    made: Option<Box<Made>>,
}

/// What [`Memo`] keeps.
struct Made {
    /// The cursor the request was made with.
    cursor: Option<String>,
    prepared: Prepared,
    /// What its errors must not show (see [`secrets_to_mask`]).
    secrets: Vec<String>,
    /// The request's URL as errors show it, and its tag (what a stored
    /// validator is checked against), made once with the request: an
    /// unpaged poll's URL is the request's (see [`fetch_via`]).
    shown: String,
    tag: UrlTag,
}

impl Memo {
    /// The kept request, when it still is the request `state` makes.
    fn get(&self, c: &Connector, state: &InstanceState) -> Option<&Made> {
        let made = self.made.as_deref()?;
        (c.request.steady && c.paginate.is_none() && made.cursor == state.cursor).then_some(made)
    }
}

/// [`fetch`] with its requests (and token requests) sent through
/// `transport` (live, recorded, or answered from a cassette), and for an
/// instance polled again and again, its first request kept between polls
/// in `memo` (see [`Memo`]).
pub async fn fetch_via(
    c: &Connector,
    inst: &Instance,
    state: &InstanceState,
    env: &FetchEnv<'_>,
    transport: Transport<'_>,
    now: DateTime<Utc>,
    memo: Option<&mut Memo>,
) -> Result<Fetched, PollError> {
    // The pages' templates read the same variables as the first request.
    let mut vars = None;
    let fresh;
    let made = match memo {
        Some(memo) => {
            if memo.get(c, state).is_none() {
                memo.made = Some(Box::new(make(c, inst, state, now)?));
            }
            memo.made.as_deref().expect("just made")
        }
        None => {
            fresh = make(c, inst, state, now)?;
            &fresh
        }
    };
    let (p, secrets) = (&made.prepared, &made.secrets);
    let mut url = p.url.clone();
    // Unpaged, the URL stays the request's as made (the pager sets no
    // parameter): its string and tag are the kept ones. Only pages are
    // checked against the first page's host.
    let unpaged = c.paginate.is_none();
    let first_host = if unpaged {
        String::new()
    } else {
        host_of(&url)
    };
    let mut pager = Pager::start(c, state, &mut url);
    let mut out = Fetched::default();
    let max_pages = c.paginate.as_ref().map(|p| p.max_pages).unwrap_or(1);
    let mut visited = std::collections::HashSet::new();
    let mut sender = Sender {
        c,
        p,
        env,
        transport,
        token: None,
    };
    for page_no in 0..max_pages {
        let first = page_no == 0;
        if c.paginate.is_some() {
            visited.insert(url.to_string());
        }
        // Only unpaged polls are conditional: a 304 on page 1 says nothing
        // about page 2, where a change may be.
        let conditional = first
            && c.paginate.as_ref().is_none_or(|p| p.conditional)
            && state.validator_url.is_some_and(|t| {
                t == if unpaged {
                    made.tag
                } else {
                    UrlTag::of(url.as_str())
                }
            });
        let shown: std::borrow::Cow<str> = if unpaged {
            made.shown.as_str().into()
        } else {
            url.to_string().into()
        };
        // The permit is held until this page's body is read:
        // `max_in_flight` counts requests whose bodies are still arriving.
        let (reply, _permit) = sender
            .send(&url, conditional.then_some(state), &shown)
            .await?;
        let at = PageAt {
            first,
            conditional,
            url: &url,
            shown: &shown,
        };
        let Some(page) = read_page(c, reply, &at, secrets, &mut out).await? else {
            return Ok(out);
        };
        let Some(pg) = &c.paginate else {
            out.pages.push(page.value);
            break;
        };
        let vars = vars.get_or_insert_with(|| request_context(c, inst, state, now));
        let next = pager.next(c, pg, vars, &page, &url, &shown)?;
        out.pages.push(page.value);
        let Some(next) = next else { break };
        let go_on = follow(pg, &next, &first_host, &visited, page_no, &shown, &mut out)?;
        if !go_on {
            break;
        }
        url = next;
    }
    Ok(out)
}

/// The first request of a poll, made from the instance's values, its
/// state's cursor and the time.
fn make(
    c: &Connector,
    inst: &Instance,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> Result<Made, PollError> {
    let vars = request_context(c, inst, state, now);
    let prepared = prepare(c, &Ctx::from_serialize(&vars))?;
    let secrets = secrets_to_mask(inst, &prepared);
    Ok(Made {
        cursor: state.cursor.clone(),
        shown: prepared.url.to_string(),
        tag: UrlTag::of(prepared.url.as_str()),
        prepared,
        secrets,
    })
}

/// What an error body may echo: the secret params, every credential as
/// rendered, and the basic auth credential as sent (whole, so a short
/// password is masked too). A credential that is not made of the
/// instance's secret params (a literal in the connector, a param not
/// marked secret) is learned: masked everywhere from now on, whoever
/// shows a text.
fn secrets_to_mask(inst: &Instance, p: &Prepared) -> Vec<String> {
    let mut secrets = inst.secrets.clone();
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
    secrets
}

/// Sends one page's request: token first, politely (rate limit, host
/// gate), waiting out short throttling, and once more with a new OAuth2
/// token after a 401.
struct Sender<'s, 'e> {
    c: &'s Connector,
    p: &'s Prepared,
    env: &'s FetchEnv<'e>,
    transport: Transport<'s>,
    /// The OAuth2 token of this poll, once fetched.
    token: Option<String>,
}

impl Sender<'_, '_> {
    async fn send(
        &mut self,
        url: &reqwest::Url,
        conditional: Option<&InstanceState>,
        shown: &str,
    ) -> Result<(Reply, Option<tokio::sync::OwnedSemaphorePermit>), PollError> {
        let mut retried_auth = false;
        let mut throttle_retries = 0;
        loop {
            if let (Some(o), None) = (&self.p.oauth, &self.token) {
                self.token = Some(
                    self.env
                        .tokens
                        .token(self.transport, o, None)
                        .await
                        .map_err(PollError::Auth)?,
                );
            }
            let req = build_request(
                self.c,
                self.p,
                self.env,
                url,
                self.token.as_deref(),
                conditional,
            )?;
            // Politeness: the connector's own quota, then the host's.
            take_rate_limit(self.env).await?;
            let gate = self.env.hosts.for_url(url);
            let permit = gate.acquire().await;
            let reply = self
                .transport
                .send(req, self.c.request.max_response_bytes)
                .await
                .map_err(|e| PollError::Transport {
                    url: shown.to_string(),
                    detail: e.to_string(),
                })?;
            // The host's throttling signals pause it for everyone. A short
            // pause is waited out within this poll (the gate holds the
            // request until then), so a throttled poll still completes and
            // no change waits a whole interval longer than it must.
            let pause = gate.observe(reply.status().as_u16(), reply.headers());
            if matches!(reply.status().as_u16(), 429 | 503)
                && pause.is_some_and(|p| p <= MAX_WAIT_IN_POLL)
                && throttle_retries < MAX_THROTTLE_RETRIES
            {
                throttle_retries += 1;
                continue;
            }
            // A 401 with an OAuth2 token: the token was revoked or expired
            // early. Fetch a new one, once, and try again.
            if reply.status() == 401 && !retried_auth {
                if let Some(o) = &self.p.oauth {
                    retried_auth = true;
                    self.token = Some(
                        self.env
                            .tokens
                            .token(self.transport, o, self.token.as_deref())
                            .await
                            .map_err(PollError::Auth)?,
                    );
                    continue;
                }
            }
            return Ok((reply, permit));
        }
    }
}

/// The connector's `rate_limit`, if any, for one request.
async fn take_rate_limit(env: &FetchEnv<'_>) -> Result<(), PollError> {
    let Some(l) = env.rate_limit else {
        return Ok(());
    };
    match l.until_ready().await {
        Ok(()) => Ok(()),
        Err(crate::quota::Deferred::Until(wait)) => Err(PollError::Deferred { wait }),
        Err(crate::quota::Deferred::Store(e)) => Err(PollError::Store(format!(
            "cannot take a request from the connector's rate_limit: {e}"
        ))),
    }
}

/// One page's request as it goes on the wire: the rendered headers, the
/// user agent, credentials, body and, when `conditional`, the stored
/// validators.
fn build_request(
    c: &Connector,
    p: &Prepared,
    env: &FetchEnv<'_>,
    url: &reqwest::Url,
    token: Option<&str>,
    conditional: Option<&InstanceState>,
) -> Result<reqwest::Request, PollError> {
    let invalid = |what: &str| PollError::Transport {
        url: url.to_string(),
        detail: format!("{what} is not a valid header value"),
    };
    let mut req = reqwest::Request::new(c.request.method.clone(), url.clone());
    *req.timeout_mut() = Some(c.request.timeout);
    let h = req.headers_mut();
    *h = p.headers.clone();
    if !p.headers.contains_key(USER_AGENT) {
        if let Some(ua) = &env.user_agent {
            let v = HeaderValue::from_str(ua).map_err(|_| invalid("the user agent"))?;
            h.append(USER_AGENT, v);
        }
    }
    if let Some((u, pw)) = &p.basic {
        h.append(AUTHORIZATION, basic_auth(u, pw.as_deref()));
    }
    if let Some(t) = token {
        let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| PollError::Auth(crate::connector::auth::TokenError::NotAHeader))?;
        v.set_sensitive(true);
        h.append(AUTHORIZATION, v);
    }
    if let Some(state) = conditional {
        if let Some(e) = &state.etag {
            let v = HeaderValue::from_str(e).map_err(|_| invalid("the stored ETag"))?;
            h.append(IF_NONE_MATCH, v);
        }
        if let Some(m) = &state.last_modified {
            let v = HeaderValue::from_str(m).map_err(|_| invalid("the stored Last-Modified"))?;
            h.append(IF_MODIFIED_SINCE, v);
        }
    }
    if let Some(b) = &p.body {
        *req.body_mut() = Some(b.clone().into());
    }
    Ok(req)
}

/// `Basic base64(user:password)`, marked sensitive: what reqwest's
/// `basic_auth` sends. Pure.
fn basic_auth(user: &str, password: Option<&str>) -> HeaderValue {
    use base64::Engine as _;
    let pair = format!("{user}:{}", password.unwrap_or(""));
    let text = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    );
    let mut v = HeaderValue::from_str(&text).expect("base64 is a valid header value");
    v.set_sensitive(true);
    v
}

/// Where a page's answer stands in the poll.
struct PageAt<'a> {
    first: bool,
    conditional: bool,
    url: &'a reqwest::Url,
    shown: &'a str,
}

/// One page read and parsed.
struct ParsedPage {
    value: Value,
    headers: HeaderMap,
    /// Its items (when the connector has `items:`).
    count: Option<usize>,
}

/// Reads one page's answer into `out` (log, validators, hints) and parses
/// it; `None` when a conditional request was answered 304.
async fn read_page(
    c: &Connector,
    reply: Reply,
    at: &PageAt<'_>,
    secrets: &[String],
    out: &mut Fetched,
) -> Result<Option<ParsedPage>, PollError> {
    let status = reply.status().as_u16();
    let shown = at.shown;
    if at.first && c.poll_hints {
        out.floor = crate::hints::floor(reply.headers(), std::time::SystemTime::now());
    }
    if status == 304 && at.conditional {
        out.log.push(RequestLog {
            method: c.request.method.to_string(),
            url: shown.to_string(),
            status,
            bytes: 0,
            items: None,
        });
        out.not_modified = true;
        return Ok(None);
    }
    let headers = reply.headers().clone();
    if at.first {
        out.etag = header_text(&headers, ETAG);
        out.last_modified = header_text(&headers, LAST_MODIFIED);
        out.first_url = Some(at.url.to_string());
    }
    if !(200..300).contains(&status) {
        let bytes = reply
            .read_capped(SNIPPET_READ as u64)
            .await
            .unwrap_or_default();
        return Err(PollError::Status {
            url: shown.to_string(),
            status,
            snippet: snippet(&bytes, secrets),
        });
    }
    let limit = c.request.max_response_bytes;
    let bytes = reply.read_capped(limit).await.map_err(|e| match e {
        ReadError::TooLarge => PollError::TooLarge {
            url: shown.to_string(),
            limit,
        },
        ReadError::Network(detail) => PollError::Transport {
            url: shown.to_string(),
            detail,
        },
    })?;
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let (value, format) =
        parse_body(&bytes, content_type, c.format).map_err(|detail| PollError::BadBody {
            url: shown.to_string(),
            detail: detail.to_string(),
            snippet: snippet(&bytes, secrets),
        })?;
    out.xml |= format == Format::Xml;
    // Counted as detection lists them (a lone XML entry is one record).
    let count = c
        .items
        .as_ref()
        .map(|items| super::detect::items_of(c, items, &value, format == Format::Xml).len());
    out.log.push(RequestLog {
        method: c.request.method.to_string(),
        url: shown.to_string(),
        status,
        bytes: bytes.len(),
        items: count,
    });
    Ok(Some(ParsedPage {
        value,
        headers,
        count,
    }))
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Where paging stands: the page number or offset sent last, and the
/// opaque cursor position (which must move for paging to go on).
struct Pager {
    page_param: u64,
    offset: u64,
    position: Option<String>,
}

impl Pager {
    /// Page/offset styles number the first request too.
    fn start(c: &Connector, state: &InstanceState, url: &mut reqwest::Url) -> Pager {
        let mut pager = Pager {
            page_param: 0,
            offset: 0,
            position: state.cursor.clone(),
        };
        match c.paginate.as_ref().map(|p| &p.style) {
            Some(PageStyle::Page { param, start, size }) => {
                pager.page_param = *start;
                set_query_param(url, param, &start.to_string());
                if let Some((Some(sp), n)) = size {
                    set_query_param(url, sp, &n.to_string());
                }
            }
            Some(PageStyle::Offset {
                param,
                limit_param,
                limit,
            }) => {
                set_query_param(url, param, "0");
                if let Some(lp) = limit_param {
                    set_query_param(url, lp, &limit.to_string());
                }
            }
            _ => {}
        }
        pager
    }

    /// The next page's URL, or `None` when paging ends (`stop_when`, an
    /// empty or short page, no next reference).
    fn next(
        &mut self,
        c: &Connector,
        pg: &Paginate,
        vars: &Map<String, Value>,
        page: &ParsedPage,
        url: &reqwest::Url,
        shown: &str,
    ) -> Result<Option<reqwest::Url>, PollError> {
        let count = page.count;
        let mut stop = count == Some(0);
        if let Some(w) = &pg.stop_when {
            let mut sctx = vars.clone();
            sctx.insert("page".into(), page.value.clone());
            sctx.insert("count".into(), Value::from(count.unwrap_or(0)));
            stop |=
                c.engine
                    .test(w, &Ctx::from_serialize(&sctx))
                    .map_err(|e| PollError::Paging {
                        url: shown.to_string(),
                        detail: format!("paginate.stop_when: {e}"),
                    })?;
        }
        if stop {
            return Ok(None);
        }
        Ok(match &pg.style {
            PageStyle::Cursor { from, param } => {
                let next = from.query(&page.value).first().and_then(cursor_text);
                match next {
                    Some(n) if Some(&n) != self.position.as_ref() => {
                        let mut u = url.clone();
                        set_query_param(&mut u, param, &n);
                        self.position = Some(n);
                        Some(u)
                    }
                    _ => None,
                }
            }
            PageStyle::NextUrl(path) => match path.query(&page.value).first() {
                Some(Value::String(s)) if !s.is_empty() => Some(join_next(url, s, shown)?),
                _ => None,
            },
            PageStyle::Link => page
                .headers
                .get_all(LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(link_next)
                .map(|n| join_next(url, &n, shown))
                .transpose()?,
            PageStyle::Page { param, size, .. } => {
                let short = matches!((size, count), (Some((_, n)), Some(k)) if (k as u64) < *n);
                if short {
                    None
                } else {
                    self.page_param += 1;
                    let mut u = url.clone();
                    set_query_param(&mut u, param, &self.page_param.to_string());
                    Some(u)
                }
            }
            PageStyle::Offset { param, limit, .. } => {
                if count.is_some_and(|k| (k as u64) < *limit) {
                    None
                } else {
                    self.offset += limit;
                    let mut u = url.clone();
                    set_query_param(&mut u, param, &self.offset.to_string());
                    Some(u)
                }
            }
        })
    }
}

/// Whether paging goes on to `next`. Credentials go with every page: never
/// to a host nobody allowed (an error). A page already read, or the
/// `max_pages` cap, ends paging with a warning in `out`.
fn follow(
    pg: &Paginate,
    next: &reqwest::Url,
    first_host: &str,
    visited: &std::collections::HashSet<String>,
    page_no: u32,
    shown: &str,
    out: &mut Fetched,
) -> Result<bool, PollError> {
    let host = host_of(next);
    if host != first_host && !pg.allow_hosts.contains(&host) {
        return Err(PollError::Paging {
            url: shown.to_string(),
            detail: format!(
                "the next page is on another host ({host}); pollhook does not follow it (and send credentials there) unless `paginate.allow_hosts` lists it"
            ),
        });
    }
    if visited.contains(next.as_str()) {
        out.warning = Some(format!(
            "paging stopped: the next page ({next}) was already read in this poll"
        ));
        return Ok(false);
    }
    let max_pages = pg.max_pages;
    if page_no + 1 == max_pages {
        out.warning = Some(format!(
            "paging stopped at paginate.max_pages = {max_pages} with more pages to read; the listing is incomplete"
        ));
        return Ok(false);
    }
    Ok(true)
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
