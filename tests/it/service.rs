//! Running as a service, through the real binary and real signals: the
//! systemd notify protocol (read from a socket the test provides), the
//! admin token in front of every route but `/healthz` (and `pollhook
//! status` printing its tables), SIGTERM's deadline for deliveries in
//! flight, `/metrics` read by a Prometheus text parser, `state export`
//! while running and `state import` elsewhere, and the store's retention
//! sweep.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::*;

fn messages(sock: &UnixDatagram, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !until(&got) {
        assert!(Instant::now() < deadline, "only got {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_watchdog_and_stopping() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = balance_bridge(
        addr,
        "1s",
        "[agent]",
        &format!(
            "  agent: {{ url: \"http://127.0.0.1:9/\", secret: \"{}\" }}",
            secret()
        ),
        "",
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    let path = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    d.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    // WatchdogSec=200ms: a ping every 100 ms.
    d.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    d.start().await;
    let got = tokio::task::block_in_place(|| {
        messages(&sock, |m| {
            m.iter().filter(|x| x.as_str() == "WATCHDOG=1").count() >= 3
        })
    });
    assert!(
        got[0].starts_with("READY=1\nSTATUS=polling 1 instances"),
        "{got:?}"
    );
    assert!(d.terminate().success());
    let got = tokio::task::block_in_place(|| {
        messages(&sock, |m| m.iter().any(|x| x.starts_with("STOPPING=1")))
    });
    assert!(got.last().unwrap().starts_with("STOPPING=1"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_everything_but_healthz_and_status_prints_tables() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0", token: "${{ADMIN_TOKEN}}" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{addr}", account: acc-0001 }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/", secret: "{}" }}
"#,
        secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.env.push(("ADMIN_TOKEN".into(), "adm-t0ken-123".into()));
    d.start().await;
    let base = format!("http://{}", d.admin.clone().unwrap());
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    for path in ["/status", "/metrics", "/readyz"] {
        assert_eq!(get(path, None).await.unwrap().status(), 401, "{path}");
        assert_eq!(
            get(path, Some("wrong")).await.unwrap().status(),
            401,
            "{path}"
        );
        assert_eq!(
            get(path, Some("adm-t0ken-123")).await.unwrap().status(),
            200,
            "{path}"
        );
    }
    // The CLI reads the token from the same config.
    let polls = |d: &Daemon| {
        let out =
            tokio::task::block_in_place(|| d.command(&["status", "--json"]).output().unwrap());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["instances"]["balances/default"]["polls_ok"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while polls(&d) < 1 {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::task::block_in_place(|| d.command(&["status"]).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("INSTANCE") && text.contains("\nENDPOINT"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("balances/default ")),
        "{text}"
    );
    let out = tokio::task::block_in_place(|| d.command(&["status", "--json"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["instances"]["balances/default"]["polls_ok"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        !d.log().contains("adm-t0ken-123"),
        "the token is never logged"
    );
}

/// `pollhook events --json` on the stopped store: (event id, outcome).
fn attempts(d: &Daemon) -> Vec<(String, String)> {
    let out = d.command(&["events", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_deliveries_past_the_deadline_and_finishes_those_within_it() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    // The receiver holds the first delivery far longer than the deadline.
    let rx = Receiver::start(&secret(), Plan::Slow(Duration::from_secs(60))).await;
    let bridge = |timeout: &str| {
        balance_bridge(
            addr,
            "100ms",
            "[agent]",
            &format!(
                "  agent: {{ url: \"{}\", secret: \"{}\", timeout: 120s }}",
                rx.url,
                secret()
            ),
            &format!("shutdown_timeout: {timeout}"),
        )
    };
    let mut d = Daemon::new(
        &bridge("1s"),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 2).await;
    bank.set_balance("acc-0001", 43_210);
    wait_for("the delivery in flight", Duration::from_secs(20), || {
        rx.all().len() == 1
    })
    .await;
    let held = rx.all()[0].id.clone();
    let t = Instant::now();
    let exit = tokio::task::block_in_place(|| d.terminate());
    assert!(exit.success(), "{exit:?}\n{}", d.log());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the shutdown deadline bounds the wait"
    );
    assert!(
        d.log().contains("abandoning in-flight deliveries"),
        "{}",
        d.log()
    );
    // Half-sent is not sent: no attempt recorded, the event still queued.
    assert!(tokio::task::block_in_place(|| attempts(&d)).is_empty());
    rx.set_plan(Plan::Always(204));
    d.start().await;
    wait_for("the redelivery", Duration::from_secs(20), || {
        rx.accepted().len() == 1
    })
    .await;
    assert_eq!(rx.accepted()[0].id, held, "the same webhook-id");
    d.wait_status("the outbox empty", |s| {
        s["endpoints"]["agent"]["queue_depth"] == 0
    })
    .await;
    assert!(d.terminate().success());

    // Within the deadline: the in-flight delivery finishes, is counted
    // delivered, and is not sent again after a restart.
    std::fs::write(d.config(), bridge("30s")).unwrap();
    rx.set_plan(Plan::Slow(Duration::from_millis(700)));
    d.start().await;
    d.wait_polls(&["balances/default"], 2).await;
    bank.set_balance("acc-0001", 60_000);
    wait_for(
        "the second delivery in flight",
        Duration::from_secs(20),
        || rx.all().len() == 3,
    )
    .await;
    let second = rx.all()[2].id.clone();
    let exit = tokio::task::block_in_place(|| d.terminate());
    assert!(exit.success(), "{exit:?}");
    let log = d.log();
    assert_eq!(log.matches("abandoning in-flight").count(), 1, "{log}");
    let recorded = tokio::task::block_in_place(|| attempts(&d));
    assert!(
        recorded.contains(&(second.clone(), "delivered".to_string())),
        "{recorded:?}"
    );
    rx.set_plan(Plan::Always(204));
    d.start().await;
    let polls = polls_of(&d.status().await, "balances/default");
    d.wait_polls(&["balances/default"], polls + 5).await;
    assert_eq!(rx.all().len(), 3, "nothing was sent twice");
    assert!(d.terminate().success());
}

/// `/metrics` read by a Prometheus text-format parser: every sample of
/// `metric` whose labels include `labels`.
fn samples<'a>(
    scrape: &'a prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(scrape, metric, labels);
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    match &found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{metric}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    // The bank refuses more than 4 requests a second; polls every 50 ms
    // meet 429s with Retry-After.
    let bank = Bank::new(&["acc-0001", "acc-0002"]).with_limit(4);
    let addr = bank.serve("127.0.0.1:0").await;
    // The agent fails its first delivery once; `down` never answers.
    let rx = Receiver::start(&secret(), Plan::Script(vec![500].into())).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ account: [acc-0001, acc-0002] }}
    schedule: every 50ms
    deliver_to: [agent, down]
endpoints:
  agent: {{ url: "{}", secret: "{}", retry: {{ schedule: [50ms, 50ms] }} }}
  down: {{ url: "http://127.0.0.1:9/", secret: "{}" }}
"#,
        rx.url,
        secret(),
        secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/acc-0001", "balances/acc-0002"], 2)
        .await;
    bank.set_balance("acc-0001", 43_210);
    bank.set_balance("acc-0002", 1_000);
    // acc-0001 changed; acc-0002 changed and ran low: three events.
    wait_for("the events delivered", Duration::from_secs(30), || {
        rx.accepted().len() == 3
    })
    .await;
    let status = d
        .wait_status("a 429 and a 304", |s| {
            let h = &s["hosts"][addr.to_string()];
            h["throttled"].as_u64().unwrap_or(0) >= 1
                && s["instances"]["balances/acc-0001"]["polls_not_modified"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 1
        })
        .await;
    let body = reqwest::get(format!("http://{}/metrics", d.admin.clone().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    // Every line is a comment or a sample the parser kept.
    let sample_lines = body.lines().filter(|l| !l.starts_with('#')).count();
    let histogram_lines: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b) => b.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(sample_lines, histogram_lines, "{body}");

    let src = [("source", "balances"), ("connector", "bank-balance")];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = src.to_vec();
        l.push(extra);
        l
    };
    // Events by type: one balance change each, one of them below the
    // low threshold (1000 cents < 100 EUR).
    assert_eq!(
        value(
            &scrape,
            "pollhook_events_total",
            &[("source", "balances"), ("type", "bank.balance.changed")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &scrape,
            "pollhook_events_total",
            &[("source", "balances"), ("type", "bank.balance.low")]
        ),
        1.0
    );
    assert!(
        value(
            &scrape,
            "pollhook_polls_total",
            &with(("outcome", "not_modified"))
        ) >= 1.0
    );
    assert!(value(&scrape, "pollhook_polls_total", &with(("outcome", "ok"))) >= 2.0);
    assert_eq!(value(&scrape, "pollhook_instances", &src), 2.0);
    let host = addr.to_string();
    assert!(value(&scrape, "pollhook_upstream_429_total", &[("host", &host)]) >= 1.0);
    assert!(
        value(
            &scrape,
            "pollhook_upstream_throttled_seconds_total",
            &[("host", &host)]
        ) > 0.0
    );
    // Polls go on every 50 ms: the counter read between two `/status`
    // reads lies between their counts (it never counts apart from them).
    let after = d.status().await;
    let requests = value(
        &scrape,
        "pollhook_upstream_requests_total",
        &[("host", &host)],
    );
    let (before, after) = (
        status["hosts"][&host]["requests"].as_f64().unwrap(),
        after["hosts"][&host]["requests"].as_f64().unwrap(),
    );
    assert!(
        before <= requests && requests <= after,
        "{before} <= {requests} <= {after}"
    );
    // Poll durations: a histogram with one count per poll.
    let polls = samples(&scrape, "pollhook_poll_duration_seconds", &src);
    let prometheus_parse::Value::Histogram(buckets) = &polls[0].value else {
        panic!("{polls:?}")
    };
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert!(inf.count >= 4.0, "{buckets:?}");
    assert_eq!(
        value(&scrape, "pollhook_poll_duration_seconds_count", &src),
        inf.count
    );
    // Deliveries: the agent's one failure, then all three delivered, each
    // with its detection-to-delivery latency.
    let agent = [("endpoint", "agent")];
    assert_eq!(
        value(
            &scrape,
            "pollhook_deliveries_total",
            &[("endpoint", "agent"), ("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "pollhook_deliveries_total",
            &[("endpoint", "agent"), ("outcome", "delivered")]
        ),
        3.0
    );
    assert_eq!(
        value(&scrape, "pollhook_delivery_latency_seconds_count", &agent),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "pollhook_delivery_attempt_duration_seconds_count",
            &agent
        ),
        4.0
    );
    // The dead endpoint: its events wait, the oldest for a while already.
    assert_eq!(
        value(&scrape, "pollhook_outbox_depth", &[("endpoint", "down")]),
        3.0
    );
    assert!(
        value(
            &scrape,
            "pollhook_outbox_oldest_age_seconds",
            &[("endpoint", "down")]
        ) > 0.0
    );
    assert_eq!(
        value(&scrape, "pollhook_outbox_oldest_age_seconds", &agent),
        0.0
    );
    assert!(value(&scrape, "pollhook_cursor_age_seconds", &src) < 60.0);
    assert_eq!(
        value(&scrape, "pollhook_config_last_reload_successful", &[]),
        1.0
    );
    // Not per instance: no series names an instance.
    assert!(!body.contains("instance="), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_export_while_running_and_import_elsewhere_lose_nothing() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    // The agent is down (503) while the backup is taken.
    let rx = Receiver::start(&secret(), Plan::Always(503)).await;
    let bridge = balance_bridge(
        addr,
        "100ms",
        "[agent]",
        &format!(
            "  agent: {{ url: \"{}\", secret: \"{}\", retry: {{ schedule: [200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms, 200ms] }} }}",
            rx.url,
            secret()
        ),
        "",
    );
    let connectors = [("bank-balance.yaml", repo_connector("bank-balance.yaml"))];
    let mut d1 = Daemon::new(&bridge, &connectors);
    d1.start().await;
    d1.wait_polls(&["balances/default"], 2).await;
    bank.set_balance("acc-0001", 43_210);
    wait_for("a refused delivery", Duration::from_secs(20), || {
        !rx.all().is_empty()
    })
    .await;
    let pending = rx.all()[0].id.clone();
    let backup = d1.dir.path().join("backup.jsonl");
    let out = tokio::task::block_in_place(|| {
        d1.command(&["state", "export", "--output", backup.to_str().unwrap()])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(text.starts_with("{\"pollhook_state\":2"), "{text}");
    assert!(text.contains("\"tree\":\"outbox\""), "{text}");
    assert!(text.contains(&pending), "the queued event is in the backup");
    assert!(d1.terminate().success());

    // Another state_dir: refused when the file is bad (line named, nothing
    // written), then imported.
    let d2 = Daemon::new(&bridge, &connectors);
    let import = |d: &Daemon, file: &std::path::Path| {
        tokio::task::block_in_place(|| {
            d.command(&["state", "import", file.to_str().unwrap()])
                .output()
                .unwrap()
        })
    };
    let bad = d2.dir.path().join("bad.jsonl");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(
        2,
        r#"{"tree":"state","instance":"x","value":{"sequence":"many"}}"#,
    );
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let out = import(&d2, &bad);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        err.contains("line 3") && err.contains("not a state record"),
        "{err}"
    );
    let out = import(&d2, &backup);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second import would mix two stores: refused.
    let out = import(&d2, &backup);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("empty state_dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The restored daemon delivers the queued event (same webhook-id) and
    // goes on from the stored state: the next change is sequence 2.
    let mut d2 = d2;
    rx.set_plan(Plan::Always(204));
    d2.start().await;
    wait_for(
        "the restored event delivered",
        Duration::from_secs(20),
        || rx.accepted().iter().any(|d| d.id == pending),
    )
    .await;
    bank.set_balance("acc-0001", 12_345);
    wait_for("the next change", Duration::from_secs(20), || {
        rx.accepted().iter().any(|d| d.body["sequence"] == 2)
    })
    .await;
    assert!(
        rx.accepted().iter().all(|d| d.body["sequence"] != 3),
        "no baseline emitted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_retention_forgets_old_history_and_dead_letters() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(500)).await;
    let bridge = |retention: &str| {
        balance_bridge(
            addr,
            "100ms",
            "[agent]",
            &format!(
                "  agent: {{ url: \"{}\", secret: \"{}\", retry: {{ max_attempts: 1 }} }}",
                rx.url,
                secret()
            ),
            retention,
        )
    };
    let mut d = Daemon::new(
        &bridge(""),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 2).await;
    bank.set_balance("acc-0001", 43_210);
    d.wait_status("a dead letter", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 1
    })
    .await;
    assert!(d.terminate().success());
    let dead = |d: &Daemon| {
        let out = tokio::task::block_in_place(|| {
            d.command(&["dlq", "list", "--all", "--json"])
                .output()
                .unwrap()
        });
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(tokio::task::block_in_place(|| attempts(&d)).len(), 1);
    assert_eq!(dead(&d), 1);
    // Defaults keep both across a restart.
    d.start().await;
    assert!(d.terminate().success());
    assert_eq!(tokio::task::block_in_place(|| attempts(&d)).len(), 1);
    assert_eq!(dead(&d), 1);
    // With a short retention, the next start forgets them.
    std::fs::write(
        d.config(),
        bridge("store: { history: 1ms, dead_letters: 1ms }"),
    )
    .unwrap();
    d.start().await;
    // /status counts dead letters in memory: it follows the deletion.
    d.wait_status("the dead letter forgotten in /status", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 0
    })
    .await;
    assert!(d.terminate().success());
    assert!(tokio::task::block_in_place(|| attempts(&d)).is_empty());
    assert_eq!(dead(&d), 0);
    let log = d.log();
    assert!(
        log.contains("delivery history older than store.history forgotten"),
        "{log}"
    );
    assert!(
        log.contains("dead letters older than store.dead_letters deleted"),
        "{log}"
    );
}

/// The daemon's binary is linked at a fixed address on Linux with glibc
/// (`build.rs`: `-no-pie`): a position-independent one has its read-only
/// pointers rewritten by the loader at every start, 1.7 MiB of private
/// memory at rest. `POLLHOOK_PIE=1` at build time keeps a PIE. Read from
/// the ELF header's `e_type`: 2 is a fixed-address executable, 3 a PIE.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_binary_is_linked_at_a_fixed_address_unless_asked_for_a_pie() {
    use std::io::Read;
    let mut bin = [0u8; 18];
    std::fs::File::open(env!("CARGO_BIN_EXE_pollhook"))
        .and_then(|mut f| f.read_exact(&mut bin))
        .unwrap();
    assert_eq!(&bin[..4], b"\x7fELF");
    let e_type = u16::from_le_bytes([bin[16], bin[17]]);
    let want = if option_env!("POLLHOOK_PIE") == Some("1") {
        3
    } else {
        2
    };
    assert_eq!(e_type, want, "ELF e_type (2: fixed address, 3: PIE)");
}
