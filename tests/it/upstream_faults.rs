//! Guarantee 5: an upstream that answers 500, HTML, truncated JSON or too
//! large a body is an error on that instance, never an event or a crash, and
//! the other instances go on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::support::*;

async fn upstream(State(v): State<Arc<AtomicU64>>, Path(mode): Path<String>) -> Response {
    match mode.as_str() {
        "ok" => {
            axum::Json(serde_json::json!({ "value": v.load(Ordering::SeqCst) })).into_response()
        }
        "e500" => (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
        "html" => (
            [("content-type", "text/html")],
            "<!DOCTYPE html><html><body>Maintenance</body></html>",
        )
            .into_response(),
        "truncated" => (
            [("content-type", "application/json")],
            r#"{"value": 1, "more": [1, 2"#,
        )
            .into_response(),
        "huge" => axum::Json(serde_json::json!({ "value": "x".repeat(64 * 1024) })).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

const CONNECTOR: &str = r#"
name: probe
params: { base_url: { required: true }, mode: { required: true } }
request:
  url: "{{ base_url }}/{{ mode }}"
  max_response_bytes: 4096
  timeout: 2s
detect: snapshot
emit: [{ type: probe.changed, when: "current.value != previous.value" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstreams_are_errors_of_their_instance_only() {
    let value = Arc::new(AtomicU64::new(1));
    let app = Router::new()
        .route("/{mode}", get(upstream))
        .with_state(value.clone());
    let addr = serve(app).await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  probe:
    connector: probe
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ mode: [ok, e500, html, truncated, huge] }}
    schedule: every 50ms
    deliver_to: [agent]
  gone:
    connector: probe
    with: {{ base_url: "http://{closed}", mode: ok }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(&bridge, &[("probe.yaml", CONNECTOR.to_string())]);
    d.start().await;
    d.wait_polls(&["probe/ok"], 1).await;
    value.store(2, Ordering::SeqCst);
    wait_for(
        "the healthy instance's change",
        Duration::from_secs(20),
        || rx.accepted().len() == 1,
    )
    .await;
    let polls = polls_of(&d.status().await, "probe/ok");
    d.wait_polls(&["probe/ok"], polls + 3).await;

    let s = d.status().await;
    let err = |i: &str| {
        s["instances"][i]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(err("probe/e500").contains("HTTP 500"), "{s:#}");
    assert!(
        err("probe/html").contains("an HTML page") && err("probe/html").contains("<!DOCTYPE html>"),
        "{s:#}"
    );
    assert!(err("probe/truncated").contains("not valid JSON"), "{s:#}");
    assert!(err("probe/huge").contains("4096-byte cap"), "{s:#}");
    assert!(err("gone/default").contains("cannot connect"), "{s:#}");
    for i in [
        "probe/e500",
        "probe/html",
        "probe/truncated",
        "probe/huge",
        "gone/default",
    ] {
        assert!(
            s["instances"][i]["polls_failed"].as_u64().unwrap() >= 1,
            "{i}: {s:#}"
        );
        assert_eq!(s["instances"][i]["polls_ok"], 0, "{i}");
        assert_eq!(s["instances"][i]["events"], 0, "{i}");
    }
    let got = rx.accepted();
    assert_eq!(got.len(), 1, "only the healthy instance emitted");
    assert_eq!(got[0].body["instance"], "ok");
    assert!(
        d.log().contains("instance=probe/html"),
        "log lines name the instance"
    );
    assert!(d.terminate().success(), "still running, exits cleanly");
}

/// An event over 1 MiB (a probe's 9 MB item was emitted whole and retried
/// for hours) is an error of its instance: nothing is emitted or
/// committed, and the next change that fits is detected as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_cap_is_an_error_not_a_webhook() {
    let pad = Arc::new(AtomicU64::new(1));
    let app = Router::new()
        .route(
            "/big",
            get(|State(n): State<Arc<AtomicU64>>| async move {
                let n = n.load(Ordering::SeqCst);
                // 600 KB each side: previous + current is over 1 MiB.
                let len = if n == 2 || n == 3 { 600_000 } else { 10 };
                axum::Json(serde_json::json!({ "v": n, "pad": "x".repeat(len) }))
            }),
        )
        .with_state(pad.clone());
    let addr = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let connector = r#"
name: big
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/big" }
detect: snapshot
emit: [{ type: big.changed }]
"#;
    let bridge = one_source_bridge("big", "big", addr, "200ms", &rx.url, "");
    let mut d = Daemon::new(&bridge, &[("big.yaml", connector.to_string())]);
    d.start().await;
    d.wait_polls(&["big/default"], 2).await;
    // 10 bytes of pad to 600 KB: previous (small) + current (600 KB) fits;
    // then 600 KB to another 600 KB does not.
    pad.store(2, Ordering::SeqCst);
    wait_for("the first change", Duration::from_secs(20), || {
        rx.accepted().len() == 1
    })
    .await;
    pad.store(3, Ordering::SeqCst);
    d.wait_status("the oversized event refused", |s| {
        s["instances"]["big/default"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("more than the 1024 KiB an event may carry"))
    })
    .await;
    assert_eq!(rx.accepted().len(), 1, "nothing emitted over the cap");
    // Back to a small value: detected and delivered.
    pad.store(4, Ordering::SeqCst);
    wait_for("the next change", Duration::from_secs(20), || {
        rx.accepted().len() == 2
    })
    .await;
    assert!(d.terminate().success());
}
