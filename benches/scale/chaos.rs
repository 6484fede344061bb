//! `BENCH_CHAOS=kill|join|drain`: one membership event a third into the
//! measured window of a PostgreSQL cluster run, and what it costs.
//!
//! - `kill`: SIGKILL the last node. Its instances (those it polled last,
//!   seen by the mock from each node's `User-Agent`) must be polled by
//!   another node within one lease period (the takeover time).
//! - `join`: start one more node. Within two lease periods every node
//!   should hold its fair share of the leases ±10%, without a burst of
//!   early polls (the busiest second after the join is reported against
//!   instances / interval).
//! - `drain`: SIGTERM the last node. It should hand its leases over before
//!   it exits (leases still held by it after its exit are reported) and
//!   its instances be polled by the others at once.
//!
//! Lost changes, changes delivered under two webhook ids and double polls
//! (two nodes polling an instance within half an interval) are counted
//! over the whole run by the mock and the receiver; this module watches
//! the event itself and samples the lease table's distribution.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::Daemon;
use crate::Bank;

/// The membership event of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Kill,
    Join,
    Drain,
}

impl Event {
    /// `BENCH_CHAOS`, if set.
    pub fn from_env() -> Option<Event> {
        match std::env::var("BENCH_CHAOS").ok()?.as_str() {
            "kill" => Some(Event::Kill),
            "join" => Some(Event::Join),
            "drain" => Some(Event::Drain),
            "" => None,
            other => panic!("BENCH_CHAOS={other}: expected kill, join or drain"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Event::Kill => "kill",
            Event::Join => "join",
            Event::Drain => "drain",
        }
    }
}

/// Where and when the event happens, and what the watcher needs.
pub struct Plan {
    pub event: Event,
    /// The event's time (a third into the measured window).
    pub at: Instant,
    /// The measured window's start and end.
    pub t0: Instant,
    pub end: Instant,
    pub instances: usize,
    pub lease: Duration,
    pub bank: Arc<Bank>,
    /// The running nodes' pids, node `i` at index `i`.
    pub pids: Vec<u32>,
    pub url: String,
    pub schema: String,
    /// For `join`: the new node's bridge file.
    pub join_bridge: String,
}

/// What the event cost.
pub struct Report {
    pub event: Event,
    pub at_s: f64,
    /// The node killed or drained.
    pub gone: Option<usize>,
    /// Instances the gone node polled last when it went.
    pub gone_instances: usize,
    /// From the event until every one of them was polled by another node:
    /// with an interval longer than the lease, this includes the wait
    /// for each one's next run.
    pub takeover: Option<Duration>,
    /// From the event until another node had claimed every lease the gone
    /// node owned (the takeover itself, which the issue bounds by one
    /// lease period).
    pub leases_taken: Option<Duration>,
    /// `drain`: SIGTERM → exit, and leases still held by it after its exit.
    pub exited_after: Option<Duration>,
    pub leases_after_exit: Option<u64>,
    /// `join`: from the join until every node held its share ±10%.
    pub fair_after: Option<Duration>,
    /// The most requests in one sampled second after the event.
    pub busiest_second_after: u64,
    /// (seconds into the window, held leases per node; index = node;
    /// `None`: the lease table could not be read).
    pub samples: Vec<(f64, Option<Vec<u64>>)>,
    /// The node that joined (kept running until the bench stops it).
    pub joined: Option<Daemon>,
}

/// Held leases per node index (`pids[i]` is node `i`; a lease owner is
/// `<host>-<pid>-<random>`), counting only held ones: the claim's time is
/// to come, or the owner's heartbeat keeps it (migration 8; counting
/// `until_ms` alone read 0 once the claims' times passed); `None` when
/// psql fails (a server out of connections: every node holds a pool).
fn lease_counts(url: &str, schema: &str, pids: &[u32]) -> Option<Vec<u64>> {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args([
            "-Atc",
            &format!(
                "SELECT l.owner, count(*) FROM \"{schema}\".lease l \
                 LEFT JOIN \"{schema}\".nodes n ON n.node = l.owner WHERE l.owner IS NOT NULL \
                 AND greatest(l.until_ms, coalesce(n.heartbeat_ms + n.lease_ms, 0)) \
                   > (extract(epoch FROM clock_timestamp()) * 1000)::bigint GROUP BY l.owner"
            ),
        ])
        .output();
    let mut counts = vec![0; pids.len()];
    let out = out.ok().filter(|o| o.status.success())?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((owner, count)) = line.split_once('|') else {
            continue;
        };
        let pid: Option<u32> = owner.rsplit('-').nth(1).and_then(|p| p.parse().ok());
        if let Some(i) = pid.and_then(|p| pids.iter().position(|q| *q == p)) {
            counts[i] += count.parse::<u64>().unwrap_or(0);
        }
    }
    Some(counts)
}

