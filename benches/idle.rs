//! The daemon's everyday cost (not a test: it measures): the bank example's
//! shape at rest, 50 balances polled every second with a change now and
//! then. Reports the daemon's share of one core and its peak RSS, the
//! requests in the busiest 1-second window from the very start (first
//! polls included: the target is N/T + 1), and the changes delivered.
//!
//! `cargo bench --bench idle` (env: BENCH_ACCOUNTS, BENCH_SECONDS, and
//! BENCH_CHANGE_EVERY_MS, default 2000: a change every 20 ms makes every
//! poll deliver, which fills the delivery history 25 times as fast). Once
//! a minute, and at the end, it prints the resident size split into its
//! anonymous part (heap, stacks: what the daemon holds) and its
//! file-backed part (code and data mapped from the binary).
//!
//! Beside the daemon (unless BENCH_FLOOR=0) it runs the floor: the same
//! polls from a bare client (`floor_client`), measured over the same
//! window, and prints the daemon's own cost as the difference.
//! BENCH_FLOOR_GRID_MS (floor client only) moves the floor's polls onto
//! a grid of that step, to see what polls sharing a wake-up would save.

#[path = "../examples/mock-bank/bank.rs"]
mod bank;
mod common;

use std::time::{Duration, Instant};

use common::{env_or, max_per_second, proc_usage, SECRET};

