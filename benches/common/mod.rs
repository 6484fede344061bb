//! Helpers shared by the benchmarks.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

pub mod pg;

/// The agent's signing secret in every bench.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (utime+stime seconds, peak RSS KiB) of a process.
pub fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The most requests in any 1-second window.
pub fn max_per_second(times: &[Instant]) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while j < times.len() && times[j] < times[i] + Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

/// Serves `app` on a free port of 127.0.0.1 in the background.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The daemon binary: the one cargo built beside the bench, or
/// `BENCH_DAEMON_BIN` (another build of it, such as a release build with
/// other profile settings, to compare builds under one harness).
pub fn daemon_bin() -> std::path::PathBuf {
    std::env::var_os("BENCH_DAEMON_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_pollhook").into())
}

/// Writes a run's results as pretty JSON to `bench/<name>.json` in the
/// target directory this bench was built in (found from the bench's own
/// path, `<target>/<profile>/deps/<bench>`), and returns the path.
pub fn write_results(name: &str, value: &serde_json::Value) -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(3)
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    Ok(path)
}

/// The real `pollhook run` on a temp dir holding `bridge` and one of the
/// repository's connector files.
pub struct Daemon {
    pub child: std::process::Child,
    pub pid: u32,
    /// The admin server's `host:port`.
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon and waits for its admin server (`admin.listen`
    /// must be set in `bridge`).
    pub async fn start(connector: &str, bridge: &str, log: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir(dir.path().join("connectors")).unwrap();
        std::fs::copy(
            root.join("connectors").join(connector),
            dir.path().join("connectors").join(connector),
        )
        .unwrap();
        std::fs::write(dir.path().join("bridge.yaml"), bridge).unwrap();
        let child = std::process::Command::new(daemon_bin())
            .arg("--config")
            .arg(dir.path().join("bridge.yaml"))
            .arg("run")
            .env("POLLHOOK_LOG", log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr_file = dir.path().join("state/admin.addr");
        while !addr_file.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Daemon {
            pid: child.id(),
            child,
            admin: std::fs::read_to_string(&addr_file).unwrap(),
            _dir: dir,
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// What the balance benches' receiver saw.
#[derive(Default)]
pub struct BalanceRx {
    /// (instance, balance in cents) → first arrival.
    pub arrivals: HashMap<(String, i64), Instant>,
    /// webhook-id → deliveries accepted.
    pub ids: HashMap<String, u32>,
    /// Verified events of another type than `bank.balance.changed`.
    pub other_types: u64,
    pub bad: u64,
    /// (instance, balance in cents) → the webhook id it first came with.
    pub change_ids: HashMap<(String, i64), String>,
    /// Arrivals of a change already seen under another webhook id: the
    /// same change detected twice (by two nodes, say), not a redelivery.
    pub under_two_ids: u64,
}

/// An agent on 127.0.0.1 that verifies every webhook with the reference
/// verifier and records when each balance change first arrived.
pub async fn balance_receiver() -> (Arc<Mutex<BalanceRx>>, std::net::SocketAddr) {
    let rx = Arc::new(Mutex::new(BalanceRx::default()));
    let verifier = Arc::new(standardwebhooks::Webhook::new(SECRET).unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive_balance))
        .with_state((rx.clone(), verifier));
    (rx, serve(app).await)
}

async fn receive_balance(
    State((rx, v)): State<(Arc<Mutex<BalanceRx>>, Arc<standardwebhooks::Webhook>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    let mut rx = rx.lock().unwrap();
    if v.verify(&body, &headers).is_err() {
        rx.bad += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = headers["webhook-id"].to_str().unwrap().to_string();
    *rx.ids.entry(id.clone()).or_default() += 1;
    if e["type"] == "bank.balance.changed" {
        let cents = (e["data"]["current"]["available"].as_f64().unwrap() * 100.0).round() as i64;
        let inst = e["instance"].as_str().unwrap().to_string();
        let first = rx
            .change_ids
            .entry((inst.clone(), cents))
            .or_insert(id.clone());
        if *first != id {
            rx.under_two_ids += 1;
        }
        rx.arrivals.entry((inst, cents)).or_insert(now);
    } else {
        rx.other_types += 1;
    }
    StatusCode::NO_CONTENT
}

/// The cluster's lease period in the PostgreSQL benches, seconds.
pub const LEASE_SECS: u64 = 15;

/// `BENCH_STORE=postgres`: the daemons share a fresh schema of the
/// PostgreSQL server at `BENCH_DATABASE_URL` (default the test server's),
/// dropped when this goes. Sizes and counts are read with `psql`.
pub struct BenchStore {
    pub url: String,
    pub schema: String,
}

impl BenchStore {
    pub fn from_env() -> Option<BenchStore> {
        if std::env::var("BENCH_STORE").ok()?.as_str() != "postgres" {
            return None;
        }
        let url = std::env::var("BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("pollhook_bench_{:08x}", rand::random::<u32>());
        Some(BenchStore { url, schema })
    }

    /// The `store:` line of the bridge.
    pub fn yaml(&self) -> String {
        format!(
            "store: {{ backend: postgres, url: \"{}\", schema: {}, lease: {LEASE_SECS}s }}\n",
            self.url, self.schema
        )
    }

    fn psql(&self, sql: &str) -> String {
        let out = std::process::Command::new("psql")
            .arg(&self.url)
            .args(["-Atc", sql])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Bytes of the schema's tables and indexes.
    pub fn size_bytes(&self) -> u64 {
        self.psql(&format!(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{}' AND c.relkind = 'r'",
            self.schema
        ))
        .parse()
        .unwrap_or(0)
    }

    /// Transactions committed in the database so far (every client's).
    pub fn commits(&self) -> u64 {
        self.psql("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for BenchStore {
    fn drop(&mut self) {
        self.psql(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ));
    }
}
