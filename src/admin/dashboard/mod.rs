//! The dashboard: `GET /` on the admin server, one server-rendered page
//! (minijinja templates embedded in the binary, no front-end build, no
//! script) that refreshes itself, and the operator's actions from it
//! (`POST ui/replay`, `ui/drop`, `ui/enable`).
//!
//! **Access.** With `admin.token` set, the page asks for the token once
//! (`POST login`) and keeps a session cookie: `HttpOnly`,
//! `SameSite=Strict`, holding a random session id (never the token) that
//! lasts [`crate::access::SESSION_LIFETIME`], ends with the process, and
//! ends when a reload changes the token. The admin server's bearer check
//! accepts that cookie too (see `admin::authorize`). A wrong token is
//! logged and counted against the client (`access::Failures`).
//!
//! **Cross-site requests.** Every form carries a per-process random
//! `csrf` value that another site cannot read (the same-origin policy), and
//! a POST whose `Origin` is not this server is refused: a page elsewhere
//! cannot make the operator's browser replay or drop anything, token or
//! not (a loopback dashboard without a token needs this most). The pages
//! are served with a content security policy allowing nothing but their
//! own stylesheets (by hash), and may not be framed (`crate::access`).
//!
//! **Scale.** Instances are aggregated per source first, then listed
//! filtered (source, state, name) and paged, 100 a page: 10,000 instances
//! cost one pass over the in-memory status, not 10,000 table rows.

use std::collections::BTreeMap;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use super::{AdminState, StatusReport};
use crate::operate::{self, Op};
use crate::status::InstanceStatus;

/// Instances per page.
const PAGE: usize = 100;
/// Dead letters shown.
const DEAD_SHOWN: usize = 100;
/// The session cookie.
pub const COOKIE: &str = "pollhook_session";

/// The templates and this process's CSRF value.
pub struct Dashboard {
    /// The compiled templates, built at the first page asked for: a
    /// daemon whose dashboard nobody opens (most of them) does not keep
    /// them in memory (see [`templates`]).
    env: std::sync::OnceLock<Environment<'static>>,
    csrf: String,
    /// The admin server's `Content-Security-Policy`: the templates'
    /// stylesheets by hash.
    csp: String,
    /// Seconds between the page's own refreshes.
    refresh: u32,
}

impl Default for Dashboard {
    fn default() -> Self {
        let csrf = hex::encode(rand::random::<[u8; 16]>());
        let csp = crate::access::csp(&[
            stylesheet(include_str!("page.html")),
            stylesheet(include_str!("login.html")),
        ]);
        Dashboard {
            env: std::sync::OnceLock::new(),
            csrf,
            csp,
            refresh: 10,
        }
    }
}

/// The dashboard's two templates, compiled. `.html` names: every value is
/// HTML-escaped.
fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    env.add_template("page.html", include_str!("page.html"))
        .expect("the dashboard template compiles");
    env.add_template("login.html", include_str!("login.html"))
        .expect("the login template compiles");
    env
}

impl Dashboard {
    /// The templates, compiled on first use.
    fn env(&self) -> &Environment<'static> {
        self.env.get_or_init(templates)
    }

    /// The `Content-Security-Policy` of the admin server's answers.
    pub fn csp(&self) -> &str {
        &self.csp
    }
}

