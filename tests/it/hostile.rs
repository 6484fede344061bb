//! Hostile input and faults: what a connector author, an upstream or a
//! discovery listing can send to pollhook must stay an error of its own
//! instance, never freeze, crash or fool the daemon, its logs or its masks.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::RawQuery;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::support::*;

/// `pollhook test <connector file>` with `--with` params, no bridge:
/// (success, stdout + stderr).
async fn try_connector(connector: &str, with: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, connector).unwrap();
    let mut c = Command::new(bin());
    c.current_dir(dir.path()).arg("test").arg(&file);
    for w in with {
        c.args(["--with", w]);
    }
    let out = tokio::task::spawn_blocking(move || {
        let _dir = dir;
        c.output().unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_across_the_snippet_cut_in_another_encoding_is_masked() {
    // The upstream refuses the key and echoes it back, re-encoded its own
    // way (`/` raw, `+` as %2B), starting a few bytes before the 80th.
    async fn refuse(RawQuery(q): RawQuery) -> impl IntoResponse {
        let sent = q.unwrap_or_default();
        assert!(sent.contains("qkSEKRET%2Fquery%2B77"), "{sent}");
        let body = format!("{}key=qkSEKRET/query%2B77 is not valid", "x".repeat(72));
        (StatusCode::UNAUTHORIZED, body)
    }
    let addr = serve(Router::new().route("/x", get(refuse))).await;
    let connector = r#"
name: keyed
params: { base_url: { required: true }, key: { secret: true, required: true } }
request:
  url: "{{ base_url }}/x"
  auth: { type: api_key, in: query, name: api_key, value: "{{ key }}" }
detect: snapshot
emit: [{ type: x }]
"#;
    let (ok, out) = try_connector(
        connector,
        &[
            format!("base_url=http://{addr}"),
            "key=qkSEKRET/query+77".into(),
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("HTTP 401"), "{out}");
    assert!(out.contains("key=***"), "the echo is masked: {out}");
    assert!(!out.contains("qkS"), "no part of the secret shows: {out}");
}

/// An upstream that answers any path with `{"value": 1}` and records the
/// paths (as sent, still encoded) it was asked for.
async fn recording_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().fallback({
        let seen = seen.clone();
        move |uri: Uri| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(uri.to_string());
                axum::Json(serde_json::json!({ "value": 1, "accounts": [] }))
            }
        }
    });
    (serve(app).await, seen)
}

/// A connector whose URL template runs 10^8 loop iterations over a
/// 10,000-character param.
fn runaway_connector() -> String {
    format!(
        r#"
name: runaway
params:
  base_url: {{ required: true }}
  pad: {{ default: "{}" }}
  n: {{ default: "0" }}
request:
  url: "{{{{ base_url }}}}/x{{% for a in pad %}}{{% for b in pad %}}{{% endfor %}}{{% endfor %}}"
detect: snapshot
emit: [{{ type: x }}]
"#,
        "p".repeat(10_000)
    )
}

