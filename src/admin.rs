//! Admin HTTP: `/healthz`, `/readyz`, `/status` (JSON), `/metrics`
//! (Prometheus text), and the operator's repair tools: `POST /dlq/list`,
//! `POST /dlq/replay`, `POST /dlq/drop`, `POST /events` (what `pollhook dlq`
//! and `pollhook events` call while the daemon runs). Loopback by default;
//! shows no secrets (status holds masked errors only; bodies are not shown).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::status::{EndpointStatus, InstanceStatus, Status};
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
        .route("/dlq/list", axum::routing::post(dlq_list))
        .route("/dlq/replay", axum::routing::post(dlq_replay))
        .route("/dlq/drop", axum::routing::post(dlq_drop))
        .route("/events", axum::routing::post(events))
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

fn store_error(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

fn dlq_error(e: crate::dlq::DlqError) -> Response {
    match e {
        crate::dlq::DlqError::NoCriterion => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
        other => store_error(other),
    }
}

async fn dlq_list(State(s): State<AdminState>, Json(f): Json<crate::dlq::Filter>) -> Response {
    match crate::dlq::list(&s.store, &f) {
        Ok(v) => Json(v).into_response(),
        Err(e) => store_error(e),
    }
}

async fn dlq_replay(State(s): State<AdminState>, Json(f): Json<crate::dlq::Filter>) -> Response {
    match crate::dlq::replay(&s.store, &f).await {
        Ok(endpoints) => {
            for ep in &endpoints {
                if let Some(w) = s.live.wake(ep) {
                    w.rescan();
                }
            }
            Json(serde_json::json!({ "replayed": endpoints.len() })).into_response()
        }
        Err(e) => dlq_error(e),
    }
}

async fn dlq_drop(State(s): State<AdminState>, Json(f): Json<crate::dlq::Filter>) -> Response {
    match crate::dlq::drop(&s.store, &f).await {
        Ok(n) => Json(serde_json::json!({ "dropped": n })).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn events(State(s): State<AdminState>, Json(q): Json<crate::dlq::EventsQuery>) -> Response {
    match crate::dlq::events(&s.store, &q) {
        Ok(v) => Json(v).into_response(),
        Err(e) => store_error(e),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.status.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
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

/// An endpoint in `/status`.
#[derive(Serialize)]
pub struct EndpointReport {
    #[serde(flatten)]
    pub status: EndpointStatus,
    pub queue_depth: usize,
    pub dead_letters: usize,
}

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
                (
                    name.clone(),
                    EndpointReport {
                        status: eps.get(&name).cloned().unwrap_or_default(),
                        queue_depth: s.store.outbox_len(&name),
                        dead_letters: s.store.dead_len(&name),
                    },
                )
            })
            .collect(),
    }
}

async fn status(State(s): State<AdminState>) -> Json<StatusReport> {
    Json(report(&s))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let r = report(&s);
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let inst = |k: &String, i: &InstanceStatus| {
        format!(
            "source=\"{}\",instance=\"{}\"",
            esc(&i.source),
            esc(k.split_once('/').map(|x| x.1).unwrap_or(k))
        )
    };
    let mut polls = Vec::new();
    for (k, i) in &r.instances {
        polls.push((
            format!("{},outcome=\"ok\"", inst(k, i)),
            (i.polls_ok - i.polls_not_modified).to_string(),
        ));
        polls.push((
            format!("{},outcome=\"not_modified\"", inst(k, i)),
            i.polls_not_modified.to_string(),
        ));
        polls.push((
            format!("{},outcome=\"error\"", inst(k, i)),
            i.polls_failed.to_string(),
        ));
    }
    family(
        "pollhook_polls_total",
        "counter",
        "Polls by outcome.",
        polls,
    );
    family(
        "pollhook_events_total",
        "counter",
        "Events detected.",
        r.instances
            .iter()
            .map(|(k, i)| (inst(k, i), i.events.to_string()))
            .collect(),
    );
    let ep = |n: &String| format!("endpoint=\"{}\"", esc(n));
    family(
        "pollhook_deliveries_total",
        "counter",
        "Delivery attempts by outcome.",
        r.endpoints
            .iter()
            .flat_map(|(n, e)| {
                [
                    (
                        format!("{},outcome=\"delivered\"", ep(n)),
                        e.status.delivered.to_string(),
                    ),
                    (
                        format!("{},outcome=\"failed\"", ep(n)),
                        e.status.failed_attempts.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    family(
        "pollhook_outbox_depth",
        "gauge",
        "Events waiting for delivery.",
        r.endpoints
            .iter()
            .map(|(n, e)| (ep(n), e.queue_depth.to_string()))
            .collect(),
    );
    family(
        "pollhook_dead_letters",
        "gauge",
        "Events whose attempts ran out.",
        r.endpoints
            .iter()
            .map(|(n, e)| (ep(n), e.dead_letters.to_string()))
            .collect(),
    );
    family(
        "pollhook_poll_interval_seconds",
        "gauge",
        "Time between the starts of an instance's last two polls (stretches when a host quota is scarce).",
        r.instances
            .iter()
            .filter_map(|(k, i)| {
                i.effective_interval_ms
                    .map(|ms| (inst(k, i), format!("{:.3}", ms as f64 / 1000.0)))
            })
            .collect(),
    );
    family(
        "pollhook_seen_evicted_total",
        "counter",
        "Item ids forgotten because of seen_limit / seen_ttl (detect: new).",
        r.instances
            .iter()
            .map(|(k, i)| (inst(k, i), i.seen_evicted.to_string()))
            .collect(),
    );
    family(
        "pollhook_poll_consecutive_failures",
        "gauge",
        "Failed polls in a row (the instance backs off meanwhile).",
        r.instances
            .iter()
            .map(|(k, i)| (inst(k, i), i.consecutive_failures.to_string()))
            .collect(),
    );
    let host = |n: &String| format!("host=\"{}\"", esc(n));
    family(
        "pollhook_upstream_requests_total",
        "counter",
        "Requests sent to an upstream host.",
        r.hosts
            .iter()
            .map(|(n, h)| (host(n), h.requests.to_string()))
            .collect(),
    );
    family(
        "pollhook_upstream_throttled_total",
        "counter",
        "429 and 503 answers of an upstream host.",
        r.hosts
            .iter()
            .map(|(n, h)| (host(n), h.throttled.to_string()))
            .collect(),
    );
    family(
        "pollhook_upstream_paused",
        "gauge",
        "1 while an upstream host is paused by its Retry-After / RateLimit headers.",
        r.hosts
            .iter()
            .map(|(n, h)| (host(n), u8::from(h.paused_for_ms.is_some()).to_string()))
            .collect(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
