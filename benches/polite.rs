//! Polite polling benchmark (not a test: it measures and prints).
//!
//! 50 bank accounts polled every 1 s by the real binary against the mock
//! bank, which changes 100 balances at random over 60 s and itself refuses
//! more than `BENCH_BANK_LIMIT` (default 45) requests per second with
//! `429 + Retry-After: 1`. Run twice: without a host quota (pollhook asks
//! for 50/s and must learn the bank's limit from its 429s), and with
//! `hosts: { rate: 40/s }`. Reports changes detected, duplicates, detection
//! latency p50/p99, requests per change, 429s received, the largest
//! 1-second request window, and the daemon's CPU seconds and peak RSS.
//!
//! `cargo bench --bench polite` (env: BENCH_ACCOUNTS, BENCH_SECONDS,
//! BENCH_CHANGES, BENCH_BANK_LIMIT).

#[path = "../examples/mock-bank/bank.rs"]
mod bank;
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{env_or, max_per_second, pct, proc_usage, SECRET};
use rand::Rng;

async fn run(quota: Option<u32>) {
    let accounts = env_or("BENCH_ACCOUNTS", 50) as usize;
    let seconds = env_or("BENCH_SECONDS", 60);
    let changes = env_or("BENCH_CHANGES", 100) as usize;
    let limit = env_or("BENCH_BANK_LIMIT", 45) as u32;

    let ids: Vec<String> = (1..=accounts).map(|i| format!("acc-{i:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let bank = bank::Bank::new(&refs).with_limit(limit);
    let bank_addr = bank.serve("127.0.0.1:0").await;

    let (rx, rx_addr) = common::balance_receiver().await;

    let hosts = match quota {
        Some(q) => format!(
            "hosts:\n  \"127.0.0.1:{}\": {{ rate: {q}/s, burst: 1 }}",
            bank_addr.port()
        ),
        None => String::new(),
    };
    let bridge = format!(
        r#"state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{bank_addr}" }}
    for_each: {{ account: [{list}] }}
    schedule: every 1s
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://{rx_addr}/hook", secret: "{SECRET}", max_in_flight: 16 }}
{hosts}
"#,
        list = ids.join(", ")
    );

    let daemon = common::Daemon::start("bank-balance.yaml", &bridge, "error").await;
    let pid = daemon.pid;
    // Baselines.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, _) = proc_usage(pid);
    let req0 = bank.request_times().len();
    let refused0 = bank.refused();

    // 100 changes spread over the run, each to an account not changed in
    // the last 3 s (a change shorter than a poll interval cannot be seen
    // by any poller), each to a balance never used before.
    let mut made: Vec<((String, i64), Instant)> = Vec::new();
    let mut last_change: HashMap<String, Instant> = HashMap::new();
    let start = Instant::now();
    let gap = Duration::from_secs(seconds).div_f64(changes as f64);
    let mut rng = rand::rng();
    for k in 0..changes {
        tokio::time::sleep_until((start + gap * k as u32).into()).await;
        let acc = loop {
            let a = &ids[rng.random_range(0..ids.len())];
            if last_change
                .get(a)
                .is_none_or(|t| t.elapsed() > Duration::from_secs(3))
            {
                break a.clone();
            }
        };
        let cents = 100_000 + k as i64;
        bank.set_balance(&acc, cents);
        last_change.insert(acc.clone(), Instant::now());
        made.push(((acc, cents), Instant::now()));
    }
    let feed_end = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = {
            let rx = rx.lock().unwrap();
            made.iter()
                .filter(|(k, _)| rx.arrivals.contains_key(k))
                .count()
        };
        if n == made.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cpu1, rss) = proc_usage(pid);
    let times = bank.request_times();
    daemon.stop();

    let rx = rx.lock().unwrap();
    let mut lat: Vec<Duration> = made
        .iter()
        .filter_map(|(k, t)| rx.arrivals.get(k).map(|a| a.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    let detected = lat.len();
    let duplicates: u32 = rx.ids.values().map(|n| n - 1).sum();
    let requests = times.len() - req0;
    let during: Vec<Instant> = times[req0..].to_vec();
    let wall = feed_end.duration_since(start).as_secs_f64();
    println!(
        "polite benchmark, {}: {accounts} accounts every 1s, {changes} balance changes over {seconds}s, bank refuses above {limit}/s",
        match quota {
            Some(q) => format!("host quota {q}/s"),
            None => "no host quota".to_string(),
        }
    );
    println!(
        "  changes detected {detected}/{}, duplicates {duplicates}, bad signatures {}",
        made.len(),
        rx.bad
    );
    println!(
        "  detection latency (change -> webhook arrival): p50 {:?}, p99 {:?}, max {:?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "  requests {requests} ({:.1}/s, {:.1} per change), 429s received {}, largest 1-second window {}",
        requests as f64 / (wall + 30.0f64.min(feed_end.elapsed().as_secs_f64())),
        requests as f64 / made.len() as f64,
        bank.refused() - refused0,
        max_per_second(&during)
    );
    println!(
        "  daemon: {:.2} CPU seconds, peak RSS {:.1} MiB",
        cpu1 - cpu0,
        rss as f64 / 1024.0
    );
}

#[tokio::main]
async fn main() {
    run(None).await;
    run(Some(40)).await;
}