/// The text of a template's `<style>` element (static: no template
/// expressions), which the CSP allows by hash.
fn stylesheet(html: &'static str) -> &'static str {
    let start = html.find("<style>").expect("the template has a stylesheet") + "<style>".len();
    let len = html[start..].find("</style>").expect("the stylesheet ends");
    &html[start..start + len]
}

/// The session cookie's value in a request, if any (the first one; a
/// pair that does not parse is skipped).
pub fn session_in(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// The `Set-Cookie` value of a new session: `HttpOnly`, `SameSite=Strict`,
/// the whole server, for the session's lifetime.
fn session_cookie(session: String) -> String {
    cookie::Cookie::build((COOKIE, session))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .max_age(cookie::time::Duration::seconds(
            crate::access::SESSION_LIFETIME.as_secs() as i64,
        ))
        .to_string()
}

/// What a request's credentials say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// No token is configured.
    NotNeeded,
    /// The bearer token, or a live session.
    Good,
    /// Neither a bearer token nor a live session (a session may have
    /// expired or ended: not an attempt at guessing).
    Missing,
    /// A bearer token that is not the admin token: a failed attempt.
    Wrong,
}

/// Whether a request may see the dashboard and the admin routes: no token
/// configured, or the bearer token (compared in constant time), or the
/// cookie of a live session.
pub fn credentials(
    token: Option<&str>,
    sessions: &crate::access::Sessions,
    headers: &HeaderMap,
    now: std::time::Instant,
) -> Credentials {
    let Some(token) = token else {
        return Credentials::NotNeeded;
    };
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let bearer = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        return if crate::deliver::sign::constant_time_eq(bearer.as_bytes(), token.as_bytes()) {
            Credentials::Good
        } else {
            Credentials::Wrong
        };
    }
    match session_in(headers) {
        Some(id) if sessions.valid(&id, now) => Credentials::Good,
        _ => Credentials::Missing,
    }
}

/// A request from a page of another site: its `Origin` (sent by browsers
/// on every POST) is not this server (see [`crate::access::origin_allowed`]).
pub fn cross_site(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    !crate::access::origin_allowed(origin.to_str().unwrap_or("null"), host, allowed)
}

/// The page's query: filters and the page of instances.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub struct PageQuery {
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub page: usize,
    #[serde(default)]
    pub dead_endpoint: String,
    #[serde(default)]
    pub dead_source: String,
    /// A message about the last action.
    #[serde(default)]
    pub flash: String,
}

/// The states an instance is shown in.
pub const STATES: [&str; 4] = ["ok", "failing", "waiting", "elsewhere"];

/// An instance's state for the page. Pure. `elsewhere`: another node of
/// the cluster holds it.
pub fn state_of(i: &crate::status::InstanceStatus, this_node: Option<&str>) -> &'static str {
    if let (Some(me), Some(holder)) = (this_node, i.node.as_deref()) {
        if me != holder {
            return "elsewhere";
        }
    }
    match (i.last_poll_ms, i.consecutive_failures) {
        (None, _) => "waiting",
        (Some(_), 0) => "ok",
        // Its next poll (shown beside) is pushed back by the error
        // back-off as the failures add up.
        _ => "failing",
    }
}

/// `3.2s ago`, `in 4s`, `-`.
fn ago(ms: Option<i64>, now: i64) -> String {
    let Some(t) = ms else { return "-".into() };
    let d = (now - t) as f64 / 1000.0;
    let text = |s: f64| {
        if s < 60.0 {
            format!("{s:.1}s")
        } else if s < 3600.0 {
            format!("{:.0}m", s / 60.0)
        } else {
            format!("{:.1}h", s / 3600.0)
        }
    };
    if d >= 0.0 {
        format!("{} ago", text(d))
    } else {
        format!("in {}", text(-d))
    }
}

