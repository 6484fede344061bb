//! An endpoint's delivery policy: how the worker reads a receiver's
//! answers (`Retry-After` is honoured, redirects are failures, never
//! followed, `410 Gone` disables the endpoint, consecutive failures open a
//! circuit that only probes, `disable_after` disables), `ordering: none`,
//! the GitHub-style `X-Hub-Signature-256` when asked for, signing-key
//! rotation, insecure and private URLs refused at load, and dead letters
//! listed, replayed under their ids and dropped (live and stopped).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::support::*;

/// One scripted answer: a status and its headers.
type Answer = (u16, Vec<(&'static str, String)>);

/// A receiver answering from a script (then 204), recording each request.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<(Instant, HeaderMap, String)>>>,
}

impl Scripted {
    async fn start(script: Vec<Answer>) -> (String, Scripted) {
        let s = Scripted {
            script: Arc::new(Mutex::new(script.into())),
            ..Default::default()
        };
        let s2 = s.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: String| {
                let s = s2.clone();
                async move {
                    s.seen.lock().unwrap().push((Instant::now(), headers, body));
                    let (code, hs) = s
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((204, vec![]));
                    let mut r: Response = StatusCode::from_u16(code).unwrap().into_response();
                    for (k, v) in hs {
                        r.headers_mut().insert(k, v.parse().unwrap());
                    }
                    r
                }
            }),
        );
        let addr = serve(app).await;
        (format!("http://{addr}/hook"), s)
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn bridge(bank: &str, endpoint: &str) -> String {
    balance_bridge(
        bank,
        "50ms",
        "[agent]",
        &format!("  agent:\n{endpoint}"),
        "",
    )
}

async fn setup(endpoint: String) -> (Bank, Daemon) {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &endpoint),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    (bank, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_s_retry_after_sets_the_next_attempt() {
    // The schedule would retry after 50 ms; the receiver asks for 2 s.
    let (url, rx) = Scripted::start(vec![(429, vec![("retry-after", "2".into())])]).await;
    let (bank, _d) = setup(format!(
        "    url: {url}\n    secret: {}\n    retry: {{ schedule: [50ms] , max_attempts: 5 }}",
        secret()
    ))
    .await;
    bank.set_balance("acc-0001", 12_345);
    wait_for("the retry", Duration::from_secs(20), || rx.count() >= 2).await;
    let seen = rx.seen.lock().unwrap();
    let gap = seen[1].0 - seen[0].0;
    assert!(
        gap >= Duration::from_millis(1900),
        "waited {gap:?}, not 2 s"
    );
    assert_eq!(seen[0].1["webhook-id"], seen[1].1["webhook-id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_and_is_never_followed() {
    let (other, elsewhere) = Scripted::start(vec![]).await;
    let (url, rx) = Scripted::start(vec![(307, vec![("location", other.clone())])]).await;
    let (bank, d) = setup(format!(
        "    url: {url}\n    secret: {}\n    retry: {{ schedule: [50ms] , max_attempts: 5 }}",
        secret()
    ))
    .await;
    bank.set_balance("acc-0001", 12_345);
    wait_for(
        "the retry after the redirect",
        Duration::from_secs(20),
        || rx.count() >= 2,
    )
    .await;
    assert_eq!(elsewhere.count(), 0, "the Location was not followed");
    let s = d.status().await;
    assert_eq!(s["endpoints"]["agent"]["failed_attempts"], 1, "{s:#}");
    assert_eq!(s["endpoints"]["agent"]["delivered"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_keeps_its_events() {
    let (url, rx) = Scripted::start(vec![(410, vec![])]).await;
    let (bank, mut d) = setup(format!("    url: {url}\n    secret: {}", secret())).await;
    bank.set_balance("acc-0001", 12_345);
    wait_for("the 410", Duration::from_secs(20), || rx.count() >= 1).await;
    bank.set_balance("acc-0001", 23_456);
    let s = d
        .wait_status("two events queued", |s| {
            s["endpoints"]["agent"]["queue_depth"] == 2
        })
        .await;
    assert!(
        s["endpoints"]["agent"]["disabled"]
            .as_str()
            .unwrap()
            .contains("410 Gone"),
        "{s:#}"
    );
    // Polls go on; nothing more is sent.
    let polls = polls_of(&s, "balances/default");
    d.wait_polls(&["balances/default"], polls + 5).await;
    assert_eq!(rx.count(), 1);
    // Disabled it stays, across a restart too (the receiver would now
    // accept: nothing may reach it).
    assert!(d.terminate().success());
    d.start().await;
    let s = d
        .wait_status("disabled after the restart", |s| {
            s["endpoints"]["agent"]["disabled"].is_string()
        })
        .await;
    let polls = polls_of(&s, "balances/default");
    d.wait_polls(&["balances/default"], polls + 5).await;
    assert_eq!(rx.count(), 1);
    // Until the operator enables it: the queued events go out, in order.
    let out = tokio::task::block_in_place(|| {
        d.command(&["endpoint", "enable", "agent"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("enabled"));
    wait_for("the queued events", Duration::from_secs(20), || {
        rx.count() == 3
    })
    .await;
    let s = d
        .wait_status("the outbox drained", |s| {
            s["endpoints"]["agent"]["queue_depth"] == 0
        })
        .await;
    assert!(s["endpoints"]["agent"]["disabled"].is_null(), "{s:#}");
    let out = tokio::task::block_in_place(|| {
        d.command(&["endpoint", "enable", "nope"]).output().unwrap()
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no endpoint named `nope`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_a_circuit_that_only_probes() {
    let script: Vec<_> = (0..100).map(|_| (500, vec![])).collect();
    let (url, rx) = Scripted::start(script).await;
    let (bank, d) = setup(format!(
        "    url: {url}\n    secret: {}\n    retry: {{ schedule: [10ms], max_attempts: 1000 }}\n    circuit: {{ failures: 3, probe_every: 1s }}",
        secret()
    ))
    .await;
    bank.set_balance("acc-0001", 12_345);
    wait_for("three failures", Duration::from_secs(20), || {
        rx.count() >= 3
    })
    .await;
    let t = Instant::now();
    wait_for("a probe", Duration::from_secs(20), || rx.count() >= 4).await;
    // Retries every 10 ms would have sent ~100 requests in that second.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let s = d.status().await;
    assert_eq!(s["endpoints"]["agent"]["circuit_open"], true, "{s:#}");
    assert!(
        s["endpoints"]["agent"]["consecutive_failures"]
            .as_u64()
            .unwrap()
            >= 4
    );
    // The receiver recovers: the next probe closes the circuit.
    rx.script.lock().unwrap().clear();
    wait_for("delivery", Duration::from_secs(20), || {
        rx.seen.lock().unwrap().len() >= 5
    })
    .await;
    let s = d
        .wait_status("delivered after the probe", |s| {
            s["endpoints"]["agent"]["delivered"] == 1
        })
        .await;
    assert_eq!(s["endpoints"]["agent"]["circuit_open"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_github_style_signature_is_sent_when_asked_for() {
    let (url, rx) = Scripted::start(vec![]).await;
    let (bank, _d) = setup(format!(
        "    url: {url}\n    secret: {}\n    hub_secret: \"It's a Secret to Everybody\"",
        secret()
    ))
    .await;
    bank.set_balance("acc-0001", 12_345);
    wait_for("the event", Duration::from_secs(20), || rx.count() >= 1).await;
    let seen = rx.seen.lock().unwrap();
    let (_, headers, body) = &seen[0];
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(b"It's a Secret to Everybody").unwrap();
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(headers["x-hub-signature-256"], format!("sha256={hex}"));
    assert!(headers["webhook-signature"]
        .to_str()
        .unwrap()
        .starts_with("v1,"));
}

#[test]
fn insecure_and_private_endpoints_are_refused_at_load() {
    let check = |url: &str, extra: &str| {
        let bridge = format!(
            "sources: {{}}\nendpoints:\n  agent:\n    url: {url}\n    secret: {}\n{extra}",
            secret()
        );
        let d = Daemon::new(&bridge, &[]);
        let out = d.command(&["validate"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = check("http://agent.example.com/hook", "");
    assert!(
        !ok && err.contains("clear text") && err.contains("endpoints.agent.url"),
        "{err}"
    );
    assert!(
        check(
            "http://agent.example.com/hook",
            "    allow_insecure: true\n"
        )
        .0
    );
    let (ok, err) = check("https://169.254.169.254/latest", "");
    assert!(!ok && err.contains("SSRF"), "{err}");
    let (ok, err) = check("http://10.0.0.5/hook", "    allow_insecure: true\n");
    assert!(!ok && err.contains("private"), "{err}");
    assert!(check("https://10.0.0.5/hook", "    allow_private: true\n").0);
    assert!(check("http://127.0.0.1:9/hook", "").0, "loopback is fine");
    assert!(check("http://localhost:9/hook", "").0);
}

fn cli(d: &Daemon, args: &[&str]) -> (bool, String) {
    let out = d.command(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_with_their_ids_and_dropped_live_and_stopped() {
    let rx = Receiver::start(&secret(), Plan::Always(500)).await;
    let (bank, mut d) = setup(format!(
        "    url: {}\n    secret: {}\n    retry: {{ schedule: [20ms], max_attempts: 2 }}\n    circuit: {{ failures: 1000 }}",
        rx.url,
        secret()
    ))
    .await;
    for cents in [11_100, 22_200] {
        bank.set_balance("acc-0001", cents);
        let before = rx.all().len();
        wait_for("two attempts", Duration::from_secs(20), || {
            rx.all().len() >= before + 2
        })
        .await;
    }
    d.wait_status("two dead letters", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 2
    })
    .await;
    let failed_ids: Vec<String> = rx.all().iter().map(|x| x.id.clone()).collect();

    // While the daemon runs: through its admin server.
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["dlq", "list", "--json"]));
    assert!(ok, "{out}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2, "{out}");
    assert!(listed
        .iter()
        .all(|l| l["attempts"] == 2 && l["last_error"].as_str().unwrap().contains("500")));
    let first = listed[0]["id"].as_str().unwrap().to_string();
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["events", "--id", &first]));
    assert!(
        ok && out.matches(" 500 ").count() == 2,
        "two attempts, status 500: {out}"
    );
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["dlq", "replay"]));
    assert!(
        !ok && out.contains("or --all"),
        "no criterion, nothing replayed: {out}"
    );

    // The receiver is fixed; replay one event by id: same webhook-id.
    rx.set_plan(Plan::Always(204));
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["dlq", "replay", "--id", &first]));
    assert!(ok && out.contains("\"replayed\": 1"), "{out}");
    wait_for("the replayed event", Duration::from_secs(20), || {
        !rx.accepted().is_empty()
    })
    .await;
    assert_eq!(rx.accepted()[0].id, first);
    assert!(failed_ids.contains(&first));

    // On the stopped store: list, then drop the rest.
    assert!(d.terminate().success());
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["dlq", "list"]));
    assert!(
        ok && out.lines().count() == 1 && !out.contains(&first),
        "{out}"
    );
    let (ok, out) =
        tokio::task::block_in_place(|| cli(&d, &["dlq", "drop", "--endpoint", "agent"]));
    assert!(ok && out.contains("\"dropped\": 1"), "{out}");
    let (ok, out) = tokio::task::block_in_place(|| cli(&d, &["dlq", "list"]));
    assert!(ok && out.contains("no dead letters"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_without_downtime() {
    let old = secret();
    let new = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_string();
    // Two receivers, one that knows only the old key, one only the new.
    let rx_old = Receiver::start(&old, Plan::Always(204)).await;
    let rx_new = Receiver::start(&new, Plan::Always(204)).await;
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let endpoint = |secrets: &str| {
        format!(
            "    url: {}\n    secret: {secrets}\n  new:\n    url: {}\n    secret: {secrets}",
            rx_old.url, rx_new.url
        )
    };
    let bridge = |secrets: &str| {
        bridge(&addr.to_string(), &endpoint(secrets))
            .replace("deliver_to: [agent]", "deliver_to: [agent, new]")
    };
    let mut d = Daemon::new(
        &bridge(&format!("\"{old}\"")),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    let step = |cents: i64| {
        bank.set_balance("acc-0001", cents);
        let (rx_old, rx_new) = (rx_old.clone(), rx_new.clone());
        let (a, b) = (rx_old.all().len(), rx_new.all().len());
        async move {
            wait_for("both endpoints tried", Duration::from_secs(20), || {
                rx_old.all().len() > a && rx_new.all().len() > b
            })
            .await;
        }
    };
    // Old key only: the old receiver verifies, the new one cannot.
    step(10_000).await;
    assert!(rx_old.all().last().unwrap().verified);
    assert!(!rx_new.all().last().unwrap().verified);
    // Rotation: both keys sign; both receivers verify the same request.
    d.terminate();
    std::fs::write(d.config(), bridge(&format!("[\"{new}\", \"{old}\"]"))).unwrap();
    d.start().await;
    step(20_000).await;
    assert!(rx_old.all().last().unwrap().verified);
    assert!(rx_new.all().last().unwrap().verified);
    let sig = rx_new.all().last().unwrap().signature.clone();
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    // The old key retired.
    d.terminate();
    std::fs::write(d.config(), bridge(&format!("\"{new}\""))).unwrap();
    d.start().await;
    step(30_000).await;
    assert!(!rx_old.all().last().unwrap().verified);
    assert!(rx_new.all().last().unwrap().verified);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_none_lets_later_events_overtake_a_retried_one() {
    for ordering in ["instance", "none"] {
        let (url, rx) = Scripted::start(vec![(500, vec![])]).await;
        let (bank, d) = setup(format!(
            "    url: {url}\n    secret: {}\n    ordering: {ordering}\n    retry: {{ schedule: [30s] }}",
            secret()
        ))
        .await;
        bank.set_balance("acc-0001", 11_111);
        wait_for("the failed first attempt", Duration::from_secs(20), || {
            rx.count() >= 1
        })
        .await;
        bank.set_balance("acc-0001", 22_222);
        // The second change is detected (2 events in the outbox) …
        let s = d
            .wait_status("the second change detected", |s| {
                s["instances"]["balances/default"]["events"].as_u64() >= Some(2)
            })
            .await;
        if ordering == "none" {
            // … and delivered while the first waits for its retry.
            wait_for("the second event", Duration::from_secs(20), || {
                rx.count() >= 2
            })
            .await;
            assert!(rx.seen.lock().unwrap()[1].2.contains("222.22"));
        } else {
            // … and waits behind the first (whose retry is 30 s away).
            let polls = polls_of(&s, "balances/default");
            d.wait_polls(&["balances/default"], polls + 5).await;
            assert_eq!(rx.count(), 1, "per-instance order holds");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_longer_than_disable_after_is_disabled() {
    let script: Vec<_> = (0..1000).map(|_| (500, vec![])).collect();
    let (url, rx) = Scripted::start(script).await;
    let (bank, d) = setup(format!(
        "    url: {url}\n    secret: {}\n    retry: {{ schedule: [20ms], max_attempts: 1000 }}\n    circuit: {{ failures: 1000, disable_after: 300ms }}",
        secret()
    ))
    .await;
    bank.set_balance("acc-0001", 12_345);
    let s = d
        .wait_status("disabled", |s| {
            !s["endpoints"]["agent"]["disabled"].is_null()
        })
        .await;
    assert!(
        s["endpoints"]["agent"]["disabled"]
            .as_str()
            .unwrap()
            .contains("disable_after"),
        "{s:#}"
    );
    let sent = rx.count();
    let polls = polls_of(&s, "balances/default");
    d.wait_polls(&["balances/default"], polls + 10).await;
    assert_eq!(rx.count(), sent, "nothing sent once disabled");
    assert_eq!(d.status().await["endpoints"]["agent"]["queue_depth"], 1);
}
