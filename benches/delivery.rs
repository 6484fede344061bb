//! Delivery benchmark (not a test: it measures and prints).
//!
//! Durable delivery throughput out of a deep outbox: the receiver is down
//! (503) while `BENCH_EVENTS` transactions (default 20,000) are booked over
//! `BENCH_ACCOUNTS` accounts (default 20) and detected into the outbox; then
//! it comes back and the benchmark times the drain (signing, HTTP, outbox
//! removal), checking every event arrived, verified, once or more with one
//! id. Also prints the daemon's CPU seconds and peak RSS.
//!
//! `cargo bench --bench delivery`; `BENCH_STORE=postgres` runs it on a
//! fresh schema of PostgreSQL (`BENCH_DATABASE_URL`).

#[path = "../examples/mock-bank/bank.rs"]
mod bank;
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::{env_or, proc_usage};

use common::SECRET;

struct Rx {
    verifier: standardwebhooks::Webhook,
    up: AtomicBool,
    ids: Mutex<HashSet<String>>,
    deliveries: Mutex<u64>,
    bad: Mutex<u64>,
}

async fn receive(State(rx): State<Arc<Rx>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !rx.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if rx.verifier.verify(&body, &headers).is_err() {
        *rx.bad.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    *rx.deliveries.lock().unwrap() += 1;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if let Some(id) = v["data"]["id"].as_str() {
        rx.ids.lock().unwrap().insert(id.to_string());
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() {
    let accounts = env_or("BENCH_ACCOUNTS", 20) as usize;
    let events = env_or("BENCH_EVENTS", 20_000) as usize;
    let ids: Vec<String> = (1..=accounts).map(|i| format!("acc-{i:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let bank = bank::Bank::new(&refs);
    let bank_addr = bank.serve("127.0.0.1:0").await;

    let rx = Arc::new(Rx {
        verifier: standardwebhooks::Webhook::new(SECRET).unwrap(),
        up: AtomicBool::new(false),
        ids: Mutex::new(HashSet::new()),
        deliveries: Mutex::new(0),
        bad: Mutex::new(0),
    });
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(rx.clone());
    let rx_addr = common::serve(app).await;

    let pg = common::BenchStore::from_env();
    let store = pg.as_ref().map(|p| p.yaml()).unwrap_or_default();
    let bridge = format!(
        r#"state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{store}
sources:
  transactions:
    connector: bank-transactions
    with: {{ base_url: "http://{bank_addr}" }}
    for_each: {{ account: [{list}] }}
    schedule: every 200ms
    deliver_to: [agent]
endpoints:
  agent:
    url: "http://{rx_addr}/hook"
    secret: "{SECRET}"
    max_in_flight: 16
    retry: {{ schedule: [200ms], max_attempts: 1000 }}
    circuit: {{ failures: 1000000 }}
"#,
        list = ids.join(", ")
    );

    let daemon = common::Daemon::start("bank-transactions.yaml", &bridge, "error").await;
    let pid = daemon.pid;
    let admin = daemon.admin.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The receiver is down while the outbox fills.
    let mut booked = Vec::with_capacity(events);
    let per = events / accounts;
    for acc in &ids {
        let amounts: Vec<i64> = (0..per as i64).map(|i| -(1 + i % 500)).collect();
        booked.extend(bank.book(acc, &amounts));
    }
    let fill = Instant::now();
    let depth = loop {
        let s: serde_json::Value = serde_json::from_slice(
            &reqwest::get(format!("http://{admin}/status"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        let d = s["endpoints"]["agent"]["queue_depth"].as_u64().unwrap_or(0) as usize;
        if d >= booked.len() || fill.elapsed() > Duration::from_secs(120) {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (cpu0, _) = proc_usage(pid);
    let commits0 = pg.as_ref().map(|p| p.commits());
    // Back up: time the drain.
    rx.up.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while rx.ids.lock().unwrap().len() < booked.len() && start.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = start.elapsed().as_secs_f64();
    let (cpu1, rss) = proc_usage(pid);
    let commits = pg.as_ref().zip(commits0).map(|(p, c0)| p.commits() - c0);
    daemon.stop();

    let got = rx.ids.lock().unwrap().len();
    println!(
        "delivery benchmark: {} events in the outbox ({accounts} instances) on {}, receiver down then up",
        depth,
        if pg.is_some() { "PostgreSQL" } else { "sled" }
    );
    println!(
        "  delivered {got}/{} distinct ({} deliveries, bad signatures {}) in {drain:.2}s: {:.0} events/s out of a deep outbox",
        booked.len(),
        rx.deliveries.lock().unwrap(),
        rx.bad.lock().unwrap(),
        got as f64 / drain
    );
    println!(
        "  daemon during the drain: {:.2} CPU seconds, peak RSS {:.1} MiB",
        cpu1 - cpu0,
        rss as f64 / 1024.0
    );
    if let Some(c) = commits {
        println!(
            "  PostgreSQL transactions during the drain: {c} ({:.0}/s)",
            c as f64 / drain
        );
    }
}
