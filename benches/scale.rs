//! Scale benchmark (not a test: it measures and prints).
//!
//! The real binary polls 10,000 bank accounts (one `bank-balance` source,
//! a static `for_each` list; the connector has no `discover`) `every 10s`
//! against a loopback mock of the bank's balance endpoint, while a few
//! hundred balances change at random per interval. Reports:
//!
//! - polls/s sustained (requests counted at the mock) and how many were 304s;
//! - missed changes: every injected change must arrive at the receiver as a
//!   signed `bank.balance.changed` event by the end of the run plus a grace
//!   period of one interval + 5 s;
//! - detection latency (change → webhook arrival) p50/p99/max, the p99
//!   beyond the interval (latency − interval), and how many arrived later
//!   than interval + 2 s;
//! - per-instance on-time check: the largest gap between two polls of the
//!   same account (max and p99 over accounts), accounts with a gap above
//!   interval + 2 s;
//! - the daemon's CPU as a share of one core, its peak RSS, and the store
//!   size (du of the state dir), sampled each interval, with its growth
//!   extrapolated to an hour of operation.
//!
//! The mock is a minimal axum handler in this file rather than the shared
//! `examples/mock-bank/bank.rs`: that one logs every request's path in a
//! `Vec` forever (millions of strings in a long run) and cannot tell the
//! gaps between the polls of one account. The answer has the same shape
//! (`account_id`, `available`, `currency`, `updated_at`; `ETag: "v<n>"`,
//! `If-None-Match` → `304`), so `connectors/bank-balance.yaml` runs as is.
//!
//! On PostgreSQL: `BENCH_STORE=postgres BENCH_NODES=2 cargo bench --bench
//! scale` starts that many daemons on one fresh schema (a cluster sharing
//! the instances); CPU and RSS are then per node, the store's size is the
//! schema's, and PostgreSQL's committed transactions per second are shown.
//!
//! `cargo bench --bench scale` (env: BENCH_INSTANCES (10000),
//! BENCH_INTERVAL_SECS (10), BENCH_CHANGES_PER_INTERVAL (200), BENCH_SECONDS
//! (90, the measured window after the first poll of every instance),
//! BENCH_LOG (the nodes' `POLLHOOK_LOG`, `error`)).

#[path = "scale/chaos.rs"]
mod chaos;
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::{env_or, pct, proc_usage, SECRET};
use rand::Rng;
use serde_json::json;

/// Slack above the interval that still counts as on time.
const SLACK: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------ mock bank

struct Account {
    cents: i64,
    updated_at: String,
    version: u64,
    last_change: Option<Instant>,
    last_poll: Option<Instant>,
    /// Within the measured window: the previous poll (at the start, the
    /// last one before it), the largest and smallest gap between two
    /// polls (the window's edges included: from the last poll before it,
    /// and until its end), and the number of polls.
    win_last: Option<Instant>,
    max_gap: Duration,
    min_gap: Duration,
    win_polls: u32,
    /// The node that polled last (from its `User-Agent`, see [`node_of`]).
    last_node: u8,
    /// Where the largest gap was: its start, and the nodes that polled
    /// at its start and its end (printed for the late instances, so a
    /// defect shows which hand-over it follows).
    max_gap_at: Option<(Instant, u8, u8)>,
}

/// Most nodes a run tells apart (`BENCH_NODES` plus one that joins).
const MAX_NODES: usize = 16;

#[derive(Default)]
struct Bank {
    accounts: Mutex<HashMap<String, Account>>,
    recording: std::sync::atomic::AtomicBool,
    requests: AtomicU64,
    not_modified: AtomicU64,
    polled_once: AtomicU64,
    /// Requests per node (by `User-Agent`).
    per_node: [AtomicU64; MAX_NODES],
    /// Polls of an instance by another node than the one that polled it
    /// less than half an interval before: two nodes polling it at once
    /// (counted in the measured window only, as `early_polls`).
    double_polls: AtomicU64,
    /// Polls less than half an interval after the previous poll of the
    /// same instance (any node): early polls.
    early_polls: AtomicU64,
    /// Half the polling interval, ms (0 until set).
    half_interval_ms: AtomicU64,
}

