//! Admin HTTP: `/healthz`, `/readyz`, `/status` (JSON), `/metrics`
//! (Prometheus text), and the operator's repair tools: every
//! [`crate::operate`] operation at its `POST` route (what `pollhook dlq`,
//! `events` and `endpoint enable` call while the daemon runs) and
//! `GET /state/export`. Loopback by default;
//! shows no secrets (status holds masked errors only; bodies are not shown).
//!
//! Every request passes [`guard`] first (its `Host` and `Origin`, see
//! [`crate::access`]; every answer gets the security headers), then, but
//! for `/healthz` and the dashboard's own pages, [`authorize`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio_util::sync::CancellationToken;

pub mod dashboard;

use crate::operate::{self, Op};
use crate::status::metrics::Scrape;
pub use crate::status::{ClusterReport, StatusReport};
use crate::status::{EndpointStatus, Status};
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
    pub live: Arc<crate::runtime::Live>,
    /// This node's name in a cluster (PostgreSQL store).
    pub node: Option<String>,
    /// The dashboard's templates and CSRF value (`GET /`).
    pub dashboard: Arc<dashboard::Dashboard>,
    /// The address the server listens on (its IP is a `Host` it answers).
    pub listen: SocketAddr,
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
        .route(
            route::<operate::DlqList>(),
            post(operation::<operate::DlqList>),
        )
        .route(
            route::<operate::DlqReplay>(),
            post(operation::<operate::DlqReplay>),
        )
        .route(
            route::<operate::DlqDrop>(),
            post(operation::<operate::DlqDrop>),
        )
        .route(
            route::<operate::Events>(),
            post(operation::<operate::Events>),
        )
        .route(
            route::<operate::Enable>(),
            post(operation::<operate::Enable>),
        )
        .route("/state/export", get(export))
        .route("/ui/replay", post(dashboard::replay))
        .route("/ui/drop", post(dashboard::drop_letter))
        .route("/ui/enable", post(dashboard::enable))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        // The dashboard asks for the token itself (a sign-in form).
        .route("/", get(dashboard::page))
        .route("/login", post(dashboard::login))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

