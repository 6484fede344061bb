//! Hostile input and faults: what a connector author, an upstream or a
//! discovery listing can send to pollhook must stay an error of its own
//! instance, never freeze, crash or fool the daemon, its logs or its masks.

use std::process::Command;
use std::time::Duration;

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