/// The bench's daemons poll with `User-Agent: pollhook-bench-node-<i>`, so
/// the mock knows which node asked (the cluster shares one configuration
/// but each node reads its own bridge file).
fn node_of(headers: &HeaderMap) -> u8 {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("pollhook-bench-node-"))
        .and_then(|v| v.parse().ok())
        .filter(|i: &u8| (*i as usize) < MAX_NODES)
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Bank {
    fn new(ids: &[String]) -> Bank {
        let bank = Bank::default();
        let now = now_rfc3339();
        let mut m = bank.accounts.lock().unwrap();
        for id in ids {
            m.insert(
                id.clone(),
                Account {
                    cents: 50_000,
                    updated_at: now.clone(),
                    version: 1,
                    last_change: None,
                    last_poll: None,
                    win_last: None,
                    max_gap: Duration::ZERO,
                    min_gap: Duration::MAX,
                    win_polls: 0,
                    last_node: 0,
                    max_gap_at: None,
                },
            );
        }
        drop(m);
        bank
    }

    /// Starts (true) or stops (false) recording poll gaps; starting forgets
    /// what was recorded before. The gaps across the window's edges count:
    /// an instance polled once in a window of two intervals, a
    /// millisecond too late for a second one, waited no longer than one
    /// that was polled twice, and one polled last long before the end
    /// did wait.
    fn record(&self, on: bool) {
        let mut m = self.accounts.lock().unwrap();
        let now = Instant::now();
        for a in m.values_mut() {
            if on {
                a.win_last = a.last_poll;
                a.max_gap = Duration::ZERO;
                a.min_gap = Duration::MAX;
                a.win_polls = 0;
                a.max_gap_at = None;
            } else {
                // Never polled: waited the whole run.
                let waited = a.win_last.map_or(Duration::MAX, |p| now - p);
                if waited > a.max_gap {
                    a.max_gap = waited;
                    a.max_gap_at = a.win_last.map(|p| (p, a.last_node, u8::MAX));
                }
            }
        }
        self.recording.store(on, Ordering::SeqCst);
        drop(m);
    }

    /// The accounts `node` polled last.
    fn polled_last_by(&self, node: u8) -> Vec<String> {
        let m = self.accounts.lock().unwrap();
        m.iter()
            .filter(|(_, a)| a.last_poll.is_some() && a.last_node == node)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many of `ids` no other node than `gone` polled since `since`.
    fn not_taken_over(&self, ids: &[String], gone: u8, since: Instant) -> usize {
        let m = self.accounts.lock().unwrap();
        ids.iter()
            .filter(|id| {
                let a = &m[*id];
                !(a.last_node != gone && a.last_poll.is_some_and(|p| p > since))
            })
            .count()
    }

    /// Changes a balance unless the last change has not been polled yet
    /// (a change overwritten before any poll can be seen by no poller).
    fn change(&self, id: &str, cents: i64) -> bool {
        let mut m = self.accounts.lock().unwrap();
        let a = m.get_mut(id).unwrap();
        if let (Some(c), p) = (a.last_change, a.last_poll) {
            if p.is_none_or(|p| p <= c) {
                return false;
            }
        }
        a.cents = cents;
        a.updated_at = now_rfc3339();
        a.version += 1;
        a.last_change = Some(Instant::now());
        true
    }
}

async fn balance(
    State(bank): State<Arc<Bank>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let now = Instant::now();
    bank.requests.fetch_add(1, Ordering::Relaxed);
    let mut m = bank.accounts.lock().unwrap();
    // Read under the lock `record` switches it under: read before, a
    // request waiting for the lock while the window opened counted as
    // outside it, and its instance's gap spanned two intervals.
    let recording = bank.recording.load(Ordering::Relaxed);
    let Some(a) = m.get_mut(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no account {id}")})),
        )
            .into_response();
    };
    if a.last_poll.is_none() {
        bank.polled_once.fetch_add(1, Ordering::Relaxed);
    }
    let node = node_of(&headers);
    bank.per_node[node as usize].fetch_add(1, Ordering::Relaxed);
    let half = Duration::from_millis(bank.half_interval_ms.load(Ordering::Relaxed));
    if recording && a.last_poll.is_some_and(|p| now - p < half) {
        bank.early_polls.fetch_add(1, Ordering::Relaxed);
        if a.last_node != node {
            bank.double_polls.fetch_add(1, Ordering::Relaxed);
        }
    }
    let prev_node = a.last_node;
    a.last_node = node;
    a.last_poll = Some(now);
    if recording {
        if let Some(prev) = a.win_last {
            let gap = now - prev;
            if gap > a.max_gap {
                a.max_gap = gap;
                a.max_gap_at = Some((prev, prev_node, node));
            }
            a.min_gap = a.min_gap.min(gap);
        }
        a.win_last = Some(now);
        a.win_polls += 1;
    }
    let etag = format!("\"v{}\"", a.version);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        bank.not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let body = json!({
        "account_id": id,
        "available": serde_json::Number::from_f64(a.cents as f64 / 100.0).unwrap(),
        "currency": "EUR",
        "updated_at": a.updated_at,
    });
    ([(header::ETAG, etag)], Json(body)).into_response()
}

// ------------------------------------------------------------------- receiver

// -------------------------------------------------------------------- helpers

