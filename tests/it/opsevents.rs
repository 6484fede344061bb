//! Operational events end to end: pollhook's own events (`operations:`)
//! arrive at the ops endpoint signed (verified with the reference Standard
//! Webhooks library), each exactly once: a failing then recovering
//! upstream, an endpoint answering 410, an event running out of attempts,
//! a 429 storm, an ops endpoint that itself fails, and a flood.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::support::*;

/// An upstream of items per feed that can fail (500) or refuse (429
/// with `Retry-After: 2`) on demand.
#[derive(Default)]
struct Feed {
    items: Mutex<Vec<u32>>,
    failing: AtomicBool,
    storm: AtomicBool,
    requests: AtomicU32,
}

async fn feed(State(f): State<Arc<Feed>>, Path(_name): Path<String>) -> Response {
    f.requests.fetch_add(1, Ordering::SeqCst);
    if f.storm.load(Ordering::SeqCst) {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        return (StatusCode::TOO_MANY_REQUESTS, h, "slow down").into_response();
    }
    if f.failing.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream broke").into_response();
    }
    let items: Vec<_> = f
        .items
        .lock()
        .unwrap()
        .iter()
        .map(|n| json!({ "id": n.to_string() }))
        .collect();
    Json(json!({ "items": items })).into_response()
}

async fn start_feed() -> (Arc<Feed>, std::net::SocketAddr) {
    let f = Arc::new(Feed::default());
    let app = Router::new()
        .route("/feeds/{name}", get(feed))
        .with_state(f.clone());
    (f.clone(), serve(app).await)
}

const CONNECTOR: &str = r#"
name: feed
params:
  base_url: { required: true }
  name: { required: true }
request:
  url: "{{ base_url }}/feeds/{{ name }}"
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
emit:
  - type: feed.item.created
"#;

/// A bridge with `feeds` instances, delivering to `agent`, and pollhook's
/// own events to `ops` (and `ops2` when given).
fn bridge(
    addr: std::net::SocketAddr,
    feeds: usize,
    agent: &Receiver,
    ops: &Receiver,
    ops2: Option<&Receiver>,
    operations: &str,
    agent_extra: &str,
) -> String {
    let names: Vec<String> = (0..feeds).map(|i| format!("f{i}")).collect();
    let ops2_line = ops2
        .map(|r| format!("  ops2: {{ url: \"{}\", secret: {} }}\n", r.url, secret()))
        .unwrap_or_default();
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
operations: {operations}
sources:
  news:
    connector: feed
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ name: [{}] }}
    schedule: every 100ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{}", secret: {}{agent_extra} }}
  ops: {{ url: "{}", secret: {}, retry: {{ schedule: [100ms], max_attempts: 2 }} }}
{ops2_line}"#,
        names.join(", "),
        agent.url,
        secret(),
        ops.url,
        secret()
    )
}

fn start(bridge: &str) -> Daemon {
    Daemon::new(bridge, &[("feed.yaml", CONNECTOR.to_string())])
}

/// The ops events of one type an ops receiver accepted (each verified).
fn ops_of(rx: &Receiver, kind: &str) -> Vec<Delivery> {
    let got = rx.accepted_of(kind);
    assert!(got.iter().all(|d| d.verified), "signed: {got:?}");
    assert!(
        got.iter()
            .all(|d| d.body["source"] == "pollhook" && d.body["instance"] == "ops"),
        "{got:?}"
    );
    got
}

