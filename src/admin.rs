//! Admin HTTP: `/healthz`, `/readyz`, `/status` (JSON), `/metrics`
//! (Prometheus text), and the operator's repair tools: every
//! [`crate::ops`] operation at its `POST` route (what `pollhook dlq`,
//! `events` and `endpoint enable` call while the daemon runs) and
//! `GET /state/export`. Loopback by default;
//! shows no secrets (status holds masked errors only; bodies are not shown).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::ops::{self, Op};
use crate::status::{EndpointStatus, Histogram, InstanceStatus, Metrics, Status, BUCKETS};
use crate::store::Store;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<Status>,
    pub store: Store,
    /// Upstream host gates (quotas and throttling), for `/status` and metrics.
    pub hosts: Arc<crate::quota::HostGates>,
    /// Endpoints, their wake-ups (poked after a replay) and the bearer
    /// token (all routes but `/healthz`), as the last reload left them.
    pub live: Arc<crate::daemon::Live>,
}

/// The route of an operation.
fn route<O: Op>() -> &'static str {
    // Leaked once per route at start: axum wants `&str` paths with the
    // leading slash, operations name theirs without it.
    Box::leak(format!("/{}", O::PATH).into_boxed_str())
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        // JSON bodies carry the filters (lists of sources, times), so even
        // the read-only queries are POSTs.
        .route(route::<ops::DlqList>(), post(operation::<ops::DlqList>))
        .route(route::<ops::DlqReplay>(), post(operation::<ops::DlqReplay>))
        .route(route::<ops::DlqDrop>(), post(operation::<ops::DlqDrop>))
        .route(route::<ops::Events>(), post(operation::<ops::Events>))
        .route(route::<ops::Enable>(), post(operation::<ops::Enable>))
        .route("/state/export", get(export))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

/// The bearer token check; constant-time so a token cannot be guessed by
/// timing. Liveness (`/healthz`) stays open for supervisors.
async fn authorize(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = s.live.admin_token.read().expect("token lock").clone();
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::deliver::sign::constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "admin token required\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// The daemon as operator operations see it: its endpoints and their
/// workers' wake-ups.
struct Daemon<'a>(&'a crate::daemon::Live);

impl ops::Running for Daemon<'_> {
    fn has_endpoint(&self, name: &str) -> bool {
        self.0.wake(name).is_some()
    }
    fn replayed(&self, endpoint: &str) {
        if let Some(w) = self.0.wake(endpoint) {
            w.rescan();
        }
    }
    fn enabled(&self, endpoint: &str) {
        if let Some(w) = self.0.wake(endpoint) {
            w.enable();
        }
    }
}

fn error_response(status: u16, e: impl std::fmt::Display) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

/// Every operator operation: decoded, run on the live store, answered.
async fn operation<O: Op + 'static>(State(s): State<AdminState>, Json(op): Json<O>) -> Response {
    match op.run(&s.store, Some(&Daemon(&s.live))).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => error_response(e.status(), format!("{e:#}")),
    }
}