/// (disk usage as `du` counts it, apparent size) of a directory, bytes.
fn du(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut out = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            let (b, l) = du(&e.path());
            out.0 += b;
            out.1 += l;
        } else {
            out.0 += md.blocks() * 512;
            out.1 += md.len();
        }
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The daemon's `state_dir`: `state` beside the `--config` file it runs.
fn state_dir_of(pid: u32) -> std::path::PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let i = args.iter().position(|a| *a == b"--config").unwrap();
    let config = Path::new(std::str::from_utf8(args[i + 1]).unwrap());
    config.parent().unwrap().join("state")
}

/// No progress for this long means the daemon is stuck.
const STALL: Duration = Duration::from_secs(30);

/// SIGKILLs the daemon when dropped (also on a panic of the bench).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// The daemon's `/status`, or `None` when it does not answer in 10 s.
async fn fetch_status(admin: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let body = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice(&body).ok()
}

/// Reports a daemon that stopped making progress, and exits: what the mock
/// saw, whether the daemon still burns CPU or answers `/status`, and what
/// its threads are waiting on.
async fn stalled(what: &str, pid: u32, admin: &str, bank: &Bank) -> ! {
    let (cpu_a, rss) = proc_usage(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu_b, _) = proc_usage(pid);
    let status = fetch_status(admin).await.is_some();
    let mut threads: std::collections::BTreeMap<String, usize> = Default::default();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let p = t.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
            let comm = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit());
            *threads.entry(format!("{comm} in {wchan}")).or_default() += 1;
        }
    }
    println!("scale benchmark: DAEMON STALLED ({what})");
    println!(
        "  mock: {} requests in all, {} accounts polled at least once",
        bank.requests.load(Ordering::Relaxed),
        bank.polled_once.load(Ordering::Relaxed)
    );
    println!(
        "  daemon pid {pid}: {:.2} CPU s over the last 5 s (total {cpu_b:.1} s), RSS peak {:.1} MiB, /status {}",
        cpu_b - cpu_a,
        rss as f64 / 1024.0,
        if status { "answers" } else { "does not answer within 10 s" }
    );
    println!(
        "  threads: {}",
        threads
            .iter()
            .map(|(k, v)| format!("{v}x {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  stacks: gdb -p <pid> -batch -ex 'thread apply all bt' (set BENCH_KEEP_STALLED=1 to keep the daemon for it; it is killed otherwise)"
    );
    if env_or("BENCH_KEEP_STALLED", 0) == 1 {
        println!("  keeping pid {pid}; kill -9 it when done");
        std::process::exit(2);
    }
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::process::exit(1);
}

/// Samples the store's size each interval, and checks that the daemon
/// still polls.
struct Sampler<'a> {
    /// (seconds into the window, store bytes).
    sizes: Vec<(f64, u64)>,
    /// The store's size now, bytes.
    size: &'a dyn Fn() -> u64,
    last_req: u64,
    next: Instant,
    interval: Duration,
    t0: Instant,
    pid: u32,
    admin: &'a str,
    bank: &'a Bank,
}

impl Sampler<'_> {
    /// Takes every sample due up to `t`, each at its time.
    async fn until(&mut self, t: Instant) {
        while self.next <= t {
            tokio::time::sleep_until(self.next.into()).await;
            let at = self.t0.elapsed().as_secs_f64();
            self.sizes.push((at, (self.size)()));
            let req = self.bank.requests.load(Ordering::Relaxed);
            if req == self.last_req {
                let what = format!("no poll for one interval, {at:.0}s into the measured window");
                stalled(&what, self.pid, self.admin, self.bank).await;
            }
            self.last_req = req;
            self.next += self.interval;
        }
    }
}

