//! `pollhook run`: the daemon's lifecycle. It opens the store, starts the
//! admin server, lets the [`supervisor`] start one poll task per instance
//! ([`crate::poll`]), one discovery loop per discovering source and one
//! delivery worker per endpoint, keeps the node's leases (`Cluster`, on
//! sled through `SingleNode`: the same path as several nodes), reloads on
//! SIGHUP, sweeps the store hourly, and drains on shutdown.

mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::connector::auth::TokenCache;
use crate::deliver::worker::{delivery_client, USER_AGENT_VALUE};
use crate::quota::HostGates;
use crate::runtime::{Live, Shared, Tasks};
use crate::status::Status;
use crate::store::Store;
use supervisor::Supervisor;

/// The client for polling upstreams.
pub fn poll_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(USER_AGENT_VALUE)
        // Redirects within the same host only (at most 5): a redirect to
        // another host would carry the connector's credentials (an API key
        // header survives reqwest's cross-host stripping) past
        // `paginate.allow_hosts` and that host's quota. A refused redirect
        // surfaces as the 3xx answer.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same = attempt.previous().last().is_some_and(|prev| {
                prev.host_str() == attempt.url().host_str()
                    && prev.port_or_known_default() == attempt.url().port_or_known_default()
            });
            if attempt.previous().len() > 5 || !same {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }))
        .build()
        .expect("a TLS backend is compiled in")
}

/// How often store care runs (history, dead letter and removed-instance
/// retention; see [`crate::store::retention`]).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs the daemon until `shutdown` is cancelled, then drains: pollers stop
/// at their next sleep, in-flight polls and deliveries get until
/// `shutdown_timeout`, anything unfinished stays in the store for next time.
/// Each `reload` notification (SIGHUP) reads the bridge file again and
/// applies it (see [`Supervisor::reload`]).
pub async fn run(
    config: Config,
    reload: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    // The error names the place (a PostgreSQL URL without its password).
    let store = config.store.open_for(config.fleet()).await?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let services = Services::start(&config, &store, &shutdown);
    let admin = match config.admin_listen {
        Some(addr) => Some(services.start_admin(addr, &store, &shutdown).await?),
        None => None,
    };
    let mut sup = Supervisor {
        shared: services.shared.clone(),
        guarded: delivery_client(true),
        unguarded: delivery_client(false),
        workers: Tasks::default(),
        worker_fps: Default::default(),
        pollers: Tasks::default(),
        roster: crate::poll::Roster::new(services.shared.clone(), shutdown.clone()),
        poller_fps: Default::default(),
        config: None,
        shutdown: shutdown.clone(),
    };
    // Started before the first apply, so no change of the held set is
    // missed; it ends with the shutdown.
    let roster = tokio::spawn(sup.roster.clone().run());
    // Reading the configuration, opening the store and binding the
    // servers is done: their code goes before the first polls add theirs
    // (the peak), and again once started (see `memory`).
    crate::memory::give_back_code();
    sup.apply(config).await;
    services.status.set_ready(true);
    // Started now: its first round (at once) gives back what the first
    // apply ran only once; it ends with the shutdown.
    let give_back = tokio::spawn(crate::memory::give_back_memory_every(
        crate::memory::GIVE_BACK_EVERY,
        shutdown.clone(),
    ));
    let notifier = Arc::new(crate::notify::Notifier::from_env());
    let watchdog = announce_ready(&sup, &notifier, admin.as_ref().map(|a| a.1), &shutdown)?;
    let gave_up = serve(
        &mut sup,
        &store,
        &services.status,
        &notifier,
        &reload,
        &shutdown,
    )
    .await;
    services.status.set_ready(false);
    notifier.send("STOPPING=1\nSTATUS=shutting down: finishing in-flight work");
    if let Some(w) = watchdog {
        w.abort();
    }
    drain(&mut sup).await;
    let _ = roster.await;
    let _ = give_back.await;
    services.stop().await;
    if let Some((a, _)) = admin {
        a.abort();
    }
    let config = sup.config.as_ref().expect("applied");
    let _ = std::fs::remove_file(config.state_dir.join("admin.addr"));
    if let Some(e) = gave_up {
        // No final flush: a store that refuses writes may not return from
        // one, and what it holds is durable up to its last good commit.
        // sled also flushes when its last handle is dropped, which hung
        // this exit on a full disk: one handle is leaked on purpose, the
        // process is about to end.
        std::mem::forget(store);
        return Err(StoreGaveUp(e).into());
    }
    store.flush().await?;
    info!("store flushed; bye");
    Ok(())
}