/// Distinct webhook-ids of an ops receiver's accepted deliveries of `kind`.
fn distinct(rx: &Receiver, kind: &str) -> usize {
    ops_of(rx, kind)
        .iter()
        .map(|d| d.id.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_recovering_upstream_is_announced_once_each() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(204)).await;
    let ops = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        1,
        &agent,
        &ops,
        None,
        "{ deliver_to: [ops], failing_after: 3 }",
        "",
    ));
    d.start().await;
    d.wait_polls(&["news/f0"], 1).await;
    feed.failing.store(true, Ordering::SeqCst);
    wait_for("pollhook.instance.failing", Duration::from_secs(30), || {
        distinct(&ops, "pollhook.instance.failing") == 1
    })
    .await;
    // It keeps failing: nothing more is announced.
    d.wait_status("five failures in a row", |s| {
        s["instances"]["news/f0"]["consecutive_failures"].as_u64() >= Some(5)
    })
    .await;
    feed.failing.store(false, Ordering::SeqCst);
    wait_for(
        "pollhook.instance.recovered",
        Duration::from_secs(60),
        || distinct(&ops, "pollhook.instance.recovered") == 1,
    )
    .await;
    let before = polls_of(&d.status().await, "news/f0");
    d.wait_polls(&["news/f0"], before + 5).await;
    assert_eq!(distinct(&ops, "pollhook.instance.failing"), 1);
    assert_eq!(distinct(&ops, "pollhook.instance.recovered"), 1);
    let failing = &ops_of(&ops, "pollhook.instance.failing")[0].body["data"];
    assert_eq!(failing["instance"], "news/f0", "{failing}");
    assert_eq!(failing["connector"], "feed");
    assert_eq!(failing["error_kind"], "status");
    assert!(
        failing["error"].as_str().unwrap().contains("500"),
        "{failing}"
    );
    assert_eq!(failing["failures"], 3);
    let recovered = &ops_of(&ops, "pollhook.instance.recovered")[0].body["data"];
    assert_eq!(recovered["first_failure_at"], failing["first_failure_at"]);
    assert!(recovered["failures"].as_u64() >= Some(5), "{recovered}");
    assert!(recovered["failed_for_seconds"].as_f64() > Some(0.0));
    // Nothing about it went to the agent.
    assert!(agent.all().iter().all(|x| x.body["source"] == "news"));
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_410_is_announced_disabled_then_enabled() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(410)).await;
    let ops = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        1,
        &agent,
        &ops,
        None,
        "{ deliver_to: [ops] }",
        "",
    ));
    d.start().await;
    d.wait_polls(&["news/f0"], 1).await;
    feed.items.lock().unwrap().extend([1, 2]);
    wait_for(
        "pollhook.endpoint.disabled",
        Duration::from_secs(30),
        || distinct(&ops, "pollhook.endpoint.disabled") == 1,
    )
    .await;
    let ev = &ops_of(&ops, "pollhook.endpoint.disabled")[0].body["data"];
    assert_eq!(ev["endpoint"], "agent", "{ev}");
    assert!(ev["reason"].as_str().unwrap().contains("410"), "{ev}");
    agent.set_plan(Plan::Always(204));
    let out = d
        .command(&["endpoint", "enable", "agent"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("pollhook.endpoint.enabled", Duration::from_secs(30), || {
        distinct(&ops, "pollhook.endpoint.enabled") == 1
    })
    .await;
    wait_for("the held events", Duration::from_secs(30), || {
        agent.accepted().len() >= 2
    })
    .await;
    assert_eq!(distinct(&ops, "pollhook.endpoint.disabled"), 1);
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_out_of_attempts_is_announced_without_its_body() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(500)).await;
    let ops = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        1,
        &agent,
        &ops,
        None,
        "{ deliver_to: [ops] }",
        ", retry: { schedule: [50ms], max_attempts: 2 }, circuit: { failures: 100 }",
    ));
    d.start().await;
    d.wait_polls(&["news/f0"], 1).await;
    feed.items.lock().unwrap().push(7);
    wait_for(
        "pollhook.event.dead_lettered",
        Duration::from_secs(30),
        || distinct(&ops, "pollhook.event.dead_lettered") == 1,
    )
    .await;
    let sent = &agent.all()[0];
    let ev = &ops_of(&ops, "pollhook.event.dead_lettered")[0].body["data"];
    assert_eq!(ev["event_id"], sent.id, "{ev}");
    assert_eq!(ev["type"], "feed.item.created");
    assert_eq!(ev["source"], "news");
    assert_eq!(ev["instance"], "news/f0");
    assert_eq!(ev["endpoint"], "agent");
    assert_eq!(ev["attempts"], 2);
    assert!(ev["last_error"].as_str().unwrap().contains("500"), "{ev}");
    assert!(ev.get("data").is_none() && ev.get("body").is_none(), "{ev}");
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_one_throttled_event() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(204)).await;
    let ops = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        4,
        &agent,
        &ops,
        None,
        "{ deliver_to: [ops], throttled_after: 1s }",
        "",
    ));
    d.start().await;
    d.wait_polls(&["news/f0", "news/f1", "news/f2", "news/f3"], 1)
        .await;
    let before = feed.requests.load(Ordering::SeqCst);
    feed.storm.store(true, Ordering::SeqCst);
    wait_for("429s", Duration::from_secs(30), || {
        feed.requests.load(Ordering::SeqCst) > before
    })
    .await;
    wait_for("pollhook.quota.throttled", Duration::from_secs(30), || {
        distinct(&ops, "pollhook.quota.throttled") == 1
    })
    .await;
    // The storm ends within the pause; polling resumes.
    feed.storm.store(false, Ordering::SeqCst);
    let s = d.status().await;
    let polls = polls_of(&s, "news/f0");
    d.wait_polls(&["news/f0"], polls + 3).await;
    assert_eq!(distinct(&ops, "pollhook.quota.throttled"), 1);
    let ev = &ops_of(&ops, "pollhook.quota.throttled")[0].body["data"];
    assert_eq!(ev["host"], format!("127.0.0.1:{}", addr.port()), "{ev}");
    assert_eq!(ev["status"], 429);
    assert!(ev["pause_seconds"].as_f64() >= Some(1.9), "{ev}");
    assert!(d.terminate().success());
}

