//! Polite, fair polling against fixtures that count requests in time:
//! host quotas are never exceeded and shared fairly, an upstream's own
//! throttling (429/503 + Retry-After, RateLimit headers) is honoured by
//! every instance, failing upstreams are backed off, a dead host delays
//! nobody else, and an adaptive schedule speeds up after a change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::support::*;

/// What the fixture does for one request.
#[derive(Clone, Copy, PartialEq)]
enum Limit {
    /// At most N per wall-clock second, else 429 + `Retry-After: 1`; with
    /// `headers`, every answer also carries `RateLimit-Remaining/Reset`.
    PerSecond { n: u32, headers: bool },
}

#[derive(Default)]
struct Fixture {
    /// Arrival times of every request, by instance path.
    hits: Vec<(Instant, String)>,
    /// Items per instance (`detect: new`).
    items: BTreeMap<String, Vec<Value>>,
    /// Per-instance status to answer instead (500, …).
    fail: BTreeMap<String, u16>,
    /// 503 + this `Retry-After` HTTP date until then.
    storm_until: Option<SystemTime>,
    /// Requests of these instances hang (a dead upstream).
    hang: bool,
    window: (u64, u32),
    refused: u32,
    limit: Option<Limit>,
}

type Shared = Arc<Mutex<Fixture>>;

async fn handler(State(f): State<Shared>, Path(inst): Path<String>) -> Response {
    let (hang, answer) = {
        let mut fx = f.lock().unwrap();
        fx.hits.push((Instant::now(), inst.clone()));
        if let Some(until) = fx.storm_until {
            if SystemTime::now() < until {
                let date = httpdate(until);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", date)],
                    "storm",
                )
                    .into_response();
            }
        }
        if let Some(code) = fx.fail.get(&inst) {
            return StatusCode::from_u16(*code).unwrap().into_response();
        }
        let mut extra = HeaderMap::new();
        if let Some(Limit::PerSecond { n, headers }) = fx.limit {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
            let sec = now.as_secs();
            if fx.window.0 != sec {
                fx.window = (sec, 0);
            }
            fx.window.1 += 1;
            let used = fx.window.1;
            if headers {
                let left = n.saturating_sub(used);
                extra.insert("ratelimit-limit", HeaderValue::from(n));
                extra.insert("ratelimit-remaining", HeaderValue::from(left));
                extra.insert("ratelimit-reset", HeaderValue::from(1u32));
            }
            if used > n {
                fx.refused += 1;
                extra.insert("retry-after", HeaderValue::from(1u32));
                return (StatusCode::TOO_MANY_REQUESTS, extra, "slow down").into_response();
            }
        }
        let items = fx.items.get(&inst).cloned().unwrap_or_default();
        (
            fx.hang,
            (extra, axum::Json(json!({ "items": items }))).into_response(),
        )
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    answer
}

fn httpdate(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

async fn fixture() -> (std::net::SocketAddr, Shared) {
    let f: Shared = Arc::new(Mutex::new(Fixture::default()));
    let app = Router::new()
        .route("/{inst}", get(handler))
        .with_state(f.clone());
    (serve(app).await, f)
}

const LISTER: &str = r#"
name: lister
params: { base_url: { required: true }, inst: { required: true } }
request: { url: "{{ base_url }}/{{ inst }}", timeout: 10s }
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
emit: [{ type: item.new }]
"#;

fn bridge(addr: &str, rx: &str, n: usize, schedule: &str, hosts: &str) -> String {
    let insts: Vec<String> = (0..n).map(|i| format!("i{i:02}")).collect();
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  s:
    connector: lister
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ inst: [{}] }}
    schedule: {schedule}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{rx}", secret: "{secret}", retry: {{ first: 50ms, max: 500ms }} }}
{hosts}
"#,
        insts.join(", "),
        secret = secret()
    )
}