/// What runs beside the supervisor's tasks for the daemon's whole life:
/// status, the node's leases (`Cluster`, the same on one node as on
/// several), host gates and operational events.
struct Services {
    status: Arc<Status>,
    live: Arc<Live>,
    hosts: Arc<HostGates>,
    cluster: Arc<crate::cluster::Cluster>,
    /// Whether `/status` shows a cluster section (a shared coordination).
    shared_node: bool,
    shared: Arc<Shared>,
    ops_task: tokio::task::JoinHandle<()>,
    cluster_task: tokio::task::JoinHandle<()>,
    /// The cluster keeps its leases until every poll and delivery is done
    /// (its own token, cancelled after them), then gives them back.
    cluster_stop: CancellationToken,
}

impl Services {
    fn start(config: &Config, store: &Store, shutdown: &CancellationToken) -> Services {
        let status = Arc::new(Status::default());
        let live = Arc::new(Live::default());
        live.set_admin(
            config.admin_token.clone(),
            config.admin_allowed_hosts.clone(),
        );
        let coordination = store.coordination();
        // Reporting only: `/status` shows a cluster section for a shared one.
        let shared_node = coordination.is_shared();
        let cluster = crate::cluster::Cluster::new(coordination, config.lease, shutdown.clone());
        // Operational events have a lane of their own: the worker that
        // finds entries in it adopts it (`Cluster::adopt`), so a node
        // holds it and delivers them, and a bridge without `operations:`
        // has no lease row for it.
        let ops = Arc::new(crate::opsevents::Ops::default());
        ops.configure(config.operations.clone());
        let hosts = Arc::new(HostGates::in_cluster(
            &config.hosts,
            cluster.store().clone(),
            Some(ops.clone()),
        ));
        let shared = Arc::new(Shared {
            store: store.clone(),
            status: status.clone(),
            client: poll_client(),
            hosts: hosts.clone(),
            tokens: TokenCache::with_store(store.clone()),
            live: live.clone(),
            cluster: cluster.clone(),
            ops: ops.clone(),
            state_loads: Arc::new(tokio::sync::Semaphore::new(crate::runtime::STATE_LOADS)),
        });
        let ops_task = tokio::spawn(ops.run(store.clone(), live.wakes.clone(), shutdown.clone()));
        let cluster_stop = CancellationToken::new();
        let cluster_task = tokio::spawn(cluster.clone().run(
            live.wakes.clone(),
            hosts.clone(),
            status.clone(),
            cluster_stop.clone(),
        ));
        Services {
            status,
            live,
            hosts,
            cluster,
            shared_node,
            shared,
            ops_task,
            cluster_task,
            cluster_stop,
        }
    }

    /// Starts the admin server on `addr`.
    async fn start_admin(
        &self,
        addr: std::net::SocketAddr,
        store: &Store,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(tokio::task::JoinHandle<()>, std::net::SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        info!(%local, "admin server listening");
        let state = crate::admin::AdminState {
            status: self.status.clone(),
            store: store.clone(),
            hosts: self.hosts.clone(),
            live: self.live.clone(),
            node: self.shared_node.then(|| self.cluster.node.clone()),
            dashboard: Default::default(),
            listen: local,
        };
        let task = tokio::spawn(crate::admin::serve(listener, state, shutdown.clone()));
        Ok((task, local))
    }

    /// After the polls and deliveries: operational events stop, and the
    /// node gives its leases back.
    async fn stop(self) {
        self.ops_task.abort();
        self.cluster_stop.cancel();
        let _ = self.cluster_task.await;
    }
}

/// Tells CLI commands, the log and systemd that the daemon is ready, and
/// starts systemd's watchdog pings (for as long as the runtime turns).
fn announce_ready(
    sup: &Supervisor,
    notifier: &Arc<crate::notify::Notifier>,
    admin: Option<std::net::SocketAddr>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let config = sup.config.as_ref().expect("applied");
    let count = config
        .sources
        .iter()
        .map(|s| s.instances.len())
        .sum::<usize>();
    if let Some(local) = admin {
        // Where CLI commands (and tests) find the running daemon; written
        // once it is ready, so its presence means `/readyz` says so.
        std::fs::write(config.state_dir.join("admin.addr"), local.to_string())
            .context("cannot write admin.addr in state_dir")?;
    }
    info!(
        instances = count,
        endpoints = config.endpoints.len(),
        state_dir = %config.state_dir.display(),
        store = %config.store,
        "pollhook running"
    );
    // systemd: ready now (store open, workers and pollers running), and
    // watchdog pings from a runtime task for as long as the runtime turns.
    notifier.send(&format!(
        "READY=1\nSTATUS=polling {count} instances, delivering to {} endpoints",
        config.endpoints.len()
    ));
    Ok(notifier.watchdog_interval().map(|every| {
        let n = notifier.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => n.send("WATCHDOG=1"),
                    _ = stop.cancelled() => return,
                }
            }
        })
    }))
}