/// How many lease rows name node `pid` (a `<host>-<pid>-<random>`
/// owner) as their owner, held or not: 0 once others claimed them all.
/// `None` when psql fails.
fn owned_by(url: &str, schema: &str, pid: u32) -> Option<u64> {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args([
            "-Atc",
            &format!("SELECT count(*) FROM \"{schema}\".lease WHERE owner LIKE '%-{pid}-%'"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Whether every live node holds `total / live` leases ±10%.
fn fair(counts: &[u64], live: &[bool], total: usize) -> bool {
    let n = live.iter().filter(|l| **l).count().max(1) as f64;
    let share = total as f64 / n;
    counts
        .iter()
        .zip(live)
        .filter(|(_, l)| **l)
        .all(|(c, _)| (*c as f64 - share).abs() <= share * 0.1)
}

/// Whether the process has exited (gone, or a zombie not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|t| t.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Runs the event at `plan.at` and watches it until `plan.end` (or until
/// the takeover is done, if later, within two lease periods of the end).
pub async fn run(plan: Plan) -> Report {
    let Plan {
        event,
        at,
        t0,
        end,
        instances,
        lease,
        bank,
        mut pids,
        url,
        schema,
        join_bridge,
    } = plan;
    let mut report = Report {
        event,
        at_s: (at - t0).as_secs_f64(),
        gone: None,
        gone_instances: 0,
        takeover: None,
        leases_taken: None,
        exited_after: None,
        leases_after_exit: None,
        fair_after: None,
        busiest_second_after: 0,
        samples: Vec::new(),
        joined: None,
    };
    let counts = |pids: Vec<u32>| {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::task::spawn_blocking(move || lease_counts(&url, &schema, &pids))
    };
    // Before the event: a sample every 5 s.
    let mut next_sample = t0;
    while next_sample < at {
        tokio::time::sleep_until(next_sample.into()).await;
        let c = counts(pids.clone()).await.unwrap();
        report.samples.push(((next_sample - t0).as_secs_f64(), c));
        next_sample += Duration::from_secs(5);
    }
    tokio::time::sleep_until(at.into()).await;

    let last = pids.len() - 1;
    let mut live = vec![true; pids.len()];
    let mut gone_ids = Vec::new();
    let owner_pid = pids[last];
    match event {
        Event::Kill | Event::Drain => {
            gone_ids = bank.polled_last_by(last as u8);
            let sig = if event == Event::Kill {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            unsafe { libc::kill(pids[last] as i32, sig) };
            live[last] = false;
            report.gone = Some(last);
            report.gone_instances = gone_ids.len();
        }
        Event::Join => {
            let d = Daemon::start("bank-balance.yaml", &join_bridge, "error").await;
            pids.push(d.pid);
            live.push(true);
            report.joined = Some(d);
        }
    }
    let event_at = Instant::now();

    // After it: takeover every 100 ms, requests and leases every second,
    // a recorded sample every 5 s.
    let watch_end = end.max(event_at + 2 * lease);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_second = (event_at, bank.requests.load(Ordering::Relaxed));
    loop {
        tick.tick().await;
        let now = Instant::now();
        if event == Event::Kill && report.leases_taken.is_none() {
            let (url, schema) = (url.clone(), schema.clone());
            let owned = tokio::task::spawn_blocking(move || owned_by(&url, &schema, owner_pid))
                .await
                .unwrap();
            if owned == Some(0) {
                report.leases_taken = Some(Instant::now() - event_at);
            }
        }
        if report.gone.is_some() && report.takeover.is_none() {
            let left = bank.not_taken_over(&gone_ids, last as u8, event_at);
            if left == 0 {
                report.takeover = Some(now - event_at);
            }
        }
        if event == Event::Drain && report.exited_after.is_none() && exited(owner_pid) {
            report.exited_after = Some(now - event_at);
            let c = counts(vec![owner_pid]).await.unwrap();
            report.leases_after_exit = c.map(|c| c[0]);
        }
        if now - last_second.0 >= Duration::from_secs(1) {
            let r = bank.requests.load(Ordering::Relaxed);
            report.busiest_second_after = report.busiest_second_after.max(r - last_second.1);
            last_second = (now, r);
            let c = counts(pids.clone()).await.unwrap();
            let is_fair = c.as_ref().is_some_and(|c| fair(c, &live, instances));
            if report.fair_after.is_none() && event == Event::Join && is_fair {
                report.fair_after = Some(now - event_at);
            }
            if now >= next_sample {
                report.samples.push(((now - t0).as_secs_f64(), c));
                next_sample += Duration::from_secs(5);
            }
        }
        let waiting = report.gone.is_some() && report.takeover.is_none();
        if now >= watch_end || (now >= end && !waiting) {
            break;
        }
    }
    report
}

impl Report {
    /// The lines the scale bench prints.
    pub fn lines(&self, instances: usize, interval: Duration, lease: Duration) -> Vec<String> {
        let secs = |d: Option<Duration>| match d {
            Some(d) => format!("{:.1}s", d.as_secs_f64()),
            None => "never (within the run)".to_string(),
        };
        let mut out = vec![format!(
            "  chaos: {} at {:.0}s into the window{} (lease {}s)",
            self.event.name(),
            self.at_s,
            match self.gone {
                Some(g) => format!(
                    " of node {g}, which polled {} instances last",
                    self.gone_instances
                ),
                None => String::new(),
            },
            lease.as_secs()
        )];
        if self.event == Event::Kill {
            out.push(format!(
                "  chaos: leases of the gone node all claimed by others after {}; target within one lease period ({}s)",
                secs(self.leases_taken),
                lease.as_secs()
            ));
        }
        if self.gone.is_some() {
            out.push(format!(
                "  chaos: takeover (every instance of the gone node polled by another) after {}; at most one lease period plus one interval ({}s) when every run comes due on time",
                secs(self.takeover),
                (lease + interval).as_secs()
            ));
        }
        if self.event == Event::Drain {
            out.push(format!(
                "  chaos: drained node exited {} after SIGTERM, holding {} leases at its exit (target 0: handed over)",
                secs(self.exited_after),
                self.leases_after_exit
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "?".into())
            ));
        }
        if self.event == Event::Join {
            out.push(format!(
                "  chaos: every node at its fair share ±10% after {}; target within two lease periods ({}s)",
                secs(self.fair_after),
                2 * lease.as_secs()
            ));
        }
        out.push(format!(
            "  chaos: busiest sampled second after the event {} requests (steady rate {:.0}/s)",
            self.busiest_second_after,
            instances as f64 / interval.as_secs_f64()
        ));
        out.push(format!(
            "  chaos: held leases per node over time (s: node0/node1/...): {}",
            self.samples
                .iter()
                .map(|(t, c)| match c {
                    Some(c) => format!(
                        "{t:.0}: {}",
                        c.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
                    ),
                    None => format!("{t:.0}: n/a (psql failed)"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "event": self.event.name(),
            "at_s": self.at_s,
            "gone_node": self.gone,
            "gone_instances": self.gone_instances,
            "takeover_s": self.takeover.map(|d| d.as_secs_f64()),
            "leases_taken_s": self.leases_taken.map(|d| d.as_secs_f64()),
            "exited_after_s": self.exited_after.map(|d| d.as_secs_f64()),
            "leases_after_exit": self.leases_after_exit,
            "fair_after_s": self.fair_after.map(|d| d.as_secs_f64()),
            "busiest_second_after": self.busiest_second_after,
            "lease_samples": self.samples.iter().map(|(t, c)| serde_json::json!({"t_s": t, "per_node": c})).collect::<Vec<_>>(),
        })
    }
}
