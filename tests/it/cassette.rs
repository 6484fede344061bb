//! `pollhook record`, `pollhook test --replay` (with `--expect` and
//! `--update`) and `pollhook test --polls`, through the real binary, with a
//! real local upstream that changes between polls.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::support::*;

const TOKEN: &str = "tok-s3cret-9981";

/// An upstream listing items with an `ETag`: its first two answers are
/// version 1 (the second, to a conditional request, a 304), later ones
/// version 2 (item `b` changed, item `c` added, item `a` changed below
/// what the connector's `when` emits for). Each answer echoes the
/// token, so masking of bodies is tested too. With `gone` set it answers
/// 500 to everything: a replay must not need it.
struct Upstream {
    requests: Arc<AtomicUsize>,
    gone: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

async fn upstream() -> Upstream {
    let requests = Arc::new(AtomicUsize::new(0));
    let gone = Arc::new(AtomicBool::new(false));
    let (r, g) = (requests.clone(), gone.clone());
    let app = axum::Router::new().route(
        "/items",
        axum::routing::get(move |headers: HeaderMap| {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            let gone = g.load(Ordering::SeqCst);
            async move {
                let authorized = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
                    == Some(&format!("Bearer {TOKEN}"));
                if gone || !authorized {
                    return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                }
                let (etag, items) = if n <= 2 {
                    (
                        "\"v1\"",
                        json!([{"id": "a", "amount": 1}, {"id": "b", "amount": 2}, {"id": "d", "amount": 9}]),
                    )
                } else {
                    (
                        "\"v2\"",
                        json!([{"id": "a", "amount": 4}, {"id": "b", "amount": 20}, {"id": "c", "amount": 3}, {"id": "d", "amount": 9}]),
                    )
                };
                if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag) {
                    return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
                }
                (
                    [(header::ETAG, etag)],
                    axum::Json(json!({"items": items, "echo": format!("called with {TOKEN}")})),
                )
                    .into_response()
            }
        }),
    );
    let addr = serve(app).await;
    Upstream {
        requests,
        gone,
        addr,
    }
}

const CONNECTOR: &str = r#"
name: items
params:
  base_url: { required: true }
  token: { required: true, secret: true }
request:
  url: "{{ base_url }}/items"
  auth: { type: bearer, token: "{{ token }}" }
items: "$.items[*]"
id: "{{ item.id }}"
detect: changes
emit:
  - { type: item.created, when: "change == 'created'" }
  - { type: item.updated, when: "change == 'updated' and item.amount > 5" }
"#;

fn daemon(addr: std::net::SocketAddr) -> Daemon {
    let bridge = format!(
        "sources:\n  items:\n    connector: items\n    with: {{ base_url: \"http://{addr}\", token: \"${{API_TOKEN}}\" }}\n    schedule: every 1m\n    deliver_to: [a]\nendpoints:\n  a: {{ url: \"http://127.0.0.1:9/\", secret: \"{}\" }}\n",
        secret()
    );
    let mut d = Daemon::new(&bridge, &[("items.yaml", CONNECTOR.to_string())]);
    d.env.push(("API_TOKEN".into(), TOKEN.into()));
    d
}