/// The most requests in any 1-second window.
fn max_per_second(hits: &[Instant]) -> usize {
    let mut best = 0;
    for (i, t) in hits.iter().enumerate() {
        let n = hits[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1))
            .count();
        best = best.max(n);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scarce_host_quota_is_never_exceeded_and_shared_round_robin() {
    let (addr, fx) = fixture().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    // 30 instances want 20 polls/s each; the host allows 20/s in all.
    let hosts = format!(
        "hosts:\n  \"127.0.0.1:{}\": {{ rate: 20/s, burst: 2 }}",
        addr.port()
    );
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &rx.url, 30, "every 50ms", &hosts),
        &[("lister.yaml", LISTER.to_string())],
    );
    d.start().await;
    wait_for("100 requests", Duration::from_secs(30), || {
        fx.lock().unwrap().hits.len() >= 100
    })
    .await;
    let status = d.status().await;
    d.terminate();
    let hits = fx.lock().unwrap().hits.clone();
    let times: Vec<Instant> = hits.iter().map(|h| h.0).collect();
    let peak = max_per_second(&times);
    eprintln!("peak {peak} requests in one second");
    assert!(peak <= 22, "rate 20/s + burst 2, got {peak} in one second");
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for (_, inst) in &hits[..90] {
        *per.entry(inst.clone()).or_default() += 1;
    }
    assert_eq!(per.len(), 30, "every instance polled: {per:?}");
    let (lo, hi) = (per.values().min().unwrap(), per.values().max().unwrap());
    // 3 each on average; an instance whose first turn came last may be one
    // turn behind, never starved (a fixed order starves the tail: 0 or 1).
    assert!(
        *lo >= 2 && *hi <= 4,
        "round-robin: about 3 each of the first 90, got {per:?}"
    );
    // The stretched interval is visible: 30 instances / 20 per second.
    let ms = status["instances"]["s/i07"]["effective_interval_ms"]
        .as_u64()
        .unwrap();
    assert!(ms >= 1000, "effective interval {ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_upstream_quota_is_learned_from_429s_and_no_change_is_missed() {
    for headers in [false, true] {
        let (addr, fx) = fixture().await;
        fx.lock().unwrap().limit = Some(Limit::PerSecond { n: 10, headers });
        let rx = Receiver::start(&secret(), Plan::Always(204)).await;
        let mut d = Daemon::new(
            &bridge(&addr.to_string(), &rx.url, 6, "every 50ms", ""),
            &[("lister.yaml", LISTER.to_string())],
        );
        d.start().await;
        let all: Vec<String> = (0..6).map(|i| format!("s/i{i:02}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        d.wait_polls(&all, 1).await;
        // Items appear while pollhook asks 12 times more often than allowed.
        let mut want = Vec::new();
        for round in 0..3 {
            {
                let mut f = fx.lock().unwrap();
                for i in 0..6 {
                    let list = f.items.entry(format!("i{i:02}")).or_default();
                    let id = format!("i{i:02}-{round}");
                    list.push(json!({ "id": id }));
                    want.push(id);
                }
            }
            let before = fx.lock().unwrap().hits.len();
            wait_for("a second of requests", Duration::from_secs(20), || {
                fx.lock().unwrap().hits.len() >= before + 12
            })
            .await;
        }
        let ids = |rx: &Receiver| -> Vec<String> {
            rx.accepted()
                .iter()
                .map(|x| x.body["data"]["id"].as_str().unwrap().to_string())
                .collect()
        };
        wait_for("every item", Duration::from_secs(30), || {
            let got = ids(&rx);
            want.iter().all(|id| got.contains(id))
        })
        .await;
        let s = d.status().await;
        d.terminate();
        let got = ids(&rx);
        let mut uniq = got.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), got.len(), "no duplicates: {got:?}");
        assert_eq!(got.len(), want.len(), "{got:?}");
        let (total, refused) = {
            let f = fx.lock().unwrap();
            (f.hits.len() as u32, f.refused)
        };
        let host = &s["hosts"][format!("127.0.0.1:{}", addr.port())];
        eprintln!("headers={headers}: {refused} refused of {total} requests; host {host}");
        if headers {
            assert!(
                refused <= 3,
                "RateLimit headers slow pollhook down before refusals: {refused} of {total}"
            );
        } else {
            assert!(refused >= 1, "the fixture did refuse");
            assert!(host["pauses"].as_u64().unwrap() >= 1, "{host}");
            assert!(
                refused * 3 < total,
                "Retry-After pauses the host: {refused} refused of {total}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_with_an_http_date_pauses_every_instance_then_recovers() {
    let (addr, fx) = fixture().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &rx.url, 5, "every 50ms", ""),
        &[("lister.yaml", LISTER.to_string())],
    );
    d.start().await;
    d.wait_polls(&["s/i00", "s/i01", "s/i02", "s/i03", "s/i04"], 2)
        .await;
    // Whole seconds: an HTTP date has no fraction.
    let until = SystemTime::now() + Duration::from_secs(3);
    let until = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            until
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let start = {
        let mut f = fx.lock().unwrap();
        f.storm_until = Some(until);
        f.items
            .insert("i03".into(), vec![json!({"id": "after-storm"})]);
        f.hits.len()
    };
    wait_for("the item after the storm", Duration::from_secs(30), || {
        !rx.accepted().is_empty()
    })
    .await;
    let hits = fx.lock().unwrap().hits[start..].to_vec();
    let stormed: Vec<_> = hits
        .iter()
        .filter(|(t, _)| SystemTime::now() - t.elapsed() < until - Duration::from_millis(50))
        .collect();
    // Every instance polled every 50 ms would send ~60 requests in the
    // storm; a paused host gets the ones already in flight, then nothing.
    assert!(
        stormed.len() <= 10,
        "{} requests during a 3 s Retry-After",
        stormed.len()
    );
    assert_eq!(rx.accepted()[0].body["data"]["id"], "after-storm");
    let polls = polls_of(&d.status().await, "s/i00");
    d.wait_polls(&["s/i00"], polls + 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_backs_off_and_a_dead_host_delays_nobody() {
    let (good, gfx) = fixture().await;
    let (dead, dfx) = fixture().await;
    dfx.lock().unwrap().hang = true;
    gfx.lock().unwrap().fail.insert("i01".into(), 500);
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  good:
    connector: lister
    with: {{ base_url: "http://{good}" }}
    for_each: {{ inst: [i00, i01] }}
    schedule: every 50ms
    deliver_to: [agent]
  dead:
    connector: lister
    with: {{ base_url: "http://{dead}" }}
    for_each: {{ inst: [d0, d1, d2, d3] }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{rx}", secret: "{secret}" }}
hosts:
  "127.0.0.1:{dport}": {{ max_in_flight: 2 }}
"#,
        rx = rx.url,
        secret = secret(),
        dport = dead.port()
    );
    let mut d = Daemon::new(&bridge, &[("lister.yaml", LISTER.to_string())]);
    d.start().await;
    // The healthy instance keeps its 50 ms pace while the dead host hangs
    // and the failing one backs off.
    d.wait_polls(&["good/i00"], 40).await;
    let s = d.status().await;
    let count = |fx: &Shared, inst: &str| {
        fx.lock()
            .unwrap()
            .hits
            .iter()
            .filter(|h| h.1 == inst)
            .count()
    };
    let failing = count(&gfx, "i01");
    assert!(
        failing <= 6,
        "backed off (1 s, 2 s, …): {failing} requests while the healthy one made 40"
    );
    assert!(
        s["instances"]["good/i01"]["consecutive_failures"]
            .as_u64()
            .unwrap()
            >= 2,
        "{s:#}"
    );
    assert!(
        dfx.lock().unwrap().hits.len() <= 2,
        "max_in_flight 2 on the dead host"
    );
    // Recovery: back to the schedule.
    gfx.lock().unwrap().fail.clear();
    d.wait_polls(&["good/i01"], 10).await;
    assert_eq!(
        d.status().await["instances"]["good/i01"]["consecutive_failures"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_schedule_speeds_up_after_a_change_and_relaxes_while_quiet() {
    let (addr, fx) = fixture().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(
            &addr.to_string(),
            &rx.url,
            1,
            "{ every: 200ms, min: 20ms, max: 400ms }",
            "",
        ),
        &[("lister.yaml", LISTER.to_string())],
    );
    d.start().await;
    let interval = |s: &Value| s["instances"]["s/i00"]["interval_ms"].as_u64();
    // Quiet: the interval grows to its max.
    d.wait_status("relaxed to 400 ms", |s| interval(s) == Some(400))
        .await;
    // A change: back to the minimum right after it.
    fx.lock()
        .unwrap()
        .items
        .insert("i00".into(), vec![json!({"id": "x"})]);
    wait_for("the change", Duration::from_secs(20), || {
        !rx.accepted().is_empty()
    })
    .await;
    let mut fastest = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && fastest > 100 {
        fastest = fastest.min(interval(&d.status().await).unwrap_or(u64::MAX));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(fastest <= 100, "sped up after the change: {fastest} ms");
}

/// A throttled request waited out within a poll gives its slot back
/// before it asks again: on a host with `max_in_flight: 1`, keeping the
/// first slot while waiting for a second one would wait forever (and hold
/// the host's turn, stopping every other request to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_retry_on_a_host_with_one_slot_completes() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/status",
        get(move || {
            let n = h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
                } else {
                    axum::Json(json!({"state": "green"})).into_response()
                }
            }
        }),
    );
    let addr = serve(app).await;
    let bridge = format!(
        "sources:\n  s:\n    connector: {{ request: {{ url: \"http://{addr}/status\" }}, detect: snapshot, emit: [{{ type: status.changed }}] }}\n    schedule: every 1m\n    deliver_to: [a]\nendpoints:\n  a: {{ url: \"http://127.0.0.1:9/\", secret: \"{}\" }}\nhosts:\n  127.0.0.1: {{ max_in_flight: 1 }}\n",
        secret()
    );
    let d = Daemon::new(&bridge, &[]);
    let mut child = d
        .command(&["test", "s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the poll hung after a 429 on a host with max_in_flight: 1");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("-> 200"), "{out}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}