const PROBE: &str = r#"
name: probe
params: { base_url: { required: true }, acct: { required: true } }
request: { url: "{{ base_url }}/accounts/{{ acct }}/balance" }
detect: snapshot
emit: [{ type: probe.changed, when: "current.value != previous.value" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_url_template_is_an_error_of_its_instance_only() {
    let (addr, seen) = recording_upstream().await;

    // `pollhook test` ends, with the template error.
    let started = Instant::now();
    let (ok, out) = try_connector(&runaway_connector(), &[format!("base_url=http://{addr}")]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("template error in request.url") && out.contains("template limit"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );

    // Under `run`, the other instances poll, `/healthz` answers, SIGTERM ends it.
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  runaway:
    connector: runaway
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ n: ["1", "2"] }}
    schedule: every 50ms
    deliver_to: [agent]
  good:
    connector: probe
    with: {{ base_url: "http://{addr}", acct: a1 }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[
            ("runaway.yaml", runaway_connector()),
            ("probe.yaml", PROBE.to_string()),
        ],
    );
    d.start().await;
    let s = d
        .wait_status("the runaway instances failing with a template error", |s| {
            s["instances"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with("runaway/"))
                .filter(|(_, v)| {
                    v["polls_failed"].as_u64().unwrap_or(0) >= 1
                        && v["last_error"]
                            .as_str()
                            .unwrap_or("")
                            .contains("template limit")
                })
                .count()
                == 2
        })
        .await;
    let good_before = s["instances"]["good/default"]["polls_ok"]
        .as_u64()
        .unwrap_or(0);
    // Meanwhile, and after: the good instance polls and /healthz answers
    // quickly while the runaway renders keep coming back.
    for _ in 0..10 {
        let t = Instant::now();
        let r = reqwest::get(format!("http://{}/healthz", d.admin.as_ref().unwrap()))
            .await
            .unwrap();
        assert!(r.status().is_success());
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.wait_polls(&["good/default"], good_before + 5).await;
    assert!(
        seen.lock().unwrap().iter().all(|u| !u.starts_with("/x")),
        "the runaway URL was never requested"
    );
    let t = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let st = d.terminate();
        (st, d)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_param_value_cannot_leave_its_url_path_segment() {
    let (addr, seen) = recording_upstream().await;
    let (ok, out) = try_connector(
        PROBE,
        &[
            format!("base_url=http://{addr}"),
            "acct=../../admin/delete?all=1#".into(),
        ],
    )
    .await;
    assert!(ok, "{out}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["/accounts/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/balance"],
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_names_cannot_forge_log_lines_nor_values_leave_their_segment() {
    let forged = "evil\n\x1b[31mERROR pollhook: forged";
    let listing = serde_json::json!({
        "value": 1,
        "accounts": [
            { "id": "good", "acct": "../../admin/delete?all=1#" },
            { "id": forged, "acct": "x" },
        ]
    });
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = Router::new().fallback({
        let seen = seen.clone();
        move |uri: Uri| {
            let (seen, listing) = (seen.clone(), listing.clone());
            async move {
                seen.lock().unwrap().push(uri.to_string());
                axum::Json(listing)
            }
        }
    });
    let addr = serve(app).await;
    let connector = r#"
name: disc
params: { base_url: { required: true }, acct: { required: true } }
request: { url: "{{ base_url }}/accounts/{{ acct }}/balance" }
detect: snapshot
emit: [{ type: probe.changed, when: "current.value != previous.value" }]
discover:
  request: { url: "{{ base_url }}/accounts" }
  items: "$.accounts[*]"
  name: "{{ item.id }}"
  with: { acct: "{{ item.acct }}" }
  schedule: every 10m
"#;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  disc:
    connector: disc
    with: {{ base_url: "http://{addr}" }}
    for_each: discover
    discover_schedule: every 100ms
    schedule: every 50ms
    deliver_to: [agent]
  # A value that reaches a log line as it is (the instance name of a
  # failing poll): the log formatter, not the call site, escapes it.
  named:
    connector: disc
    with: {{ base_url: "http://{closed}" }}
    for_each: {{ acct: ["op\n\x1b[31mERROR pollhook: forged too"] }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(&bridge, &[("disc.yaml", connector.to_string())]);
    d.start().await;
    d.wait_polls(&["disc/good"], 2).await;
    wait_for("the skip warning", Duration::from_secs(20), || {
        d.log().contains("control characters")
    })
    .await;
    wait_for(
        "the named instance's failure",
        Duration::from_secs(20),
        || d.log().contains("forged too"),
    )
    .await;
    let s = d.status().await;
    let instances: Vec<&String> = s["instances"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("disc/"))
        .collect();
    assert_eq!(instances, ["disc/good"], "{s:#}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&"/accounts/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/balance".to_string()),
        "{seen:?}"
    );
    assert!(seen.iter().all(|u| !u.starts_with("/admin")), "{seen:?}");
    d.terminate();
    let log = d.log();
    assert!(!log.contains('\x1b'), "{log}");
    for line in log.lines().filter(|l| l.contains("forged")) {
        assert!(
            line.contains("WARN")
                && (line.contains(r"evil\n\u{1b}[31mERROR")
                    || line.contains(r"op\n\u{1b}[31mERROR")),
            "a line forged or unescaped: {line}\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_basic_auth_header_is_masked() {
    async fn refuse(headers: axum::http::HeaderMap) -> impl IntoResponse {
        let auth = headers["authorization"].to_str().unwrap().to_string();
        (StatusCode::FORBIDDEN, format!("denied: {auth}"))
    }
    let addr = serve(Router::new().route("/x", get(refuse))).await;
    let connector = r#"
name: basic
params: { base_url: { required: true }, user: { required: true }, pw: { secret: true, required: true } }
request:
  url: "{{ base_url }}/x"
  auth: { type: basic, username: "{{ user }}", password: "{{ pw }}" }
detect: snapshot
emit: [{ type: x }]
"#;
    let (ok, out) = try_connector(
        connector,
        &[
            format!("base_url=http://{addr}"),
            "user=someone".into(),
            "pw=pw1".into(),
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("denied: Basic ***"), "{out}");
    // base64("someone:pw1")
    assert!(!out.contains("c29tZW9uZTpwdzE"), "{out}");
}
