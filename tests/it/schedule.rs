//! `catch_up` through the real binary: the next run is persisted, so a quick
//! restart does not poll early, runs missed while stopped give one prompt
//! poll (`once`) or none (`skip`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;

use crate::support::*;

type Counts = Arc<Mutex<HashMap<String, u64>>>;

/// Counts requests per path; the body never changes.
async fn upstream(State(counts): State<Counts>, Path(name): Path<String>) -> axum::Json<u64> {
    *counts.lock().unwrap().entry(name).or_default() += 1;
    axum::Json(1)
}

const CONNECTOR: &str = r#"
name: probe
params: { base_url: { required: true }, name: { required: true } }
request: { url: "{{ base_url }}/{{ name }}", timeout: 2s }
detect: snapshot
emit: [{ type: probe.changed }]
"#;

/// Three sources on the fixture, one per case, with their schedules.
fn bridge(addr: &str, url: &str, hourly: &str, once: &str, skip: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  hourly:
    connector: probe
    with: {{ base_url: "http://{addr}", name: hourly }}
    schedule: {hourly}
    deliver_to: [agent]
  once:
    connector: probe
    with: {{ base_url: "http://{addr}", name: once }}
    schedule: {once}
    deliver_to: [agent]
  skip:
    connector: probe
    with: {{ base_url: "http://{addr}", name: skip }}
    schedule: {skip}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        secret = secret()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_poll_neither_early_nor_in_bursts_and_skip_skips() {
    let counts: Counts = Arc::default();
    let addr = serve(
        Router::new()
            .route("/{name}", get(upstream))
            .with_state(counts.clone()),
    )
    .await
    .to_string();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let count = |name: &str| counts.lock().unwrap().get(name).copied().unwrap_or(0);
    let hourly = "{ every: 1h, catch_up: once }";

    // First run: every instance is new, and polls promptly (within 5s),
    // even the hourly one.
    let mut d = Daemon::new(
        &bridge(
            &addr,
            &rx.url,
            hourly,
            "{ every: 1s }",
            "{ every: 1s, catch_up: skip }",
        ),
        &[("probe.yaml", CONNECTOR.to_string())],
    );
    d.start().await;
    wait_for(
        "a first poll of every source",
        Duration::from_secs(15),
        || count("hourly") >= 1 && count("once") >= 1 && count("skip") >= 1,
    )
    .await;
    assert!(d.terminate().success(), "{}", d.log());
    let before: HashMap<&str, u64> = ["hourly", "once", "skip"]
        .into_iter()
        .map(|n| (n, count(n)))
        .collect();

    // Stopped past the persisted next run of the 1s sources: they missed
    // runs. They come back as hourly (`once`) and yearly (`skip`) schedules,
    // so any poll beyond the catch-up would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(
        d.config(),
        bridge(
            &addr,
            &rx.url,
            hourly,
            "{ every: 1h, catch_up: once }",
            r#"{ cron: "0 0 1 1 *", catch_up: skip }"#,
        ),
    )
    .unwrap();
    d.start().await;
    let restarted = Instant::now();
    wait_for(
        "the one catch-up poll of `once`",
        Duration::from_secs(15),
        || count("once") > before["once"],
    )
    .await;
    // Absence can only be shown by waiting: past the longest prompt spread
    // (5s), so that any early or extra poll would have happened.
    tokio::time::sleep((restarted + Duration::from_millis(5500)) - Instant::now()).await;
    assert_eq!(
        count("once"),
        before["once"] + 1,
        "missed runs give exactly one poll"
    );
    assert_eq!(
        count("hourly"),
        before["hourly"],
        "the hourly source's next run is an hour away: no poll after a quick restart"
    );
    assert_eq!(
        count("skip"),
        before["skip"],
        "`catch_up: skip` waits for the next scheduled time"
    );
    assert!(d.terminate().success(), "{}", d.log());
}

/// Polls of each name, by arrival time.
type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

async fn timed(State(arrivals): State<Arrivals>, Path(name): Path<String>) -> axum::Json<u64> {
    arrivals
        .lock()
        .unwrap()
        .entry(name)
        .or_default()
        .push(Instant::now());
    axum::Json(1)
}

fn parked_bridge(addr: &str, url: &str, names: &[&str]) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  probes:
    connector: probe
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ name: [{}] }}
    schedule: every 3s
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        names.join(", "),
        secret = secret()
    )
}

/// An instance whose next poll is seconds away waits with no task of its
/// own (parked: `/status` counts it), and is still polled on its
/// schedule; one removed by a reload while parked is never polled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_between_polls_are_parked_and_still_poll_on_time() {
    let arrivals: Arrivals = Arc::default();
    let addr = serve(
        Router::new()
            .route("/{name}", get(timed))
            .with_state(arrivals.clone()),
    )
    .await
    .to_string();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let names = ["p0", "p1", "p2", "p3"];
    let mut d = Daemon::new(
        &parked_bridge(&addr, &rx.url, &names),
        &[("probe.yaml", CONNECTOR.to_string())],
    );
    d.start().await;
    // Between polls (3 s apart, a poll takes milliseconds) every instance
    // is parked, nearly all the time.
    d.wait_status("every instance parked", |s| s["parked"] == 4)
        .await;
    let polls = |name: &str| {
        arrivals
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
    };
    wait_for(
        "four polls of each instance",
        Duration::from_secs(30),
        || names.iter().all(|n| polls(n).len() >= 4),
    )
    .await;
    // On time: each gap is the interval, give or take a loaded machine's
    // scheduling (a parked instance that never woke would show as a gap of
    // the whole wait).
    for n in names {
        let at = polls(n);
        for w in at.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(2_900) && gap <= Duration::from_millis(4_000),
                "{n}: polls {gap:?} apart, the schedule says 3s\n{}",
                d.log()
            );
        }
    }
    // Removed while parked: its timer entry is left behind, and skipped.
    std::fs::write(d.config(), parked_bridge(&addr, &rx.url, &names[..3])).unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    d.wait_status("the reload applied", |s| s["config"]["reloads"] == 1)
        .await;
    let removed_at = polls("p3").len();
    let kept_at = polls("p0").len();
    wait_for(
        "two more polls of a kept instance",
        Duration::from_secs(30),
        || polls("p0").len() >= kept_at + 2,
    )
    .await;
    assert_eq!(
        polls("p3").len(),
        removed_at,
        "a removed instance polled again"
    );
    d.wait_status("the three left parked", |s| s["parked"] == 3)
        .await;
    assert!(d.terminate().success(), "{}", d.log());
}