/// Runs until `shutdown`: reloads on SIGHUP, sweeps the store hourly, and
/// on sled gives up (cancelling `shutdown`) once the store has refused
/// writes too long; returns the store's error then.
async fn serve(
    sup: &mut Supervisor,
    store: &Store,
    status: &Status,
    notifier: &crate::notify::Notifier,
    reload: &tokio::sync::Notify,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    // Only sled needs a new handle to recover (it refuses every write after
    // its first I/O error); a database comes back by itself, and the
    // daemon waits for it, not ready meanwhile.
    let give_up = matches!(store, Store::Sled(_)).then(store_give_up);
    let mut store_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = store_check.tick() => {
                let h = status.store_health();
                if let (Some(since), Some(e)) = (h.failing_since_ms, h.error) {
                    let failing = Duration::from_millis((crate::now_ms() - since).max(0) as u64);
                    if let Some(give_up) = give_up.filter(|g| failing >= *g) {
                        error!(
                            "the store has refused writes for {}: {e}; stopping (exit status {STORE_EXIT}) so that the service manager starts pollhook again on a fresh store handle (Restart=on-failure); nothing detected is lost",
                            humantime::format_duration(give_up)
                        );
                        shutdown.cancel();
                        return Some(e);
                    }
                }
            }
            _ = reload.notified() => {
                notifier.send("RELOADING=1\nSTATUS=reloading the configuration");
                sup.reload().await;
                notifier.send("READY=1\nSTATUS=configuration reloaded");
            }
            _ = sweep.tick() => sup.sweep().await,
        }
    }
}

/// Waits for in-flight polls, then deliveries, until the configured
/// `shutdown_timeout`; what is left is abandoned (it stays in the store).
async fn drain(sup: &mut Supervisor) {
    let timeout = sup.config.as_ref().expect("applied").shutdown_timeout;
    info!(timeout = %humantime::format_duration(timeout), "shutting down: finishing in-flight polls and deliveries");
    let deadline = tokio::time::Instant::now() + timeout;
    // Discovery loops first: the instances they found leave the roster,
    // whose tasks are then all waited for.
    let polls = async {
        sup.pollers.join_all().await;
        sup.roster.join_all().await;
    };
    if tokio::time::timeout_at(deadline, polls).await.is_err() {
        warn!("shutdown timeout: abandoning in-flight polls (they stay in the store and resume at the next start)");
        sup.pollers.abort_all().await;
        sup.roster.abort_all();
    }
    if tokio::time::timeout_at(deadline, sup.workers.join_all())
        .await
        .is_err()
    {
        warn!("shutdown timeout: abandoning in-flight deliveries (they stay in the store and resume at the next start)");
        sup.workers.abort_all().await;
    }
}

/// The exit status of a daemon that stopped because its store refused
/// writes (`EX_TEMPFAIL`): a failure the unit's `Restart=on-failure` acts
/// on. sled stops taking writes after its first I/O error (a full disk),
/// and only a new handle recovers, so giving up and being restarted is
/// how pollhook recovers without an operator once space returns.
pub const STORE_EXIT: u8 = 75;

/// The daemon stopped because the store refused writes for too long.
#[derive(Debug, thiserror::Error)]
#[error("the store refused writes for too long: {0}")]
pub struct StoreGaveUp(pub String);

/// How long the store may refuse writes before the daemon stops with
/// [`STORE_EXIT`]: 30 s, or `POLLHOOK_STORE_GIVE_UP` (a duration, for tests
/// and impatient operators). Meanwhile `/readyz` says not ready and
/// `/status` says why.
fn store_give_up() -> Duration {
    std::env::var("POLLHOOK_STORE_GIVE_UP")
        .ok()
        .and_then(|v| crate::schedule::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(30))
}