/// An ops endpoint that itself fails is not told about itself: its 410
/// is announced to the other ops endpoint only, and nothing chases its
/// own tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_about_an_ops_endpoint_never_go_to_it() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(204)).await;
    let ops = Receiver::start(&secret(), Plan::Always(410)).await;
    let ops2 = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        1,
        &agent,
        &ops,
        Some(&ops2),
        "{ deliver_to: [ops, ops2], failing_after: 1 }",
        "",
    ));
    d.start().await;
    d.wait_polls(&["news/f0"], 1).await;
    // A failure gives an event for both ops endpoints; `ops` answers 410.
    feed.failing.store(true, Ordering::SeqCst);
    wait_for(
        "ops disabled, told to ops2",
        Duration::from_secs(30),
        || {
            ops_of(&ops2, "pollhook.endpoint.disabled")
                .iter()
                .any(|e| e.body["data"]["endpoint"] == "ops")
        },
    )
    .await;
    feed.failing.store(false, Ordering::SeqCst);
    wait_for("recovered, told to ops2", Duration::from_secs(30), || {
        distinct(&ops2, "pollhook.instance.recovered") == 1
    })
    .await;
    // `ops` saw one attempt (the 410) and nothing about itself.
    let at_ops = ops.all();
    assert_eq!(at_ops.len(), 1, "{at_ops:?}");
    assert!(at_ops.iter().all(|e| e.body["data"]["endpoint"] != "ops"));
    assert_eq!(distinct(&ops2, "pollhook.endpoint.disabled"), 1);
    assert!(d.terminate().success());
}

/// Eight instances failing at once with room for three events a window:
/// three are sent, and one summary says five were left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_summarized_not_sent_one_by_one() {
    let (feed, addr) = start_feed().await;
    let agent = Receiver::start(&secret(), Plan::Always(204)).await;
    let ops = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = start(&bridge(
        addr,
        8,
        &agent,
        &ops,
        None,
        "{ deliver_to: [ops], failing_after: 1, max_per_minute: 3 }",
        "",
    ));
    d.env.push(("POLLHOOK_OPS_WINDOW".into(), "3s".into()));
    feed.failing.store(true, Ordering::SeqCst);
    d.start().await;
    wait_for("the summary", Duration::from_secs(30), || {
        distinct(&ops, "pollhook.ops.suppressed") == 1
    })
    .await;
    assert_eq!(distinct(&ops, "pollhook.instance.failing"), 3);
    let s = &ops_of(&ops, "pollhook.ops.suppressed")[0].body["data"];
    assert_eq!(s["suppressed"]["pollhook.instance.failing"], 5, "{s}");
    assert_eq!(s["total"], 5);
    assert!(d.terminate().success());
}