/// `pollhook state export` while the daemon runs.
async fn export(State(s): State<AdminState>) -> Response {
    let mut out = Vec::new();
    match crate::store::backup::export(&s.store, &mut out).await {
        Ok(_) => ([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response(),
        Err(e) => error_response(500, format!("{e:#}")),
    }
}

/// Ready when the configuration is loaded and every task started, the
/// store answers, and every endpoint's delivery worker is running. The
/// body says which check failed.
async fn readyz(State(s): State<AdminState>) -> Response {
    let mut problems = Vec::new();
    if !s.status.ready() {
        problems.push("starting or shutting down".to_string());
    }
    if let Err(e) = s.store.ping().await {
        problems.push(format!("store: {e}"));
    }
    let (alive, endpoints) = (s.status.workers_alive(), s.live.endpoints().len());
    if alive < endpoints {
        problems.push(format!("delivery workers: {alive} of {endpoints} running"));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

/// `/status` body.
#[derive(Serialize)]
pub struct StatusReport {
    pub instances: BTreeMap<String, InstanceStatus>,
    pub endpoints: BTreeMap<String, EndpointReport>,
    /// `for_each: discover` sources.
    pub discovery: BTreeMap<String, crate::status::DiscoveryStatus>,
    /// Upstream hosts: requests, throttling answers, pauses.
    pub hosts: BTreeMap<String, crate::quota::HostReport>,
    /// Configuration reloads.
    pub config: crate::status::ConfigStatus,
}

/// An endpoint in `/status`: what its worker keeps (queue depth and dead
/// letters included, so that no request scans the store).
pub type EndpointReport = EndpointStatus;

fn report(s: &AdminState) -> StatusReport {
    let eps = s.status.endpoints();
    StatusReport {
        instances: s.status.instances(),
        discovery: s.status.discoveries(),
        hosts: s.hosts.report(),
        config: s.status.config(),
        endpoints: s
            .live
            .endpoints()
            .into_iter()
            .map(|name| {
                let report = eps.get(&name).cloned().unwrap_or_default();
                (name, report)
            })
            .collect(),
    }
}

async fn status(State(s): State<AdminState>) -> Json<StatusReport> {
    Json(report(&s))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let text = exposition(&report(&s), &s.status.metrics(), crate::now_ms());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Writes one metric family of the Prometheus text format.
struct Families(String);

impl Families {
    fn family(&mut self, name: &str, kind: &str, help: &str, rows: Vec<(String, String)>) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {v}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
            }
        }
    }

    fn histogram(&mut self, name: &str, help: &str, rows: Vec<(String, &Histogram)>) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, h) in rows {
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(self.0, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(self.0, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(self.0, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(self.0, "{name}_count{{{labels}}} {}", h.count);
        }
    }
}

/// `/metrics`. Instances are aggregated by source (their detail is on
/// `/status`), so the exposition stays small with thousands of instances.
fn exposition(r: &StatusReport, m: &Metrics, now_ms: i64) -> String {
    let mut out = Families(String::new());
    // Per source: (connector, polls ok, not modified, failed, evicted,
    // failing instances, longest effective interval, oldest last success).
    #[derive(Default)]
    struct Src {
        connector: String,
        ok: u64,
        not_modified: u64,
        failed: u64,
        evicted: u64,
        failing: u64,
        interval_ms: Option<u64>,
        oldest_ok_ms: Option<i64>,
        instances: u64,
    }
    let mut sources: BTreeMap<&str, Src> = BTreeMap::new();
    for i in r.instances.values() {
        let e = sources.entry(&i.source).or_default();
        e.connector.clone_from(&i.connector);
        e.instances += 1;
        e.ok += i.polls_ok - i.polls_not_modified;
        e.not_modified += i.polls_not_modified;
        e.failed += i.polls_failed;
        e.evicted += i.seen_evicted;
        e.failing += u64::from(i.consecutive_failures > 0);
        if let Some(ms) = i.effective_interval_ms {
            e.interval_ms = Some(e.interval_ms.map_or(ms, |x| x.max(ms)));
        }
        if let Some(t) = i.last_ok_ms {
            e.oldest_ok_ms = Some(e.oldest_ok_ms.map_or(t, |x| x.min(t)));
        }
    }
    let src =
        |n: &str, x: &Src| format!("source=\"{}\",connector=\"{}\"", esc(n), esc(&x.connector));
    let per_source = |f: &dyn Fn(&Src) -> Option<String>| {
        sources
            .iter()
            .filter_map(|(n, x)| f(x).map(|v| (src(n, x), v)))
            .collect::<Vec<_>>()
    };
    let mut polls = Vec::new();
    for (n, x) in &sources {
        for (outcome, v) in [
            ("ok", x.ok),
            ("not_modified", x.not_modified),
            ("error", x.failed),
        ] {
            polls.push((
                format!("{},outcome=\"{outcome}\"", src(n, x)),
                v.to_string(),
            ));
        }
    }
    out.family(
        "pollhook_polls_total",
        "counter",
        "Polls by outcome (not_modified: a 304 to a conditional request).",
        polls,
    );
    out.histogram(
        "pollhook_poll_duration_seconds",
        "Time a poll took, from the first request to the commit (pages, throttling waits included).",
        m.poll_duration
            .iter()
            .map(|((src, conn), h)| {
                (
                    format!("source=\"{}\",connector=\"{}\"", esc(src), esc(conn)),
                    h,
                )
            })
            .collect(),
    );
    out.family(
        "pollhook_events_total",
        "counter",
        "Events detected and queued for delivery, by type.",
        m.events
            .iter()
            .map(|((src, kind), n)| {
                (
                    format!("source=\"{}\",type=\"{}\"", esc(src), esc(kind)),
                    n.to_string(),
                )
            })
            .collect(),
    );
    out.family(
        "pollhook_cursor_age_seconds",
        "gauge",
        "Seconds since the least recently successful instance of a source last polled successfully: how stale the oldest view of the upstream is.",
        per_source(&|x| {
            x.oldest_ok_ms
                .map(|t| format!("{:.3}", (now_ms - t).max(0) as f64 / 1000.0))
        }),
    );
    out.family(
        "pollhook_poll_interval_seconds",
        "gauge",
        "Longest time between the starts of an instance's last two polls (stretches when a host quota is scarce).",
        per_source(&|x| x.interval_ms.map(|ms| format!("{:.3}", ms as f64 / 1000.0))),
    );
    out.family(
        "pollhook_instances_failing",
        "gauge",
        "Instances whose last poll failed (they back off meanwhile).",
        per_source(&|x| Some(x.failing.to_string())),
    );
    out.family(
        "pollhook_seen_evicted_total",
        "counter",
        "Item ids forgotten because of seen_limit / seen_ttl (detect: new).",
        per_source(&|x| Some(x.evicted.to_string())),
    );
    out.family(
        "pollhook_instances",
        "gauge",
        "Instances polled.",
        per_source(&|x| Some(x.instances.to_string())),
    );

    let ep = |n: &String| format!("endpoint=\"{}\"", esc(n));
    out.family(
        "pollhook_deliveries_total",
        "counter",
        "Delivery attempts by outcome (dead_lettered: attempts ran out).",
        r.endpoints
            .iter()
            .flat_map(|(n, e)| {
                [
                    ("delivered", e.delivered),
                    ("failed", e.failed_attempts),
                    ("dead_lettered", e.dead_lettered),
                ]
                .map(|(o, v)| (format!("{},outcome=\"{o}\"", ep(n)), v.to_string()))
            })
            .collect(),
    );
    out.histogram(
        "pollhook_delivery_attempt_duration_seconds",
        "Round trip of a delivery attempt to the endpoint.",
        m.attempt_duration.iter().map(|(n, h)| (ep(n), h)).collect(),
    );
    out.histogram(
        "pollhook_delivery_latency_seconds",
        "From detection to successful delivery (retries and outages included).",
        m.delivery_lag.iter().map(|(n, h)| (ep(n), h)).collect(),
    );
    out.family(
        "pollhook_outbox_depth",
        "gauge",
        "Events waiting for delivery.",
        r.endpoints
            .iter()
            .map(|(n, e)| (ep(n), e.queue_depth.to_string()))
            .collect(),
    );
    out.family(
        "pollhook_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest event waiting for delivery (0 when none waits).",
        r.endpoints
            .iter()
            .map(|(n, e)| {
                let age = match e.oldest_pending_ms {
                    Some(t) if e.queue_depth > 0 => (now_ms - t).max(0) as f64 / 1000.0,
                    _ => 0.0,
                };
                (ep(n), format!("{age:.3}"))
            })
            .collect(),
    );
    out.family(
        "pollhook_dead_letters",
        "gauge",
        "Events whose attempts ran out.",
        r.endpoints
            .iter()
            .map(|(n, e)| (ep(n), e.dead_letters.to_string()))
            .collect(),
    );
    out.family(
        "pollhook_endpoint_circuit_open",
        "gauge",
        "1 while an endpoint's circuit is open (only probes go out) or it is disabled.",
        r.endpoints
            .iter()
            .map(|(n, e)| {
                let open = e.circuit_open || e.disabled.is_some();
                (ep(n), u8::from(open).to_string())
            })
            .collect(),
    );

    let host = |n: &String| format!("host=\"{}\"", esc(n));
    let hosts = |f: &dyn Fn(&crate::quota::HostReport) -> String| {
        r.hosts
            .iter()
            .map(|(n, h)| (host(n), f(h)))
            .collect::<Vec<_>>()
    };
    out.family(
        "pollhook_upstream_requests_total",
        "counter",
        "Requests sent to an upstream host.",
        hosts(&|h| h.requests.to_string()),
    );
    out.family(
        "pollhook_upstream_throttled_total",
        "counter",
        "429 and 503 answers of an upstream host.",
        hosts(&|h| h.throttled.to_string()),
    );
    out.family(
        "pollhook_upstream_429_total",
        "counter",
        "429 Too Many Requests answers of an upstream host.",
        hosts(&|h| h.too_many_requests.to_string()),
    );
    out.family(
        "pollhook_upstream_throttled_seconds_total",
        "counter",
        "Time an upstream host was paused by its Retry-After / RateLimit headers or refusals.",
        hosts(&|h| format!("{:.3}", h.paused_ms_total as f64 / 1000.0)),
    );
    out.family(
        "pollhook_upstream_paused",
        "gauge",
        "1 while an upstream host is paused.",
        hosts(&|h| u8::from(h.paused_for_ms.is_some()).to_string()),
    );

    let c = &r.config;
    out.family(
        "pollhook_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP) by outcome.",
        vec![
            ("outcome=\"applied\"".into(), c.reloads.to_string()),
            ("outcome=\"refused\"".into(), c.reloads_failed.to_string()),
        ],
    );
    out.family(
        "pollhook_config_last_reload_successful",
        "gauge",
        "0 when the last reload was refused (the previous configuration runs).",
        vec![(
            String::new(),
            u8::from(c.last_reload_ok != Some(false)).to_string(),
        )],
    );
    out.0
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