fn main() {
    // The floor's client, when this binary runs as it (see `floor_client`).
    if let Ok(addr) = std::env::var("BENCH_FLOOR_CLIENT") {
        return floor_client(&addr);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    let accounts = env_or("BENCH_ACCOUNTS", 50) as usize;
    let seconds = env_or("BENCH_SECONDS", 60);
    let change_every = Duration::from_millis(env_or("BENCH_CHANGE_EVERY_MS", 2000));

    let ids: Vec<String> = (1..=accounts).map(|i| format!("acc-{i:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let bank = bank::Bank::new(&refs);
    let bank_addr = bank.serve("127.0.0.1:0").await;
    let (rx, rx_addr) = common::balance_receiver().await;
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
  agent: {{ url: "http://{rx_addr}/hook", secret: "{SECRET}" }}
"#,
        list = ids.join(", ")
    );
    let daemon = common::Daemon::start("bank-balance.yaml", &bridge, "error").await;
    let pid = daemon.pid;
    // Beside it, unless `BENCH_FLOOR=0`: the same polls, to a bank of
    // their own, from the least program that makes them (see
    // `floor_client`), measured over the same window. The machine's cost
    // of a wake-up and of loopback TCP differs from hour to hour on a
    // shared host by more than the daemon's own work; the difference
    // between the two is the daemon's own.
    let floor = if std::env::var("BENCH_FLOOR").as_deref() != Ok("0") {
        let bank = bank::Bank::new(&refs);
        let addr = bank.serve("127.0.0.1:0").await;
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("BENCH_FLOOR_CLIENT", addr.to_string())
            .env("BENCH_ACCOUNTS", accounts.to_string())
            .spawn()
            .unwrap();
        Some((bank, child))
    } else {
        None
    };
    // The first polls, then the steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, _) = proc_usage(pid);
    let floor0 = floor.as_ref().map(|(_, c)| proc_usage(c.id()).0);
    let start = Instant::now();
    let mut changes = 0;
    let mut minutes = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(change_every).await;
        let acc = &ids[changes % ids.len()];
        bank.set_balance(acc, 100_000 + changes as i64);
        if let Some((floor_bank, _)) = &floor {
            floor_bank.set_balance(acc, 100_000 + changes as i64);
        }
        changes += 1;
        if start.elapsed() >= Duration::from_secs(60 * (minutes + 1)) {
            minutes += 1;
            println!("  at {:>3} min: {}", minutes, resident(pid));
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu1, rss) = proc_usage(pid);
    let daemon_cpu = (cpu1 - cpu0) / wall * 100.0;
    let floor_cpu = floor
        .as_ref()
        .zip(floor0)
        .map(|((_, c), f0)| (proc_usage(c.id()).0 - f0) / wall * 100.0);
    let at_end = resident(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let times = bank.request_times();
    let paths = bank.requests();
    daemon.stop();
    let floor_requests = floor.map(|(bank, mut child)| {
        let _ = child.kill();
        let _ = child.wait();
        bank.request_times().len()
    });
    let delivered = rx.lock().unwrap().arrivals.len();
    println!(
        "idle benchmark: {accounts} accounts every 1s, one change every {change_every:?}, {seconds}s measured"
    );
    println!(
        "  daemon: {:.2}% of one core, peak RSS {:.1} MiB",
        daemon_cpu,
        rss as f64 / 1024.0
    );
    if let (Some(f), Some(n)) = (floor_cpu, floor_requests) {
        println!(
            "  floor (the same polls from the least client, same window): {f:.2}% of one core, {n} requests; the daemon's own: {:.2} points",
            daemon_cpu - f
        );
    }
    println!(
        "  requests {} ; busiest 1-second window from the start {} (target N/T + 1 = {})",
        times.len(),
        max_per_second(&times),
        accounts + 1
    );
    println!("  changes delivered {delivered}/{changes}");
    println!("  at the end: {at_end}");
    println!("  {}", busiest_window(&times, &paths));
}

/// The resident size now, and its anonymous and file-backed parts.
fn resident(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    format!(
        "RSS {:.1} MiB (anonymous {:.1}, file-backed {:.1})",
        kib("VmRSS:") / 1024.0,
        kib("RssAnon:") / 1024.0,
        kib("RssFile:") / 1024.0
    )
}

/// Where the busiest second is (from the first request) and which
/// instances it holds twice, with their two requests' offsets: the
/// instances that make it exceed one request each.
fn busiest_window(times: &[Instant], paths: &[String]) -> String {
    let Some(first) = times.first() else {
        return "busiest window: no requests".into();
    };
    let (mut best, mut at, mut j) = (0, 0, 0);
    for i in 0..times.len() {
        while j < times.len() && times[j] < times[i] + Duration::from_secs(1) {
            j += 1;
        }
        if j - i > best {
            (best, at) = (j - i, i);
        }
    }
    let mut seen: std::collections::HashMap<&str, Vec<Instant>> = Default::default();
    for k in at..at + best {
        seen.entry(paths[k].as_str()).or_default().push(times[k]);
    }
    let ms = |t: &Instant| (*t - *first).as_secs_f64() * 1000.0;
    let twice: Vec<String> = seen
        .iter()
        .filter(|(_, t)| t.len() > 1)
        .map(|(p, t)| {
            let offs: Vec<String> = t.iter().map(|t| format!("{:.0}", ms(t))).collect();
            format!("{p} at {} ms", offs.join(" and "))
        })
        .collect();
    format!(
        "busiest window: {best} requests from {:.0} ms after the first request; instances in it twice: {}",
        ms(&times[at]),
        if twice.is_empty() { "none".to_string() } else { twice.join(", ") }
    )
}

/// The floor: the same conditional GETs as the daemon makes (each account
/// once a second, spread over the second, `If-None-Match` with the last
/// `ETag`, the body read), from a reqwest client of the daemon's features
/// on a runtime of the daemon's shape, and nothing else: no store, no
/// detection, no status, no delivery. What the daemon costs beyond it is
/// its own; what it costs is the HTTP stack's and the machine's, which
/// differ from day to day on a shared machine (README, "Benchmarks").
fn floor_client(addr: &str) {
    let accounts = env_or("BENCH_ACCOUNTS", 50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .user_agent("pollhook-floor")
            .build()
            .unwrap();
        let start = tokio::time::Instant::now();
        let grid = env_or("BENCH_FLOOR_GRID_MS", 1).max(1);
        let mut tasks = Vec::new();
        for i in 1..=accounts {
            let client = client.clone();
            let url = format!("http://{addr}/accounts/acc-{i:04}/balance");
            let phase = Duration::from_millis((1000 * (i - 1) / accounts).div_ceil(grid) * grid);
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval_at(start + phase, Duration::from_secs(1));
                let mut etag: Option<String> = None;
                loop {
                    every.tick().await;
                    let mut req = client.get(&url);
                    if let Some(t) = &etag {
                        req = req.header("if-none-match", t.as_str());
                    }
                    let Ok(resp) = req.send().await else { continue };
                    if let Some(t) = resp.headers().get("etag").and_then(|v| v.to_str().ok()) {
                        etag = Some(t.to_string());
                    }
                    let _ = resp.bytes().await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
