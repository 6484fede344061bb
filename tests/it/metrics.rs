//! `/metrics` over the life of the real binary: counters never go
//! backwards, even when a SIGHUP reload removes the instances or endpoints
//! they counted; `/status` counts polls exactly as `/metrics` does; the
//! backlog follows dead letters dropped and replayed live. (That the text
//! parses as Prometheus's is in `service.rs`.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::*;

fn bridge(bank: &str, rx: &str, accounts: &str, spare: bool, every: &str) -> String {
    let (to, spare_ep) = if spare {
        (
            "[agent, spare]",
            format!("  spare: {{ url: \"{rx}\", secret: \"{}\" }}\n", secret()),
        )
    } else {
        ("[agent]", String::new())
    };
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{bank}" }}
    for_each: {{ account: [{accounts}] }}
    schedule: every {every}
    deliver_to: {to}
endpoints:
  agent: {{ url: "{rx}", secret: "{}" }}
{spare_ep}"#,
        secret()
    )
}

async fn scrape(d: &Daemon) -> prometheus_parse::Scrape {
    let body = reqwest::get(format!("http://{}/metrics", d.admin.clone().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// Every counter sample (and histogram count) by metric name and labels.
fn counters(s: &prometheus_parse::Scrape) -> BTreeMap<String, f64> {
    s.samples
        .iter()
        .filter_map(|x| {
            let v = match &x.value {
                prometheus_parse::Value::Counter(v) => *v,
                prometheus_parse::Value::Histogram(b) => {
                    b.iter().find(|b| b.less_than.is_infinite())?.count
                }
                _ => return None,
            };
            let mut labels: Vec<_> = x.labels.iter().collect();
            labels.sort();
            Some((format!("{}{labels:?}", x.metric), v))
        })
        .collect()
}

fn polls(s: &prometheus_parse::Scrape, outcome: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| {
            x.metric == "pollhook_polls_total"
                && x.labels.get("source") == Some("balances")
                && x.labels.get("outcome") == Some(outcome)
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => panic!("{x:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_instances_and_endpoints_never_lowers_a_counter() {
    let bank = Bank::new(&["acc-0001", "acc-0002", "acc-0003"]);
    let addr = bank.serve("127.0.0.1:0").await.to_string();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(&addr, &rx.url, "acc-0001, acc-0002, acc-0003", true, "50ms"),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/acc-0002", "balances/acc-0003"], 3)
        .await;
    bank.set_balance("acc-0002", 4_242);
    wait_for(
        "the change delivered to both endpoints",
        Duration::from_secs(20),
        || rx.accepted().len() >= 2,
    )
    .await;
    let before = counters(&scrape(&d).await);
    assert!(
        before.keys().any(|k| k.contains("endpoint\", \"spare")),
        "{before:#?}"
    );

    // Two of three instances and the `spare` endpoint go away.
    std::fs::write(
        d.config(),
        bridge(&addr, &rx.url, "acc-0001", false, "50ms"),
    )
    .unwrap();
    let pid = d.pid().expect("running");
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    d.wait_status("the reload applied", |s| {
        s["config"]["reloads"] == 1 && s["instances"]["balances/acc-0002"].is_null()
    })
    .await;
    // Scraped several times while the remaining instance polls on: no
    // sample ever drops below what an earlier scrape showed.
    let mut last = before;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let now = counters(&scrape(&d).await);
        for (k, v) in &last {
            let n = now.get(k).copied();
            assert!(
                n.is_some_and(|n| n >= *v),
                "{k} went from {v} to {n:?} after the reload"
            );
        }
        last = now;
    }
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_count_a_304_as_not_modified_not_as_ok() {
    let bank = Bank::new(&["acc-0001", "acc-0002"]);
    let addr = bank.serve("127.0.0.1:0").await.to_string();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        // Slow enough that a /status, /metrics, /status sequence often
        // falls between two polls.
        &bridge(&addr, &rx.url, "acc-0001, acc-0002", false, "400ms"),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    let sum = |s: &serde_json::Value, field: &str| -> u64 {
        s["instances"]
            .as_object()
            .unwrap()
            .values()
            .map(|i| i[field].as_u64().unwrap())
            .sum()
    };
    d.wait_status("304s", |s| sum(s, "polls_not_modified") >= 2)
        .await;
    // Compared only when no poll ended between the two /status reads
    // around the scrape (counters only grow, so equal means unchanged).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = d.status().await;
        let m = scrape(&d).await;
        let b = d.status().await;
        let fields = ["polls_ok", "polls_not_modified", "polls_failed"];
        if fields.iter().all(|f| sum(&a, f) == sum(&b, f)) {
            assert_eq!(polls(&m, "ok"), sum(&a, "polls_ok") as f64, "{a:#}");
            assert_eq!(
                polls(&m, "not_modified"),
                sum(&a, "polls_not_modified") as f64
            );
            assert_eq!(polls(&m, "error"), sum(&a, "polls_failed") as f64);
            assert!(sum(&a, "polls_not_modified") >= 2);
            break;
        }
        assert!(Instant::now() < deadline, "polls never paused for a scrape");
    }
    assert!(d.terminate().success());
}

fn cli(d: &Daemon, args: &[&str]) -> String {
    let out = tokio::task::block_in_place(|| d.command(args).output().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_in_status_follows_dead_letters_dropped_and_replayed_live() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(500)).await;
    let endpoint = format!(
        "  agent: {{ url: \"{}\", secret: \"{}\", retry: {{ max_attempts: 1 }}, circuit: {{ failures: 1000 }} }}",
        rx.url,
        secret()
    );
    let mut d = Daemon::new(
        &balance_bridge(addr, "50ms", "[agent]", &endpoint, ""),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 2).await;
    bank.set_balance("acc-0001", 43_210);
    d.wait_status("one dead letter", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 1
    })
    .await;
    bank.set_balance("acc-0001", 54_321);
    let s = d
        .wait_status("two dead letters", |s| {
            s["endpoints"]["agent"]["dead_letters"] == 2
        })
        .await;
    assert_eq!(s["endpoints"]["agent"]["queue_depth"], 0, "{s:#}");
    assert!(s["endpoints"]["agent"]["oldest_pending_ms"].is_null());
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&cli(&d, &["dlq", "list", "--json"])).unwrap();
    let (first, second) = (
        listed[0]["id"].as_str().unwrap(),
        listed[1]["id"].as_str().unwrap(),
    );
    cli(&d, &["dlq", "drop", "--id", first]);
    d.wait_status("one dead letter after the drop", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 1
    })
    .await;
    rx.set_plan(Plan::Always(204));
    cli(&d, &["dlq", "replay", "--id", second]);
    wait_for("the replayed event", Duration::from_secs(20), || {
        rx.accepted().iter().any(|x| x.id == second)
    })
    .await;
    let s = d
        .wait_status("nothing left", |s| {
            s["endpoints"]["agent"]["dead_letters"] == 0
                && s["endpoints"]["agent"]["queue_depth"] == 0
        })
        .await;
    assert!(s["endpoints"]["agent"]["oldest_pending_ms"].is_null());
    assert!(d.terminate().success());
}
