//! Commit benchmark (not a test: it measures and prints).
//!
//! What a poll's commit costs when the instance remembers a large listing:
//! `BENCH_IDS` seen ids (`detect: new`, default 10,000) or as many known
//! items of about 200 bytes (`detect: changes`), then `BENCH_POLLS`
//! (default 200) polls that each find one new item (and forget the
//! oldest), committed as a change (what the poller does) and, for
//! comparison, as a whole state. Prints the time per commit and how much
//! the store grew.
//!
//! `cargo bench --bench commit`; `BENCH_STORE=postgres` runs it on a fresh
//! schema of PostgreSQL (`BENCH_DATABASE_URL`).

mod common;

use std::time::Instant;

use common::{env_or, BenchStore};
use pollhook::store::{InstanceState, KnownItem, Store};

/// A state remembering `n` ids, as `new` or as `changes` keeps them.
fn state(n: usize, changes: bool) -> InstanceState {
    let mut s = InstanceState {
        initialized: true,
        cursor: Some("2026-12-01T00:00:00Z".into()),
        ..Default::default()
    };
    for i in 0..n {
        push(&mut s, i, changes);
    }
    s
}

fn push(s: &mut InstanceState, i: usize, changes: bool) {
    let id = format!("txn-{i:08}");
    if changes {
        let item = serde_json::json!({
            "id": id, "amount": i, "currency": "EUR",
            "description": "x".repeat(120),
        });
        let version = format!("{i}");
        s.known.insert(id, KnownItem { version, item });
    } else {
        s.seen.push_back(id);
        s.seen_at.push_back(1_700_000_000_000 + i as i64);
    }
}

/// The next poll's state: one new item, the oldest one gone.
fn next(prev: &InstanceState, i: usize, n: usize, changes: bool) -> InstanceState {
    let mut s = prev.clone();
    push(&mut s, i, changes);
    if changes {
        s.known.remove(&format!("txn-{:08}", i - n));
    } else {
        s.seen.pop_front();
        s.seen_at.pop_front();
    }
    s.sequence += 1;
    s
}

async fn open(pg: &Option<BenchStore>, dir: &std::path::Path) -> Store {
    match pg {
        Some(b) => Store::open_postgres(&b.url, &b.schema).await.unwrap(),
        None => Store::open(dir).unwrap(),
    }
}

fn size(pg: &Option<BenchStore>, dir: &std::path::Path) -> u64 {
    match pg {
        Some(b) => b.size_bytes(),
        None => walk(dir),
    }
}

fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n = env_or("BENCH_IDS", 10_000) as usize;
    let polls = env_or("BENCH_POLLS", 200) as usize;
    let backend = if std::env::var("BENCH_STORE").as_deref() == Ok("postgres") {
        "postgres"
    } else {
        "sled"
    };
    println!("commit bench: {backend}, {n} ids remembered, {polls} polls finding one new item");
    for changes in [false, true] {
        for whole in [false, true] {
            let pg = BenchStore::from_env();
            let dir = tempfile::tempdir().unwrap();
            let store = open(&pg, dir.path()).await;
            let mut prev = state(n, changes);
            let inst = "bench/acc";
            store.commit_poll(inst, &prev, &[]).await.unwrap();
            store.flush().await.unwrap();
            let before = size(&pg, dir.path());
            // Only the commits are timed (not building the next state).
            let mut took = std::time::Duration::ZERO;
            for p in 0..polls {
                let s = next(&prev, n + p, n, changes);
                let started = Instant::now();
                if whole {
                    store.commit_poll(inst, &s, &[]).await.unwrap();
                } else {
                    store
                        .commit_fenced(inst, &prev, &s, &[], None)
                        .await
                        .unwrap();
                }
                took += started.elapsed();
                prev = s;
            }
            store.flush().await.unwrap();
            let grew = size(&pg, dir.path()).saturating_sub(before);
            assert_eq!(
                store.load_state(inst).await.unwrap().sequence,
                prev.sequence
            );
            println!(
                "  {:8} written {:6}: {:7.2} ms/commit, store grew {:7.1} KiB/commit",
                if changes { "changes" } else { "new" },
                if whole { "whole" } else { "change" },
                took.as_secs_f64() * 1000.0 / polls as f64,
                grew as f64 / 1024.0 / polls as f64
            );
        }
    }
}