/// Current RSS of a process, KiB.
fn rss_now(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Least-squares slope of (seconds, bytes) samples, bytes per second.
fn slope(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

// ----------------------------------------------------------------------- main

#[tokio::main]
async fn main() {
    let n = env_or("BENCH_INSTANCES", 10_000) as usize;
    let interval = Duration::from_secs(env_or("BENCH_INTERVAL_SECS", 10));
    let per_interval = env_or("BENCH_CHANGES_PER_INTERVAL", 200);
    let seconds = env_or("BENCH_SECONDS", 90);
    let window = Duration::from_secs(seconds);
    // A membership event delays the gone node's changes by up to a lease.
    let grace = interval
        + Duration::from_secs(5)
        + match std::env::var("BENCH_CHAOS") {
            Ok(c) if !c.is_empty() => Duration::from_secs(common::LEASE_SECS),
            _ => Duration::ZERO,
        };

    let ids: Vec<String> = (1..=n).map(|i| format!("acc-{i:05}")).collect();
    let bank = Arc::new(Bank::new(&ids));
    bank.half_interval_ms
        .store(interval.as_millis() as u64 / 2, Ordering::Relaxed);
    let bank_app = Router::new()
        .route("/accounts/{id}/balance", get(balance))
        .with_state(bank.clone());
    let bank_addr = common::serve(bank_app).await;

    let (rx, rx_addr) = common::balance_receiver().await;

    // No host quota would also do (an unconfigured host is unlimited); this
    // is what an operator would write for a bank that allows 2,000/s.
    let pg = common::BenchStore::from_env();
    let nodes = env_or("BENCH_NODES", 1).max(1) as usize;
    assert!(
        nodes == 1 || pg.is_some(),
        "BENCH_NODES needs BENCH_STORE=postgres"
    );
    let event = chaos::Event::from_env();
    assert!(
        event.is_none() || (pg.is_some() && (nodes >= 2 || event == Some(chaos::Event::Join))),
        "BENCH_CHAOS needs BENCH_STORE=postgres and BENCH_NODES >= 2"
    );
    let lease = Duration::from_secs(common::LEASE_SECS);
    let store = pg.as_ref().map(|p| p.yaml()).unwrap_or_default();
    // The bridge for a store and a list of accounts: the runs' own, and
    // the one-instance daemon's the per-instance cost is counted from.
    let bridge_with = |store: &str, list: &str| {
        format!(
            r#"state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{store}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{bank_addr}" }}
    for_each: {{ account: [{list}] }}
    schedule: every {secs}s
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://{rx_addr}/hook", secret: "{SECRET}", max_in_flight: 16 }}
hosts:
  "127.0.0.1:{port}": {{ rate: 2000/s, burst: 50, max_in_flight: 64 }}
"#,
            secs = interval.as_secs(),
            port = bank_addr.port(),
        )
    };
    let bridge = bridge_with(&store, &ids.join(", "));

    // The nodes' log filter (`POLLHOOK_LOG`): errors only unless
    // `BENCH_LOG` says otherwise (a defect's run, with debug lines).
    let log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "error".into());
    let started = Instant::now();
    let mut daemons = Vec::new();
    // Each node tells itself apart to the mock by its User-Agent.
    let bridge_of = |i: usize| format!("user_agent: \"pollhook-bench-node-{i}\"\n{bridge}");
    for i in 0..nodes {
        daemons.push(common::Daemon::start("bank-balance.yaml", &bridge_of(i), &log).await);
    }
    let pids: Vec<u32> = daemons.iter().map(|d| d.pid).collect();
    let pid = pids[0];
    let admin = daemons[0].admin.clone();
    let state_dir = state_dir_of(pid);
    // The bench must never leave a daemon running (Daemon has no Drop).
    let mut guards: Vec<KillOnDrop> = pids.iter().map(|p| KillOnDrop(*p)).collect();
    let size = || match &pg {
        Some(p) => p.size_bytes(),
        None => du(&state_dir).0,
    };

    // Warm-up: every instance's first (baseline) poll, then one interval
    // so that every instance polls from its own slot.
    let mut last_progress = (0u64, Instant::now());
    loop {
        let polled = bank.polled_once.load(Ordering::Relaxed);
        if polled as usize >= n {
            break;
        }
        if polled != last_progress.0 {
            last_progress = (polled, Instant::now());
        } else if last_progress.1.elapsed() > STALL {
            stalled(
                &format!(
                    "warm-up: {polled} of {n} instances polled once after {:.0}s, none for {}s",
                    started.elapsed().as_secs_f64(),
                    STALL.as_secs()
                ),
                pid,
                &admin,
                &bank,
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline = started.elapsed();
    let (cpu_warm, rss_warm) = proc_usage(pid);
    let commits_warm = pg.as_ref().map(|p| p.commits());
    tokio::time::sleep(interval).await;

    // The measured window.
    bank.record(true);
    let t0 = Instant::now();
    let (cpu0, _) = proc_usage(pid);
    let node_cpu0: Vec<f64> = pids.iter().map(|p| proc_usage(*p).0).collect();
    let commits0 = pg.as_ref().map(|p| p.commits());
    let pg0 = pg.as_ref().and_then(|p| p.counters());
    let (self_cpu0, _) = proc_usage(std::process::id());
    let req0 = bank.requests.load(Ordering::Relaxed);
    let nm0 = bank.not_modified.load(Ordering::Relaxed);
    let chaos = event.map(|event| {
        let p = pg.as_ref().unwrap();
        tokio::spawn(chaos::run(chaos::Plan {
            event,
            at: t0 + window / 3,
            t0,
            end: t0 + window,
            instances: n,
            lease,
            bank: bank.clone(),
            pids: pids.clone(),
            url: p.url.clone(),
            schema: p.schema.clone(),
            join_bridge: bridge_of(nodes),
        }))
    });
    let mut sampler = Sampler {
        sizes: vec![(0.0, size())],
        size: &size,
        last_req: req0,
        next: t0 + interval,
        interval,
        t0,
        pid,
        admin: &admin,
        bank: &bank,
    };

    let total = (per_interval as f64 * window.as_secs_f64() / interval.as_secs_f64()) as usize;
    let gap = window.div_f64(total.max(1) as f64);
    let mut made: Vec<((String, i64), Instant)> = Vec::with_capacity(total);
    let mut rng = rand::rng();
    let mut skipped = 0u64;
    for k in 0..total {
        let at = t0 + gap * k as u32;
        sampler.until(at).await;
        tokio::time::sleep_until(at.into()).await;
        let cents = 100_000 + k as i64;
        let acc = loop {
            let a = &ids[rng.random_range(0..n)];
            if bank.change(a, cents) {
                break a.clone();
            }
            skipped += 1;
        };
        made.push(((acc, cents), Instant::now()));
    }
    let t1 = t0 + window;
    sampler.until(t1).await;
    tokio::time::sleep_until(t1.into()).await;
    let mut chaos = match chaos {
        Some(c) => Some(c.await.expect("chaos watcher")),
        None => None,
    };
    if let Some(d) = chaos.as_mut().and_then(|c| c.joined.take()) {
        guards.push(KillOnDrop(d.pid));
        daemons.push(d);
    }
    bank.record(false);
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, rss_peak) = proc_usage(pid);
    let node_usage: Vec<(f64, u64, u64)> = pids
        .iter()
        .map(|p| {
            let (c, r) = proc_usage(*p);
            (c, r, rss_now(*p))
        })
        .collect();
    let commits = pg
        .as_ref()
        .zip(commits0)
        .map(|(p, c0)| p.commits().saturating_sub(c0));
    let _ = commits_warm;
    let pg1 = pg.as_ref().and_then(|p| p.counters());
    let rss_end = rss_now(pid);
    let (self_cpu1, _) = proc_usage(std::process::id());
    let requests = bank.requests.load(Ordering::Relaxed) - req0;
    let pg_run = pg0
        .zip(pg1)
        .map(|(a, b)| common::pg::PgRun::between(&a, &b, wall, requests));
    let not_modified = bank.not_modified.load(Ordering::Relaxed) - nm0;

    // The daemon's own view (fetched after the CPU sample: /status of
    // 10,000 instances is not free).
    let status = fetch_status(&admin).await.unwrap_or_default();
    // The dashboard at this size: the first page of instances, and one
    // source filtered to a state.
    let page_times = {
        let client = reqwest::Client::new();
        let mut out = Vec::new();
        for path in ["/", "/?state=failing", "/?page=50"] {
            let t = Instant::now();
            let bytes = match client.get(format!("http://{admin}{path}")).send().await {
                Ok(r) => r.bytes().await.map(|b| b.len()).unwrap_or(0),
                Err(_) => 0,
            };
            out.push((path, t.elapsed(), bytes));
        }
        out
    };

    // Grace: every change made must arrive.
    let grace_end = Instant::now() + grace;
    loop {
        let arrived = {
            let rx = rx.lock().unwrap();
            made.iter()
                .filter(|(k, _)| rx.arrivals.contains_key(k))
                .count()
        };
        if arrived == made.len() || Instant::now() >= grace_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tables = pg.as_ref().map(|p| p.tables()).unwrap_or_default();
    let (size_live, apparent_live) = match &pg {
        Some(p) => (p.size_bytes(), p.size_bytes()),
        None => du(&state_dir),
    };
    // As Daemon::stop, but keeping its temp dir until the store is measured,
    // and not forever.
    for d in &daemons {
        unsafe { libc::kill(d.pid as i32, libc::SIGTERM) };
    }
    let term = Instant::now();
    let exited = loop {
        if daemons
            .iter_mut()
            .all(|d| d.child.try_wait().ok().flatten().is_some())
        {
            break true;
        }
        if term.elapsed() > STALL {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let shutdown = term.elapsed();
    drop(guards);
    let (size_stopped, apparent_stopped) = match &pg {
        Some(p) => (p.size_bytes(), p.size_bytes()),
        None => du(&state_dir),
    };

    // What a daemon costs with one instance (the same bridge on sled, the
    // same machine, run now): the base the per-instance cost is counted
    // from. Its VmRSS after a few seconds at rest, after its first poll.
    let baseline_rss = {
        let one = bridge_with("", &ids[0]);
        let d = common::Daemon::start("bank-balance.yaml", &one, "error").await;
        let _guard = KillOnDrop(d.pid);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = rss_now(d.pid);
        d.stop();
        rss
    };

    // ------------------------------------------------------------- numbers
    let rx = rx.lock().unwrap();
    let mut lat: Vec<Duration> = made
        .iter()
        .filter_map(|(k, t)| rx.arrivals.get(k).map(|a| a.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    let missed = made.len() - lat.len();
    let beyond: Vec<Duration> = lat.iter().map(|l| l.saturating_sub(interval)).collect();
    let late = lat.iter().filter(|l| **l > interval + SLACK).count();
    let duplicates: u32 = rx.ids.values().map(|c| c - 1).sum();
    let unexpected = {
        let made_keys: std::collections::HashSet<&(String, i64)> =
            made.iter().map(|(k, _)| k).collect();
        rx.arrivals
            .keys()
            .filter(|k| !made_keys.contains(k))
            .count()
    };

    let accounts = bank.accounts.lock().unwrap();
    let mut max_gaps: Vec<Duration> = accounts.values().map(|a| a.max_gap).collect();
    max_gaps.sort();
    let min_gap = accounts
        .values()
        .map(|a| a.min_gap)
        .min()
        .unwrap_or_default();
    let under_two = accounts.values().filter(|a| a.win_polls < 2).count();
    let off_time = max_gaps.iter().filter(|g| **g > interval + SLACK).count();
    let on_time = n - off_time;

    let insts = status["instances"].as_object();
    let sum = |f: &str| -> u64 {
        insts
            .map(|m| m.values().map(|i| i[f].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0)
    };
    let max_eff = insts
        .and_then(|m| {
            m.values()
                .filter_map(|i| i["effective_interval_ms"].as_u64())
                .max()
        })
        .unwrap_or(0);

    let sizes = sampler.sizes;
    let growth = slope(&sizes); // bytes/s over the window
    let size_end = sizes.last().map(|s| s.1).unwrap_or(0);
    let cpu_share = (cpu1 - cpu0) / wall;

    println!(
        "scale benchmark: {n} instances of bank-balance every {}s, {per_interval} balance changes per interval, {seconds}s measured, {}",
        interval.as_secs(),
        match &pg {
            Some(_) => format!("{nodes} node(s) on PostgreSQL"),
            None => "one node on sled".to_string(),
        }
    );
    println!(
        "  warm-up: first poll of all {n} instances after {:.1}s (daemon {:.1} CPU s, peak RSS {:.1} MiB so far); window starts one interval later",
        baseline.as_secs_f64(),
        cpu_warm,
        rss_warm as f64 / 1024.0
    );
    println!(
        "  polls: {:.0}/s sustained ({requests} requests in {wall:.1}s, expected {:.0}/s; {:.1}% answered 304), daemon status: {} ok, {} failed",
        requests as f64 / wall,
        n as f64 / interval.as_secs_f64(),
        100.0 * not_modified as f64 / requests.max(1) as f64,
        sum("polls_ok"),
        sum("polls_failed"),
    );
    println!(
        "  changes: {} injected, {} arrived, {missed} missed (grace {}s after the window), duplicates {duplicates}, unexpected {unexpected}, other types {}, bad signatures {} ({skipped} picks re-drawn: account's last change not polled yet)",
        made.len(),
        lat.len(),
        grace.as_secs(),
        rx.other_types,
        rx.bad
    );
    println!(
        "  detection latency (change -> webhook arrival): p50 {:.2}s, p99 {:.2}s, max {:.2}s; beyond the {}s interval: p99 {:.2}s, max {:.2}s; later than interval + {}s: {late}",
        pct(&lat, 0.5).as_secs_f64(),
        pct(&lat, 0.99).as_secs_f64(),
        pct(&lat, 1.0).as_secs_f64(),
        interval.as_secs(),
        pct(&beyond, 0.99).as_secs_f64(),
        pct(&beyond, 1.0).as_secs_f64(),
        SLACK.as_secs()
    );
    println!(
        "  on time: {on_time}/{n} instances never waited more than interval + {}s between polls; largest gap per instance: p50 {:.2}s, p99 {:.2}s, max {:.2}s; smallest gap {:.2}s; polled < 2 times in the window: {under_two}; daemon's largest effective_interval_ms {max_eff}",
        SLACK.as_secs(),
        pct(&max_gaps, 0.5).as_secs_f64(),
        pct(&max_gaps, 0.99).as_secs_f64(),
        pct(&max_gaps, 1.0).as_secs_f64(),
        if min_gap == Duration::MAX { 0.0 } else { min_gap.as_secs_f64() },
    );
    // A few of the late instances: when their largest gap began (seconds
    // into the window) and which node polled them at its ends (`-`: none
    // until the window's end), so a lateness shows what it follows.
    let mut late_ones: Vec<(&String, &Account)> = accounts
        .iter()
        .filter(|(_, a)| a.max_gap > interval + SLACK)
        .collect();
    late_ones.sort_by_key(|(_, a)| a.max_gap_at.map(|(at, _, _)| at));
    for (id, a) in late_ones.iter().take(8) {
        if let Some((at, from, to)) = a.max_gap_at {
            let to = if to == u8::MAX {
                "-".to_string()
            } else {
                to.to_string()
            };
            println!(
                "  late: {id} waited {:.2}s from {:+.2}s (node {from} -> node {to})",
                a.max_gap.as_secs_f64(),
                at.saturating_duration_since(t0).as_secs_f64()
                    - t0.saturating_duration_since(at).as_secs_f64(),
            );
        }
    }
    println!(
        "  daemon: {:.1}% of one core over the window ({:.1} CPU s / {wall:.1} s), peak RSS {:.1} MiB (at the end {:.1} MiB); the bench process itself (mock + receiver): {:.1}% of one core",
        cpu_share * 100.0,
        cpu1 - cpu0,
        rss_peak as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        (self_cpu1 - self_cpu0) / wall * 100.0
    );
    // Per instance: the RSS at the end of the window above a one-instance
    // daemon's (`baseline_rss`), and the store's size after the grace
    // period; on several nodes, each node's RSS counts its share (so a
    // chaos run, whose shares move, does not print it).
    let share = n as f64 / daemons.len() as f64;
    let rss_per: Vec<f64> = node_usage
        .iter()
        .map(|(_, _, end)| end.saturating_sub(baseline_rss) as f64 * 1024.0 / share)
        .collect();
    if event.is_none() {
        println!(
            "  per instance: RSS {} bytes (each node's RSS at the end above a one-instance daemon's {:.1} MiB, over its share of {share:.0}), store {:.0} bytes ({:.1} MiB after the grace period over {n})",
            rss_per
                .iter()
                .map(|b| format!("{b:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            baseline_rss as f64 / 1024.0,
            size_live as f64 / n as f64,
            mib(size_live),
        );
    }
    if nodes > 1 || pg.is_some() {
        for (i, ((c1, peak, end), c0)) in node_usage.iter().zip(&node_cpu0).enumerate() {
            println!(
                "  node {i}: {:.1}% of one core, peak RSS {:.1} MiB (at the end {:.1} MiB)",
                (c1 - c0) / wall * 100.0,
                *peak as f64 / 1024.0,
                *end as f64 / 1024.0
            );
        }
    }
    if let Some(c) = commits {
        println!(
            "  PostgreSQL: {c} transactions committed in the window ({:.0}/s, every client of the database)",
            c as f64 / wall
        );
    }
    let per_node: Vec<u64> = bank.per_node[..daemons.len()]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let double_polls = bank.double_polls.load(Ordering::Relaxed);
    let early_polls = bank.early_polls.load(Ordering::Relaxed);
    println!(
        "  polls by node: in the window, double polls (another node within half an interval) {double_polls}, early polls (within half an interval, any node) {early_polls}; changes detected under two webhook ids {}, requests per node from the start {}",
        rx.under_two_ids,
        per_node
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/")
    );
    if let Some(c) = &chaos {
        for line in c.lines(n, interval, lease) {
            println!("{line}");
        }
    }
    if let Some(r) = &pg_run {
        println!("{}", r.line());
    } else if pg.is_some() {
        println!("  PostgreSQL itself: n/a (psql could not read the counters: is the server out of connections?)");
    }
    if pg.is_some() {
        println!("{}", common::pg::tables_line(&tables));
        println!("{}", common::pg::hot_line(&tables));
    }
    println!(
        "  dashboard (GET, {n} instances): {}",
        page_times
            .iter()
            .map(|(p, t, b)| format!(
                "{p} {:.0} ms ({:.0} KiB)",
                t.as_secs_f64() * 1000.0,
                *b as f64 / 1024.0
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  shutdown: {}",
        if exited {
            format!("SIGTERM -> exited in {:.2}s", shutdown.as_secs_f64())
        } else {
            format!(
                "did not exit within {}s of SIGTERM (killed)",
                STALL.as_secs()
            )
        }
    );
    println!(
        "  store (du of state_dir): {:.1} MiB at window start, {:.1} MiB at window end, {:.1} MiB after the grace period ({:.1} MiB apparent), {:.1} MiB after SIGTERM ({:.1} MiB apparent)",
        mib(sizes[0].1),
        mib(size_end),
        mib(size_live),
        mib(apparent_live),
        mib(size_stopped),
        mib(apparent_stopped)
    );
    println!(
        "  store samples each interval (s: MiB): {}",
        sizes
            .iter()
            .map(|(t, b)| format!("{t:.0}: {:.1}", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let lo = sizes.iter().map(|s| s.1).min().unwrap_or(0);
    let hi = sizes.iter().map(|s| s.1).max().unwrap_or(0);
    let trend = growth * wall;
    println!(
        "  store growth: trend {:+.1} MiB per hour (least-squares slope of the samples), i.e. {:+.1} MiB over the window, against {:.1} MiB between the smallest and largest sample (sled's files grow and shrink in steps as it reuses segments): {}; an hour of operation extrapolates to {:.1} MiB (end size + the trend when positive, for the rest of the hour).",
        growth * 3600.0 / (1024.0 * 1024.0),
        trend / (1024.0 * 1024.0),
        mib(hi - lo),
        if trend.abs() <= (hi - lo) as f64 {
            "the trend is within that noise; a longer BENCH_SECONDS gives a firmer figure"
        } else {
            "the trend exceeds that noise"
        },
        mib(size_end) + (growth.max(0.0) * (3600.0 - wall)) / (1024.0 * 1024.0),
    );
    let attempts = rx.ids.values().sum::<u32>() as f64;
    let per_s = made.len() as f64 / wall;
    println!(
        "    What bounds it: each instance's state is overwritten in place (one snapshot, no history); `detect: new` seen sets are bounded (seen_limit, default 10,000, and seen_ttl); delivered events leave the outbox; the delivery history keeps at most 10,000 attempts (store.history, default 7d): {attempts:.0} so far, at {per_s:.1}/s full after {:.0} min, after which it stops growing; the rest is sled's log, whose segments are reused as records are overwritten.",
        10_000.0 / per_s.max(0.001) / 60.0
    );

    let results = json!({
        "bench": "scale",
        "instances": n,
        "interval_s": interval.as_secs(),
        "changes_per_interval": per_interval,
        "seconds": seconds,
        "store": if pg.is_some() { "postgres" } else { "sled" },
        "nodes": nodes,
        "warmup_s": baseline.as_secs_f64(),
        "polls_per_s": requests as f64 / wall,
        "requests": requests,
        "not_modified_pct": 100.0 * not_modified as f64 / requests.max(1) as f64,
        "changes": {
            "injected": made.len(), "arrived": lat.len(), "missed": missed,
            "duplicates": duplicates, "unexpected": unexpected,
            "other_types": rx.other_types, "bad_signatures": rx.bad,
        },
        "latency_s": {
            "p50": pct(&lat, 0.5).as_secs_f64(), "p99": pct(&lat, 0.99).as_secs_f64(),
            "max": pct(&lat, 1.0).as_secs_f64(), "beyond_interval_p99": pct(&beyond, 0.99).as_secs_f64(),
            "late": late,
        },
        "on_time": on_time,
        "largest_gap_s": { "p50": pct(&max_gaps, 0.5).as_secs_f64(), "p99": pct(&max_gaps, 0.99).as_secs_f64(), "max": pct(&max_gaps, 1.0).as_secs_f64() },
        "under_two_polls": under_two,
        "daemon": {
            "cpu_pct_of_one_core": cpu_share * 100.0,
            "peak_rss_kib": rss_peak,
            "end_rss_kib": rss_end,
        },
        "nodes_usage": node_usage.iter().zip(&node_cpu0).map(|((c1, peak, end), c0)| json!({
            "cpu_pct_of_one_core": (c1 - c0) / wall * 100.0, "peak_rss_kib": peak, "end_rss_kib": end,
        })).collect::<Vec<_>>(),
        "double_polls": double_polls,
        "early_polls": early_polls,
        "changes_under_two_ids": rx.under_two_ids,
        "requests_per_node": per_node,
        "chaos": chaos.as_ref().map(|c| c.json()),
        "postgres": pg_run.as_ref().map(|r| r.json()),
        "postgres_tables": common::pg::tables_json(&tables),
        "dashboard_ms": page_times.iter().map(|(p, t, _)| (p.to_string(), json!(t.as_secs_f64() * 1000.0))).collect::<serde_json::Map<_, _>>(),
        "shutdown_s": exited.then_some(shutdown.as_secs_f64()),
        "per_instance": { "rss_bytes": rss_per, "baseline_rss_kib": baseline_rss, "store_bytes": size_live as f64 / n as f64 },
        "store_bytes": { "window_start": sizes[0].1, "window_end": size_end, "after_grace": size_live, "after_sigterm": size_stopped },
        "store_growth_mib_per_hour": growth * 3600.0 / (1024.0 * 1024.0),
    });
    let name = format!(
        "scale-{}-{nodes}n-{n}{}",
        if pg.is_some() { "postgres" } else { "sled" },
        event
            .map(|e| format!("-{e:?}").to_lowercase())
            .unwrap_or_default()
    );
    match common::write_results(&name, &results) {
        Ok(p) => println!("  results: {}", p.display()),
        Err(e) => println!("  results: not written ({e})"),
    }
}