/// Before anything else: a `Host` this server answers to and an `Origin`
/// that is this server (DNS rebinding, cross-site requests; liveness,
/// `/healthz`, stays open); after: the security headers on every answer.
async fn guard(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = match refusal(&s, &req) {
        Some(r) => r,
        None => next.run(req).await,
    };
    let h = response.headers_mut();
    for (name, value) in crate::access::HEADERS {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if let Ok(csp) = HeaderValue::from_str(s.dashboard.csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// Why [`guard`] refuses a request, if it does.
fn refusal(s: &AdminState, req: &axum::extract::Request) -> Option<Response> {
    if req.uri().path() == "/healthz" {
        return None;
    }
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let allowed = s.live.admin_hosts();
    let shown = |v: &str| v.chars().take(100).collect::<String>();
    if !crate::access::host_allowed(host, s.listen.ip(), &allowed) {
        tracing::debug!(host = ?host.map(shown), "admin request for another host refused");
        return Some(
            (
                StatusCode::FORBIDDEN,
                format!(
                    "Host `{}` is not this admin server: name its IP address (as `{}`), `localhost`, or a name listed in `admin.allowed_hosts`\n",
                    host.map(shown).unwrap_or_default(),
                    s.listen
                ),
            )
                .into_response(),
        );
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("null");
    if crate::access::origin_allowed(origin, host, &allowed) {
        return None;
    }
    tracing::debug!(origin = %shown(origin), "cross-site admin request refused");
    Some(
        (
            StatusCode::FORBIDDEN,
            format!(
                "cross-site request refused: Origin `{}` is not this admin server (a proxy's name must be listed in `admin.allowed_hosts`)\n",
                shown(origin)
            ),
        )
            .into_response(),
    )
}

/// The bearer token check (or the dashboard's session); constant-time so
/// a token cannot be guessed by timing, and a client that keeps sending
/// wrong tokens waits (see [`crate::access::Failures`]). Liveness
/// (`/healthz`) stays open for supervisors.
async fn authorize(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use dashboard::Credentials;
    let token = s.live.admin_token.read().clone();
    let now = std::time::Instant::now();
    let client = crate::access::client_of(peer);
    let has_bearer = req.headers().contains_key(header::AUTHORIZATION);
    if has_bearer && token.is_some() {
        if let Some(wait) = s.live.failures.blocked(client, now) {
            return too_many(wait);
        }
    }
    match dashboard::credentials(token.as_deref(), &s.live.sessions, req.headers(), now) {
        Credentials::NotNeeded | Credentials::Good => next.run(req).await,
        Credentials::Missing => unauthorized(),
        Credentials::Wrong => {
            failed_attempt(&s, peer, req.uri().path(), now);
            unauthorized()
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin token required\n",
    )
        .into_response()
}

/// 429 to a client that failed too often, with how long it waits.
pub(crate) fn too_many(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs().max(1);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        format!("too many failed admin token attempts from this address: try again in {secs} s\n"),
    )
        .into_response()
}

/// Counts and logs a wrong token (never the token itself).
pub(crate) fn failed_attempt(
    s: &AdminState,
    peer: SocketAddr,
    path: &str,
    now: std::time::Instant,
) {
    let client = crate::access::client_of(peer);
    let last = s.live.failures.failed(client, now);
    tracing::warn!(client = %peer.ip(), route = %path, "admin token refused");
    if last {
        tracing::warn!(
            client = %peer.ip(),
            "too many failed admin token attempts: this client may try once every {} s",
            crate::access::FAILURE_PERIOD.as_secs()
        );
    }
}

/// The daemon as operator verbs see it: its endpoints and their
/// workers' wake-ups.
pub(crate) struct LiveWorkers<'a>(pub(crate) &'a crate::runtime::Live);

impl operate::Workers for LiveWorkers<'_> {
    fn has_endpoint(&self, name: &str) -> bool {
        self.0.wake(name).is_some()
    }
    fn changed(&self, endpoint: &str) {
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
    match op.run(&s.store, Some(&LiveWorkers(&s.live))).await {
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
    if let Some(e) = s.status.store_health().error {
        problems.push(format!("store unavailable: {e}"));
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

/// The configured endpoints' status (an endpoint that has not reported
/// yet shows zeros).
fn endpoints(s: &AdminState) -> BTreeMap<String, EndpointStatus> {
    let mut eps = s.status.endpoints();
    s.live
        .endpoints()
        .into_iter()
        .map(|name| {
            let e = eps.remove(&name).unwrap_or_default();
            (name, e)
        })
        .collect()
}

fn report(s: &AdminState) -> StatusReport {
    StatusReport {
        instances: s.status.instances(),
        discovery: s.status.discoveries(),
        hosts: s.hosts.report(),
        config: s.status.config(),
        store: s.status.store_health(),
        endpoints: endpoints(s),
        parked: s.status.parked(),
        cluster: None,
    }
}

async fn status(State(s): State<AdminState>) -> Json<StatusReport> {
    Json(full_report(&s).await)
}

/// `/status`: the in-memory report, and in a cluster the nodes and leases
/// read from the store.
pub(crate) async fn full_report(s: &AdminState) -> StatusReport {
    let mut r = report(s);
    if let Some(node) = &s.node {
        use crate::store::Coordination;
        let coordination = s.store.coordination();
        let mut c = ClusterReport {
            node: node.clone(),
            poll_tasks: s.status.poll_tasks(),
            ..Default::default()
        };
        match tokio::try_join!(coordination.nodes(), coordination.leases()) {
            Ok((nodes, leases)) => {
                c.nodes = nodes;
                for l in leases {
                    let owner = l.owner.filter(|_| l.left_ms > 0);
                    if let Some(i) = r.instances.get_mut(&l.key) {
                        i.node = owner.clone();
                    }
                    if owner.is_none() {
                        c.unheld.push(l.key);
                    }
                }
            }
            Err(e) => c.error = Some(e.to_string()),
        }
        r.cluster = Some(c);
    }
    r
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match exposition(&s, crate::now_ms()) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => error_response(500, e),
    }
}

/// `/metrics` of the moment: the status module owns every family and the
/// exposition; the admin server gathers what it reads beside the status.
fn exposition(s: &AdminState, now_ms: i64) -> Result<String, std::fmt::Error> {
    crate::status::metrics::exposition(&Scrape {
        status: &s.status,
        endpoints: &endpoints(s),
        host_counters: &s.hosts.counters(),
        hosts: &s.hosts.report(),
        now_ms,
    })
}
