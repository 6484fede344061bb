//! End-to-end benchmark of the bank example (not a test: it measures).
//!
//! Starts the mock bank and a verifying receiver in-process, runs the real
//! `pollhook` binary against them with N accounts polled every 250ms, books
//! transactions at a fixed rate for a while, and reports:
//! events/s delivered (poll → detect → durable outbox → sign → HTTP),
//! detection-to-delivery latency p50/p99 (booking time → arrival), and the
//! daemon's CPU seconds and peak RSS (from /proc).
//!
//! `cargo bench --bench bank` (env: BENCH_ACCOUNTS, BENCH_SECONDS, BENCH_RATE).

#[path = "../examples/mock-bank/bank.rs"]
mod bank;
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_or, pct, proc_usage};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

use common::SECRET;

struct Rx {
    verifier: standardwebhooks::Webhook,
    arrivals: HashMap<String, Instant>,
    bad: u64,
}

async fn receive(State(rx): State<Arc<Mutex<Rx>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut rx = rx.lock().unwrap();
    if rx.verifier.verify(&body, &headers).is_err() {
        rx.bad += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if let Some(id) = v["data"]["id"].as_str() {
        rx.arrivals
            .entry(id.to_string())
            .or_insert_with(Instant::now);
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() {
    let accounts = env_or("BENCH_ACCOUNTS", 20) as usize;
    let seconds = env_or("BENCH_SECONDS", 20);
    let rate = env_or("BENCH_RATE", 400); // transactions booked per second, in all

    let ids: Vec<String> = (1..=accounts).map(|i| format!("acc-{i:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let bank = bank::Bank::new(&refs);
    let bank_addr = bank.serve("127.0.0.1:0").await;

    let rx = Arc::new(Mutex::new(Rx {
        verifier: standardwebhooks::Webhook::new(SECRET).unwrap(),
        arrivals: HashMap::new(),
        bad: 0,
    }));
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(rx.clone());
    let rx_addr = common::serve(app).await;

    let list = ids.join(", ");
    let bridge = format!(
        r#"state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  transactions:
    connector: bank-transactions
    with: {{ base_url: "http://{bank_addr}" }}
    for_each: {{ account: [{list}] }}
    schedule: every 250ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://{rx_addr}/hook", secret: "{SECRET}", max_in_flight: 16 }}
"#
    );

    let daemon = common::Daemon::start("bank-transactions.yaml", &bridge, "warn").await;
    let pid = daemon.pid;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (cpu0, _) = proc_usage(pid);

    let mut booked: HashMap<String, Instant> = HashMap::new();
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0) as usize;
    let mut n = 0usize;
    let mut interval = tokio::time::interval(tick);
    while start.elapsed() < Duration::from_secs(seconds) {
        interval.tick().await;
        for _ in 0..per_tick {
            let acc = &ids[n % ids.len()];
            n += 1;
            for id in bank.book(acc, &[-1]) {
                booked.insert(id, Instant::now());
            }
        }
    }
    let feed_end = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.lock().unwrap().arrivals.len() < booked.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = Instant::now();
    let (cpu1, rss) = proc_usage(pid);
    daemon.stop();

    let rx = rx.lock().unwrap();
    let mut lat: Vec<Duration> = booked
        .iter()
        .filter_map(|(id, t)| rx.arrivals.get(id).map(|a| a.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    let delivered = lat.len();
    let wall = done.duration_since(start).as_secs_f64();
    println!("bank benchmark: {accounts} accounts polled every 250ms, {rate} transactions/s booked for {seconds}s");
    println!(
        "  booked {}, delivered {} ({} missing), bad signatures {}",
        booked.len(),
        delivered,
        booked.len() - delivered,
        rx.bad
    );
    println!(
        "  throughput: {:.0} events/s delivered end to end (drain after feed: {:.2}s)",
        delivered as f64 / wall,
        done.duration_since(feed_end).as_secs_f64()
    );
    println!("  latency booking -> arrival: p50 {:?}, p99 {:?}, max {:?}  (includes up to one 250ms poll interval)", pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0));
    println!(
        "  daemon: {:.2} CPU seconds ({:.0}% of a core over the run), peak RSS {:.1} MiB",
        cpu1 - cpu0,
        (cpu1 - cpu0) / wall * 100.0,
        rss as f64 / 1024.0
    );
}