fn run(d: &Daemon, args: &[&str]) -> (Output, String) {
    let out = d.command(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out, text)
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_cassette_replays_byte_for_byte_and_is_a_test() {
    let up = upstream().await;
    let d = daemon(up.addr);
    let gone = up.gone.clone();
    tokio::task::spawn_blocking(move || {
        let dir = d.dir.path().join("cassette");
        let to = dir.to_str().unwrap();
        let (out, text) = run(&d, &["record", "items", "--polls", "3", "--to", to]);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("recorded 3 exchange(s) of 3 poll(s)"),
            "{text}"
        );
        assert_eq!(
            files_of(&dir),
            ["p001-001.json", "p002-001.json", "p003-001.json"]
        );
        // Secrets never reach the disk, in headers or bodies.
        for name in files_of(&dir) {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            assert!(!text.contains(TOKEN), "{name} holds the token: {text}");
        }
        let first: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("p001-001.json")).unwrap())
                .unwrap();
        assert_eq!(first["poll"], 1);
        assert_eq!(first["request_headers"]["authorization"], "***");
        assert_eq!(first["body_json"]["echo"], "called with ***");
        assert_eq!(first["body_json"]["items"][1]["amount"], 2);
        let second: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("p002-001.json")).unwrap())
                .unwrap();
        assert_eq!(second["status"], 304);
        assert_eq!(second["request_headers"]["if-none-match"], "\"v1\"");

        // The upstream is gone: the replay needs only the cassette.
        gone.store(true, Ordering::SeqCst);
        let (out, text) = run(&d, &["test", "items", "--replay", to]);
        assert!(out.status.success(), "{text}");
        let replayed = String::from_utf8_lossy(&out.stdout).into_owned();
        for want in [
            "== poll 1 at ",
            "record a: first poll: remembered as the baseline, nothing emitted",
            "== poll 2 at ",
            "-> 304 (not modified)",
            "not modified: nothing to detect, the state stays",
            "== poll 3 at ",
            "record a: updated; filtered out: no `when` condition is true, nothing emitted (changed: amount)\n     when `change == 'created'` -> false\n     when `change == 'updated' and item.amount > 5` -> false",
            "record d: unchanged",
            "record b: updated; emits item.updated (changed: amount)",
            "record c: created; emits item.created",
            "2 event(s)",
            "\"type\": \"item.updated\"",
        ] {
            assert!(replayed.contains(want), "missing `{want}` in:\n{replayed}");
        }
        assert!(!replayed.contains(TOKEN), "{replayed}");
        let (again, _) = run(&d, &["test", "items", "--replay", to]);
        assert_eq!(
            String::from_utf8_lossy(&again.stdout),
            replayed,
            "the same cassette gives the same output"
        );

        // The cassette and its output are a test.
        let expect = d.dir.path().join("expected.txt");
        let ex = expect.to_str().unwrap();
        let args = ["test", "items", "--replay", to, "--expect", ex];
        let (out, text) = run(&d, &[&args[..], &["--update"]].concat());
        assert!(out.status.success(), "{text}");
        assert_eq!(std::fs::read_to_string(&expect).unwrap(), replayed);
        let (out, text) = run(&d, &args);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("(as expected in "), "{text}");
        let edited = replayed.replace("record c: created", "record c: deleted");
        std::fs::write(&expect, &edited).unwrap();
        let (out, text) = run(&d, &args);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("-   record c: deleted") && text.contains("+   record c: created"),
            "{text}"
        );
        let (out, text) = run(&d, &[&args[..], &["--update"]].concat());
        assert!(out.status.success(), "{text}");
        assert_eq!(std::fs::read_to_string(&expect).unwrap(), replayed);

        // A cassette that does not match the pipeline's requests says so.
        let p3 = dir.join("p003-001.json");
        let moved = std::fs::read_to_string(&p3)
            .unwrap()
            .replace("/items", "/other");
        std::fs::write(&p3, moved).unwrap();
        let (out, text) = run(&d, &["test", "items", "--replay", to]);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("request 1 of items/default in poll 3 differs from the cassette")
                && text.contains("p003-001.json recorded GET http://"),
            "{text}"
        );
        // Nor does one holding more requests than the pipeline sends.
        std::fs::copy(dir.join("p001-001.json"), dir.join("p001-002.json")).unwrap();
        let (out, text) = run(&d, &["test", "items", "--replay", to]);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("fewer requests than the cassette holds for this poll: p001-002.json"),
            "{text}"
        );
    })
    .await
    .unwrap();
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        3,
        "only the recording asked the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_polls_show_the_baseline_then_not_modified() {
    let up = upstream().await;
    let d = daemon(up.addr);
    let (out, text) =
        tokio::task::spawn_blocking(move || run(&d, &["test", "items", "--polls", "2"]))
            .await
            .unwrap();
    assert!(out.status.success(), "{text}");
    let poll2 = text.find("== poll 2").expect(&text);
    let (first, second) = text.split_at(poll2);
    assert!(
        first.contains("-> 200 (3 records)")
            && first.contains("record b: first poll: remembered as the baseline"),
        "{text}"
    );
    assert!(
        second.contains("-> 304 (not modified)") && second.contains("nothing to detect"),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "{text}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

const ISSUED: &str = "issued-at-9f3k2m7q";

/// An identity provider issuing one token (good for a second), and an
/// API that answers only to it.
async fn oauth_upstream() -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::post(|body: String| async move {
                if !body.contains("client_secret=cl1ent-s3cret") {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                axum::Json(json!({"access_token": ISSUED, "token_type": "Bearer", "expires_in": 1}))
                    .into_response()
            }),
        )
        .route(
            "/status",
            axum::routing::get(|headers: HeaderMap| async move {
                let ok = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    == Some(&format!("Bearer {ISSUED}"));
                if ok {
                    axum::Json(json!({"state": "green"})).into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }),
        );
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_token_requests_are_recorded_masked_and_replayed() {
    let addr = oauth_upstream().await;
    let connector = r#"
name: status
params:
  base_url: { required: true }
  client_secret: { required: true, secret: true }
request:
  url: "{{ base_url }}/status"
  auth:
    type: oauth2
    token_url: "{{ base_url }}/token"
    client_id: app
    client_secret: "{{ client_secret }}"
    client_auth: body
detect: snapshot
emit: [{ type: status.changed }]
"#;
    let bridge = format!(
        "sources:\n  status:\n    connector: status\n    with: {{ base_url: \"http://{addr}\", client_secret: \"${{CLIENT_SECRET}}\" }}\n    schedule: every 1m\n    deliver_to: [a]\nendpoints:\n  a: {{ url: \"http://127.0.0.1:9/\", secret: \"{}\" }}\n",
        secret()
    );
    let mut d = Daemon::new(&bridge, &[("status.yaml", connector.to_string())]);
    d.env.push(("CLIENT_SECRET".into(), "cl1ent-s3cret".into()));
    tokio::task::spawn_blocking(move || {
        let dir = d.dir.path().join("cassette");
        let to = dir.to_str().unwrap();
        let args = ["record", "status", "--polls", "2", "--every", "1100ms"];
        let (out, text) = run(&d, &[&args[..], &["--to", to]].concat());
        assert!(out.status.success(), "{text}");
        // The token lives one second: the second poll asks for a new one.
        // The replay, at once, does not, and still matches (token requests
        // are answered apart from the pages' order).
        assert_eq!(
            files_of(&dir),
            [
                "p001-001.json",
                "p001-002.json",
                "p002-001.json",
                "p002-002.json"
            ],
            "{text}\n{}",
            std::fs::read_to_string(dir.join("p002-001.json")).unwrap_or_default()
        );
        for name in files_of(&dir) {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            for secret in [ISSUED, "cl1ent-s3cret"] {
                assert!(!text.contains(secret), "{name} holds {secret}: {text}");
            }
        }
        let token: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("p001-001.json")).unwrap())
                .unwrap();
        assert_eq!(token["method"], "POST");
        assert_eq!(token["token"], true);
        assert_eq!(token["body_json"]["access_token"], "***");
        assert!(
            token["request_body"]
                .as_str()
                .unwrap()
                .contains("client_secret=***"),
            "{token}"
        );
        let (out, text) = run(&d, &["test", "status", "--replay", to]);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("/status -> 200"), "{text}");
        assert!(text.contains("record snapshot: unchanged"), "{text}");
        assert!(!text.contains(ISSUED), "{text}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_polls_keep_the_connectors_rate_limit() {
    let up = upstream().await;
    let mut d = daemon(up.addr);
    let limited = CONNECTOR.replace("detect: changes", "detect: changes\nrate_limit: 1/1h");
    std::fs::write(d.dir.path().join("connectors/items.yaml"), limited).unwrap();
    d.env.push(("POLLHOOK_LOG".into(), "warn".into()));
    let (out, text) =
        tokio::task::spawn_blocking(move || run(&d, &["test", "items", "--polls", "2"]))
            .await
            .unwrap();
    assert!(out.status.success(), "put off is not a failure: {text}");
    let (first, second) = text.split_at(text.find("== poll 2").expect(&text));
    assert!(first.contains("-> 200 (3 records)"), "{text}");
    assert!(
        second.contains(
            "warning: poll put off: the connector's rate_limit allows the next request in"
        ),
        "{text}"
    );
    assert!(!second.contains("-> "), "nothing sent: {text}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}
