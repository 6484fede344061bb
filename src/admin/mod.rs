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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub mod dashboard;

use crate::operate::{self, Op};
pub use crate::status::{ClusterReport, StatusReport};
use crate::status::{EndpointLabels, EndpointStatus, SourceLabels, Status};
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

/// The daemon as operator operations see it: its endpoints and their
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

/// A gauge of seconds (or any fraction).
type Seconds = Gauge<f64, AtomicU64>;

/// `/metrics` in the Prometheus text format (0.0.4), by prometheus-client.
///
/// Counters and histograms are the families that `Status` and the host
/// gates increment as things happen, so they never go backwards. Gauges
/// describe the present and are built here, per scrape, from in-memory
/// status only (no store scan). Instances are aggregated by source (their
/// detail is on `/status`), so the exposition stays small with thousands
/// of instances; each instance is read under its own lock, never copied.
fn exposition(s: &AdminState, now_ms: i64) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let m = s.status.metrics();

    // Per source: failing instances, longest effective interval, oldest
    // last success, instances.
    #[derive(Default)]
    struct Src {
        failing: i64,
        interval_ms: Option<u64>,
        oldest_ok_ms: Option<i64>,
        instances: i64,
    }
    let mut sources: BTreeMap<SourceLabels, Src> = BTreeMap::new();
    let mut key = SourceLabels {
        source: String::new(),
        connector: String::new(),
    };
    s.status.each_instance(|i| {
        key.source.clone_from(&i.source);
        key.connector.clone_from(&i.connector);
        if !sources.contains_key(&key) {
            sources.insert(key.clone(), Src::default());
        }
        let e = sources.get_mut(&key).expect("inserted");
        e.instances += 1;
        e.failing += i64::from(i.consecutive_failures > 0);
        if let Some(ms) = i.effective_interval_ms {
            e.interval_ms = Some(e.interval_ms.map_or(ms, |x| x.max(ms)));
        }
        if let Some(t) = i.last_ok_ms {
            e.oldest_ok_ms = Some(e.oldest_ok_ms.map_or(t, |x| x.min(t)));
        }
    });
    let age = |t: i64| (now_ms - t).max(0) as f64 / 1000.0;

    m.register_sources(&mut r);
    let cursor_age = Family::<SourceLabels, Seconds>::default();
    let interval = Family::<SourceLabels, Seconds>::default();
    let failing = Family::<SourceLabels, Gauge>::default();
    let instances = Family::<SourceLabels, Gauge>::default();
    for (l, x) in &sources {
        if let Some(t) = x.oldest_ok_ms {
            cursor_age.get_or_create(l).set(age(t));
        }
        if let Some(ms) = x.interval_ms {
            interval.get_or_create(l).set(ms as f64 / 1000.0);
        }
        failing.get_or_create(l).set(x.failing);
        instances.get_or_create(l).set(x.instances);
    }
    r.register(
        "pollhook_cursor_age_seconds",
        "Seconds since the least recently successful instance of a source last polled successfully: how stale the oldest view of the upstream is.",
        cursor_age,
    );
    r.register(
        "pollhook_poll_interval_seconds",
        "Longest time between the starts of an instance's last two polls (stretches when a host quota is scarce).",
        interval,
    );
    r.register(
        "pollhook_instances_failing",
        "Instances whose last poll failed (they back off meanwhile).",
        failing,
    );
    r.register("pollhook_instances", "Instances polled.", instances);

    m.register_deliveries(&mut r);
    let depth = Family::<EndpointLabels, Gauge>::default();
    let oldest = Family::<EndpointLabels, Seconds>::default();
    let dead = Family::<EndpointLabels, Gauge>::default();
    let open = Family::<EndpointLabels, Gauge>::default();
    for (name, e) in endpoints(s) {
        let l = EndpointLabels { endpoint: name };
        depth.get_or_create(&l).set(e.queue_depth as i64);
        oldest
            .get_or_create(&l)
            .set(e.oldest_pending_ms.map_or(0.0, age));
        dead.get_or_create(&l).set(e.dead_letters as i64);
        open.get_or_create(&l)
            .set(i64::from(e.circuit_open || e.disabled.is_some()));
    }
    r.register(
        "pollhook_outbox_depth",
        "Events waiting for delivery.",
        depth,
    );
    r.register(
        "pollhook_outbox_oldest_age_seconds",
        "Age of the oldest event waiting for delivery (0 when none waits).",
        oldest,
    );
    r.register(
        "pollhook_dead_letters",
        "Events whose attempts ran out.",
        dead,
    );
    r.register(
        "pollhook_endpoint_circuit_open",
        "1 while an endpoint's circuit is open (only probes go out) or it is disabled.",
        open,
    );

    // Host counters live as long as the process (see `HostGates`), so
    // reading them at the scrape cannot make them go backwards.
    let requests = Family::<HostLabels, Counter>::default();
    let throttled = Family::<HostLabels, Counter>::default();
    let too_many = Family::<HostLabels, Counter>::default();
    let paused_secs = Family::<HostLabels, Counter<f64, AtomicU64>>::default();
    for (host, st) in s.hosts.counters() {
        let l = HostLabels { host };
        requests
            .get_or_create(&l)
            .inc_by(st.requests.load(Ordering::Relaxed));
        throttled
            .get_or_create(&l)
            .inc_by(st.throttled.load(Ordering::Relaxed));
        too_many
            .get_or_create(&l)
            .inc_by(st.too_many.load(Ordering::Relaxed));
        paused_secs
            .get_or_create(&l)
            .inc_by(st.paused_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    }
    let paused = Family::<HostLabels, Gauge>::default();
    for (host, h) in s.hosts.report() {
        paused
            .get_or_create(&HostLabels { host })
            .set(i64::from(h.paused_for_ms.is_some()));
    }
    r.register(
        "pollhook_upstream_requests",
        "Requests sent to an upstream host.",
        requests,
    );
    r.register(
        "pollhook_upstream_throttled",
        "429 and 503 answers of an upstream host.",
        throttled,
    );
    r.register(
        "pollhook_upstream_429",
        "429 Too Many Requests answers of an upstream host.",
        too_many,
    );
    r.register(
        "pollhook_upstream_throttled_seconds",
        "Time an upstream host was paused by its Retry-After / RateLimit headers or refusals.",
        paused_secs,
    );
    r.register(
        "pollhook_upstream_paused",
        "1 while an upstream host is paused.",
        paused,
    );

    m.register_config(&mut r);
    let last_ok = Gauge::<i64>::default();
    last_ok.set(i64::from(s.status.config().last_reload_ok != Some(false)));
    r.register(
        "pollhook_config_last_reload_successful",
        "0 when the last reload was refused (the previous configuration runs).",
        last_ok,
    );

    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// A host's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}