/// The activity chart: polls, events and deliveries per minute over the
/// last hour, as an inline SVG (three lines over 60 minutes). Pure.
pub fn chart(buckets: &[crate::status::Minute], now_ms: i64) -> String {
    const W: f64 = 720.0;
    const H: f64 = 120.0;
    let this_minute = now_ms.div_euclid(60_000);
    let mut cols = [[0u64; 3]; 60];
    for b in buckets {
        let back = this_minute - b.minute;
        if (0..60).contains(&back) {
            cols[59 - back as usize] = [b.polls, b.events, b.deliveries];
        }
    }
    let max = cols.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let mut out = format!(
        r#"<svg id="activity-chart" width="{W}" height="{}" viewBox="0 0 {W} {}" role="img" aria-label="polls, events and deliveries per minute">"#,
        H + 30.0,
        H + 30.0
    );
    out.push_str(&format!(
        r##"<line x1="0" y1="{H}" x2="{W}" y2="{H}" stroke="#d0d7de"/>"##
    ));
    for (k, (name, colour)) in [
        ("polls", "#0969da"),
        ("events", "#1a7f37"),
        ("deliveries", "#8250df"),
    ]
    .iter()
    .enumerate()
    {
        let points: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let x = i as f64 * W / 59.0;
                let y = H - (c[k] as f64 / max) * (H - 10.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let total: u64 = cols.iter().map(|c| c[k]).sum();
        out.push_str(&format!(
            r#"<polyline class="series-{name}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        ));
        out.push_str(&format!(
            r#"<text x="{}" y="{}" class="legend-{name}">{name}: {total} in the hour</text>"#,
            k as f64 * 200.0,
            H + 22.0
        ));
    }
    out.push_str(&format!(
        r#"<text x="{}" y="10">peak {max:.0}/min</text></svg>"#,
        W - 90.0
    ));
    out
}

#[derive(Serialize)]
struct SourceRow {
    name: String,
    /// The query that filters the instances by this source.
    link: String,
    connector: String,
    instances: usize,
    ok: usize,
    failing: usize,
    waiting: usize,
    events: u64,
    last_poll: String,
    #[serde(skip)]
    last_poll_ms: Option<i64>,
}

/// Why the page could not be built; the browser sees the message (the
/// template's detail goes to the log).
#[derive(Debug, thiserror::Error)]
enum DashboardError {
    /// The dead letters could not be read.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// The page template failed.
    #[error("cannot render the dashboard: {0}")]
    Render(minijinja::Error),
}

impl Dashboard {
    fn login(&self, error: Option<&str>) -> Response {
        let html = self
            .env()
            .get_template("login.html")
            .and_then(|t| t.render(context! { csrf => &self.csrf, error => error }));
        match html {
            Ok(h) => Html(h).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }

    /// The page, rendered from the daemon's status and store: each part
    /// of the page gathered by a step of its own, then one render.
    async fn render(&self, s: &AdminState, f: &PageQuery) -> Result<String, DashboardError> {
        let now = crate::now_ms();
        let report = super::full_report(s).await;
        let me = s.node.as_deref();
        let (sources, matching) = sources_and_matching(&report, f, me, now);
        let (instances, shown) = instance_page(&matching, f, now);
        let endpoints = endpoint_rows(s, &report, now).await;
        let (dead, dead_total) = dead_rows(s, f, now).await?;
        let activity = s.status.activity();
        self.env()
            .get_template("page.html")
            .and_then(|t| {
                t.render(context! {
                    node => me,
                    now => chrono::DateTime::from_timestamp_millis(now).map(|t| t.format("%H:%M:%S UTC").to_string()),
                    refresh => self.refresh,
                    flash => (!f.flash.is_empty()).then_some(&f.flash),
                    store_error => report.store.error,
                    reload_error => report.config.last_reload_error,
                    instance_total => report.instances.len(),
                    sources => sources.into_values().collect::<Vec<_>>(),
                    states => STATES,
                    filter => f,
                    instances => instances,
                    shown => shown,
                    endpoints => endpoints,
                    hosts => host_rows(&report),
                    dead => dead,
                    dead_total => dead_total,
                    cluster => cluster_rows(&report, now),
                    csrf => &self.csrf,
                    chart => minijinja::Value::from_safe_string(chart(&activity, now)),
                })
            })
            .map_err(|e| {
                // The detail (with the template's variables) goes to the
                // log, not to the browser.
                tracing::error!(error = %format!("{e:#}"), "cannot render the dashboard");
                DashboardError::Render(e)
            })
    }
}

/// An instance the filter keeps: its key, status and state.
type Matching<'a> = (&'a String, &'a InstanceStatus, &'static str);

/// The sources table and the instances the filter keeps, in one pass over
/// every instance (10,000 of them must not be walked twice per page).
fn sources_and_matching<'a>(
    report: &'a StatusReport,
    f: &PageQuery,
    me: Option<&str>,
    now: i64,
) -> (BTreeMap<String, SourceRow>, Vec<Matching<'a>>) {
    let mut sources: BTreeMap<String, SourceRow> = BTreeMap::new();
    let mut matching = Vec::new();
    for (key, i) in &report.instances {
        let state = state_of(i, me);
        let row = sources
            .entry(i.source.to_string())
            .or_insert_with(|| SourceRow {
                link: serde_urlencoded::to_string([("source", &i.source)]).unwrap_or_default(),
                name: i.source.to_string(),
                connector: i.connector.to_string(),
                instances: 0,
                ok: 0,
                failing: 0,
                waiting: 0,
                events: 0,
                last_poll: String::new(),
                last_poll_ms: None,
            });
        row.instances += 1;
        match state {
            "ok" => row.ok += 1,
            "failing" => row.failing += 1,
            "waiting" => row.waiting += 1,
            _ => {}
        }
        row.events += i.events;
        row.last_poll_ms = row.last_poll_ms.max(i.last_poll_ms);
        let keep = (f.source.is_empty() || *f.source == *i.source)
            && (f.state.is_empty() || f.state == state)
            && (f.q.is_empty() || key.contains(&f.q));
        if keep {
            matching.push((key, i, state));
        }
    }
    for row in sources.values_mut() {
        row.last_poll = ago(row.last_poll_ms, now);
    }
    (sources, matching)
}

/// The page of matching instances the filter asks for (a page past the
/// end shows the last one), and what the pager says: the range shown and
/// the links to the previous and next pages, the filter kept.
fn instance_page(
    matching: &[Matching<'_>],
    f: &PageQuery,
    now: i64,
) -> (Vec<minijinja::Value>, minijinja::Value) {
    let pages = matching.len().div_ceil(PAGE).max(1);
    let page = f.page.min(pages - 1);
    let from = page * PAGE;
    let instances: Vec<_> = matching
        .iter()
        .skip(from)
        .take(PAGE)
        .map(|(key, i, state)| {
            context! {
                key => key,
                state => state,
                node => i.node,
                last_poll => ago(i.last_poll_ms, now),
                next_poll => ago(i.next_poll_ms, now),
                interval => i.effective_interval_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or("-".into()),
                ok => i.polls_ok,
                not_modified => i.polls_not_modified,
                failed => i.polls_failed,
                events => i.events,
                cursor => i.cursor,
                error => i.last_error.clone().or(i.last_warning.clone()),
            }
        })
        .collect();
    let link = |p: usize| {
        let q = PageQuery {
            page: p,
            flash: String::new(),
            ..f.clone()
        };
        serde_urlencoded::to_string(&q).unwrap_or_default()
    };
    let shown = context! {
        from => if matching.is_empty() { 0 } else { from + 1 },
        to => (from + PAGE).min(matching.len()),
        matching => matching.len(),
        prev => (page > 0).then(|| link(page - 1)),
        next => (page + 1 < pages).then(|| link(page + 1)),
    };
    (instances, shown)
}

/// The endpoints table, each with its last five attempts from the store
/// (an unreadable store shows none rather than no page).
async fn endpoint_rows(s: &AdminState, report: &StatusReport, now: i64) -> Vec<minijinja::Value> {
    let mut endpoints = Vec::new();
    for (name, e) in &report.endpoints {
        let attempts = s
            .store
            .attempts(&crate::store::AttemptQuery {
                endpoint: Some(name.clone()),
                limit: Some(5),
                ..Default::default()
            })
            .await
            .unwrap_or_default();
        let state = if e.disabled.is_some() {
            "disabled"
        } else if e.circuit_open {
            "open"
        } else {
            "ok"
        };
        endpoints.push(context! {
            name => name,
            state => state,
            disabled => e.disabled,
            queue => e.queue_depth,
            oldest => ago(e.oldest_pending_ms, now),
            dead => e.dead_letters,
            delivered => e.delivered,
            failed => e.failed_attempts,
            last_error => e.last_error,
            attempts => attempts.iter().map(|a| context! {
                at => ago(Some(a.at_ms), now),
                status => a.status.map_or("-".to_string(), |c| c.to_string()),
                latency_ms => a.latency_ms,
                outcome => a.outcome,
            }).collect::<Vec<_>>(),
        });
    }
    endpoints
}

/// The upstream hosts table.
fn host_rows(report: &StatusReport) -> Vec<minijinja::Value> {
    report
        .hosts
        .iter()
        .map(|(name, h)| {
            context! {
                name => name,
                requests => h.requests,
                throttled => h.throttled,
                too_many => h.too_many_requests,
                pauses => h.pauses,
                paused => h.paused_for_ms.map(|ms| format!("{:.1}s more", ms as f64 / 1000.0)),
                pace => h.spacing_ms.map(|ms| format!("one per {ms} ms")),
            }
        })
        .collect()
}

/// The dead letters the filter keeps (at most [`DEAD_SHOWN`]) and how
/// many there are in all. Unlike the attempts, a store that cannot list
/// them fails the page: the operator acts on this list.
async fn dead_rows(
    s: &AdminState,
    f: &PageQuery,
    now: i64,
) -> Result<(Vec<minijinja::Value>, usize), DashboardError> {
    let all_dead = s.store.dead_letters(None).await?;
    let dead = all_dead
        .iter()
        .filter(|(_, d)| {
            (f.dead_endpoint.is_empty() || f.dead_endpoint == d.endpoint)
                && (f.dead_source.is_empty()
                    || d.entry.instance.split('/').next() == Some(f.dead_source.as_str()))
        })
        .take(DEAD_SHOWN)
        .map(|(_, d)| {
            context! {
                id => d.entry.event_id,
                kind => d.entry.kind,
                instance => d.entry.instance,
                endpoint => d.endpoint,
                attempts => d.entry.attempts,
                dead_at => ago(Some(d.dead_at_ms), now),
                error => d.entry.last_error,
            }
        })
        .collect();
    Ok((dead, all_dead.len()))
}

/// The cluster's nodes, when the report has a cluster section.
fn cluster_rows(report: &StatusReport, now: i64) -> Option<minijinja::Value> {
    report.cluster.as_ref().map(|c| {
        context! {
            nodes => c.nodes.iter().map(|n| context! {
                node => n.node,
                leases => n.leases,
                heartbeat => ago(Some(now - n.heartbeat_age_ms), now),
                started => ago(Some(n.started_ms), now),
            }).collect::<Vec<_>>(),
        }
    })
}

fn token_of(s: &AdminState) -> Option<String> {
    s.live.admin_token.read().clone()
}

/// `GET /`: the page, or the sign-in form when a token is needed.
pub async fn page(
    State(s): State<AdminState>,
    Query(f): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let token = token_of(&s);
    let now = std::time::Instant::now();
    if !matches!(
        credentials(token.as_deref(), &s.live.sessions, &headers, now),
        Credentials::NotNeeded | Credentials::Good
    ) {
        return s.dashboard.login(None);
    }
    match s.dashboard.render(&s, &f).await {
        Ok(h) => Html(h).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
pub struct Login {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /login`: the token once, a session cookie in return. A wrong
/// token is logged and counted against the client, which waits once it
/// failed too often (see `crate::access::Failures`).
pub async fn login(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(l): Form<Login>,
) -> Response {
    if cross_site(&headers, &s.live.admin_hosts()) || l.csrf != s.dashboard.csrf {
        return (StatusCode::FORBIDDEN, "cross-site request refused\n").into_response();
    }
    let Some(token) = token_of(&s) else {
        return Redirect::to("./").into_response();
    };
    let now = std::time::Instant::now();
    if let Some(wait) = s.live.failures.blocked(crate::access::client_of(peer), now) {
        let secs = wait.as_secs().max(1);
        let mut r = s.dashboard.login(Some(&format!(
            "Too many failed attempts from this address: try again in {secs} s."
        )));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if !crate::deliver::sign::constant_time_eq(l.token.as_bytes(), token.as_bytes()) {
        super::failed_attempt(&s, peer, "/login", now);
        let mut r = s.dashboard.login(Some("That is not the admin token."));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    let session = s.live.sessions.open(now);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, session_cookie(session)),
            (header::LOCATION, "./".to_string()),
        ],
    )
        .into_response()
}

/// A form action: the CSRF value, and which dead letter or endpoint.
#[derive(Deserialize)]
pub struct Action {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
}

/// Runs an action's operation (the same `operate` operations the CLI uses) and goes back
/// to the page with what happened.
async fn act<O: Op>(
    s: &AdminState,
    headers: &HeaderMap,
    a: &Action,
    op: O,
    said: impl FnOnce(O::Reply) -> String,
    anchor: &str,
) -> Response {
    if cross_site(headers, &s.live.admin_hosts()) || a.csrf != s.dashboard.csrf {
        return (StatusCode::FORBIDDEN, "cross-site request refused\n").into_response();
    }
    let daemon = super::LiveWorkers(&s.live);
    let flash = match op.run(&s.store, Some(&daemon)).await {
        Ok(r) => said(r),
        Err(e) => format!("failed: {e:#}"),
    };
    let q = serde_urlencoded::to_string([("flash", flash)]).unwrap_or_default();
    // Relative, so the page also works behind a proxy under a path.
    Redirect::to(&format!("../?{q}#{anchor}")).into_response()
}

fn letter_filter(a: &Action) -> operate::Filter {
    operate::Filter {
        id: a.id.clone().filter(|i| !i.is_empty()),
        endpoint: a.endpoint.clone().filter(|e| !e.is_empty()),
        ..Default::default()
    }
}

/// `POST /ui/replay`: one dead letter back in its outbox, same id.
pub async fn replay(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Form(a): Form<Action>,
) -> Response {
    let op = operate::DlqReplay(letter_filter(&a));
    act(
        &s,
        &headers,
        &a,
        op,
        |r| format!("replayed {}", r.replayed),
        "dead",
    )
    .await
}

/// `POST /ui/drop`: one dead letter deleted.
pub async fn drop_letter(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Form(a): Form<Action>,
) -> Response {
    let op = operate::DlqDrop(letter_filter(&a));
    act(
        &s,
        &headers,
        &a,
        op,
        |r| format!("dropped {}", r.dropped),
        "dead",
    )
    .await
}

/// `POST /ui/enable`: an endpoint sends again.
pub async fn enable(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Form(a): Form<Action>,
) -> Response {
    let op = operate::Enable {
        endpoint: a.endpoint.clone().unwrap_or_default(),
    };
    act(
        &s,
        &headers,
        &a,
        op,
        |r| format!("endpoint {} enabled", r.enabled),
        "endpoints",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    /// The templates are compiled at the first page, no longer at start:
    /// a template that does not compile must still fail a test.
    #[test]
    fn the_templates_compile_and_are_not_built_before_use() {
        let d = Dashboard::default();
        assert!(d.env.get().is_none());
        let env = d.env();
        assert!(env.get_template("page.html").is_ok());
        assert!(env.get_template("login.html").is_ok());
        assert!(d.env.get().is_some());
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_the_token_or_a_live_session_opens_the_page() {
        use Credentials::*;
        let sessions = crate::access::Sessions::default();
        let now = std::time::Instant::now();
        let c = |token: Option<&str>, h: &HeaderMap| credentials(token, &sessions, h, now);
        assert_eq!(c(None, &HeaderMap::new()), NotNeeded);
        assert_eq!(c(Some("tok"), &HeaderMap::new()), Missing);
        let bearer = |t: &str| headers(&[("authorization", &format!("Bearer {t}"))]);
        assert_eq!(c(Some("tok"), &bearer("tok")), Good);
        assert_eq!(c(Some("tok"), &bearer("nope")), Wrong);
        let id = sessions.open(now);
        let cookie = format!("a=b; {COOKIE}={id}");
        assert_eq!(c(Some("tok"), &headers(&[("cookie", &cookie)])), Good);
        // The token itself as a cookie, or an unknown session: no, and
        // not counted as a failed attempt.
        let token_cookie = format!("{COOKIE}=tok");
        assert_eq!(
            c(Some("tok"), &headers(&[("cookie", &token_cookie)])),
            Missing
        );
        sessions.end_all();
        assert_eq!(c(Some("tok"), &headers(&[("cookie", &cookie)])), Missing);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = |vs: &[&str]| {
            let pairs: Vec<(&'static str, &str)> = vs.iter().map(|v| ("cookie", *v)).collect();
            session_in(&headers(&pairs))
        };
        assert_eq!(h(&[]), None);
        assert_eq!(h(&["a=b; c=d"]), None);
        assert_eq!(h(&[&format!("{COOKIE}=abc")]), Some("abc".into()));
        assert_eq!(h(&[&format!("a=b;{COOKIE}=abc; c=d")]), Some("abc".into()));
        // In a second `Cookie` header, after a pair that does not parse.
        assert_eq!(
            h(&["a=b", &format!("junk; {COOKIE}=abc")]),
            Some("abc".into())
        );
        // The first one wins; a name that only starts alike is another.
        assert_eq!(
            h(&[&format!("{COOKIE}x=no; {COOKIE}=one; {COOKIE}=two")]),
            Some("one".into())
        );
    }

    #[test]
    fn the_session_cookie_is_set_as_before() {
        assert_eq!(
            session_cookie("abc".into()),
            format!(
                "{COOKIE}=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                crate::access::SESSION_LIFETIME.as_secs()
            )
        );
    }

    #[test]
    fn posts_from_another_origin_are_cross_site() {
        let h = |o: &str| headers(&[("host", "127.0.0.1:9464"), ("origin", o)]);
        let none: &[String] = &[];
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:9464")]), none));
        assert!(!cross_site(&h("http://127.0.0.1:9464"), none));
        assert!(cross_site(&h("http://evil.example"), none));
        assert!(cross_site(&h("http://127.0.0.1:9465"), none));
        assert!(cross_site(&h("null"), none));
        assert!(!cross_site(
            &h("https://ops.example"),
            &["ops.example".to_string()]
        ));
    }

    #[test]
    fn the_stylesheets_are_the_templates_own() {
        let page = stylesheet(include_str!("page.html"));
        assert!(
            page.contains(".legend-polls") && !page.contains("<style"),
            "{page}"
        );
        assert!(
            !page.contains("{{") && !page.contains("{%"),
            "static: hashed once"
        );
        assert!(Dashboard::default().csp().matches("'sha256-").count() == 2);
    }

    #[test]
    fn instance_states() {
        use crate::status::InstanceStatus;
        let mut i = InstanceStatus::default();
        assert_eq!(state_of(&i, None), "waiting");
        i.last_poll_ms = Some(1);
        assert_eq!(state_of(&i, None), "ok");
        i.consecutive_failures = 1;
        assert_eq!(state_of(&i, None), "failing");
        i.consecutive_failures = 7;
        assert_eq!(state_of(&i, None), "failing");
        i.node = Some("b".into());
        assert_eq!(state_of(&i, Some("a")), "elsewhere");
        assert_eq!(state_of(&i, Some("b")), "failing");
    }

    #[test]
    fn the_chart_draws_the_last_hour_and_says_the_totals() {
        use crate::status::Minute;
        let now = 100 * 60_000 + 5_000;
        let svg = chart(
            &[
                Minute {
                    minute: 100,
                    polls: 10,
                    events: 2,
                    deliveries: 2,
                },
                Minute {
                    minute: 99,
                    polls: 5,
                    events: 0,
                    deliveries: 1,
                },
                // Older than an hour: left out.
                Minute {
                    minute: 30,
                    polls: 1000,
                    events: 0,
                    deliveries: 0,
                },
            ],
            now,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("polls: 15 in the hour"), "{svg}");
        assert!(svg.contains("events: 2 in the hour"), "{svg}");
        assert!(svg.contains("deliveries: 3 in the hour"), "{svg}");
        assert!(svg.contains("peak 10/min"), "{svg}");
    }

    #[test]
    fn times_read_as_ago_and_in() {
        assert_eq!(ago(None, 0), "-");
        assert_eq!(ago(Some(0), 1_500), "1.5s ago");
        assert_eq!(ago(Some(4_000), 0), "in 4.0s");
        assert_eq!(ago(Some(0), 120_000), "2m ago");
        assert_eq!(ago(Some(0), 7_200_000), "2.0h ago");
    }
}
