//! `pollhook new connector NAME --from-curl '…'` / `--from-url URL`
//! through the real binary, against real local upstreams: the connector
//! written validates, holds no secret, and `pollhook test` on it reads
//! every page; a bad command or an unreachable URL writes nothing.

use std::path::Path;
use std::process::{Command, Output};

use axum::extract::Query;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use crate::support::*;

const TOKEN: &str = "tok-scaffold-s3cret-77";
const KEY: &str = "key-scaffold-s3cret-42";

fn pollhook(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .current_dir(dir)
        .args(args)
        .env("POLLHOOK_LOG", "warn")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A GitHub-like listing: bearer auth, two pages joined by `Link` headers.
async fn link_paged_upstream() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/repos/acme/issues",
        axum::routing::get(
            |headers: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                if auth != Some(&format!("Bearer {TOKEN}")) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                let host = headers[header::HOST].to_str().unwrap().to_string();
                if q.get("page").map(String::as_str) == Some("2") {
                    return axum::Json(json!([{"number": 3, "title": "third", "state": "open"}]))
                        .into_response();
                }
                (
                    [(
                        header::LINK,
                        format!("<http://{host}/repos/acme/issues?state=all&page=2>; rel=\"next\""),
                    )],
                    axum::Json(json!([
                        {"number": 1, "title": "first", "state": "open"},
                        {"number": 2, "title": "second", "state": "closed"}
                    ])),
                )
                    .into_response()
            },
        ),
    );
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_and_link_paging_make_a_connector_that_reads_both_pages() {
    let addr = link_paged_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let curl = format!(
        "curl -sS -H 'Authorization: Bearer {TOKEN}' -H 'Accept: application/json' \\\n  'http://{addr}/repos/acme/issues?state=all'"
    );
    let out = pollhook(
        dir.path(),
        &["new", "connector", "issues", "--from-curl", &curl],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let file = dir.path().join("connectors/issues.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(!yaml.contains(TOKEN), "the token was written:\n{yaml}");
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
    assert!(
        yaml.contains("auth: { type: bearer, token: \"{{ token }}\" }"),
        "{yaml}"
    );
    assert!(
        yaml.contains("token: { required: true, secret: true }"),
        "{yaml}"
    );
    assert!(yaml.contains("paginate: { link_header: true"), "{yaml}");
    assert!(yaml.contains("items: \"$[*]\""), "{yaml}");
    assert!(yaml.contains("id: \"{{ item.number }}\""), "{yaml}");
    assert!(yaml.contains("detect: new"), "{yaml}");
    assert!(
        stdout.contains("--with token=\"$ISSUES_TOKEN\""),
        "{stdout}"
    );
    assert!(stderr.contains("`-s` ignored"), "{stderr}");

    let with = format!("token={TOKEN}");
    let test = pollhook(
        dir.path(),
        &["test", "connectors/issues.yaml", "--with", &with],
    );
    let (tout, terr) = text(&test);
    assert!(test.status.success(), "{tout}\n{terr}");
    assert!(
        tout.contains("state=all&page=2 -> 200"),
        "page 2 not read:\n{tout}"
    );
    for n in 1..=3 {
        assert!(
            tout.contains(&format!("record {n}: emits issues.created")),
            "record {n} missing:\n{tout}"
        );
    }
    assert!(!tout.contains(TOKEN));
}

/// `{"data": [...], "next_cursor": …}` behind an API-key header.
async fn cursor_upstream() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/v1/tickets",
        axum::routing::get(
            |headers: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
                    return StatusCode::FORBIDDEN.into_response();
                }
                let body = match q.get("cursor").map(String::as_str) {
                    None => json!({
                        "data": [
                            {"id": "t1", "subject": "a", "updated_at": "2026-01-01T00:00:00Z"},
                            {"id": "t2", "subject": "b", "updated_at": "2026-01-02T00:00:00Z"}
                        ],
                        "next_cursor": "c-2"
                    }),
                    Some("c-2") => json!({
                        "data": [{"id": "t3", "subject": "c", "updated_at": "2026-01-03T00:00:00Z"}],
                        "next_cursor": null
                    }),
                    Some(_) => return StatusCode::BAD_REQUEST.into_response(),
                };
                axum::Json(body).into_response()
            },
        ),
    );
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_field_and_updated_at_give_cursor_paging_and_detect_changes() {
    let addr = cursor_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let curl = format!("curl -H \"X-API-Key: {KEY}\" http://{addr}/v1/tickets");
    let out = pollhook(
        dir.path(),
        &[
            "new",
            "connector",
            "tickets",
            "--from-curl",
            &curl,
            "--out",
            "tickets.yaml",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let yaml = std::fs::read_to_string(dir.path().join("tickets.yaml")).unwrap();
    assert!(!yaml.contains(KEY), "the key was written:\n{yaml}");
    assert!(
        yaml.contains("paginate: { cursor_from: \"$.next_cursor\", param: \"cursor\""),
        "{yaml}"
    );
    assert!(yaml.contains("items: \"$.data[*]\""), "{yaml}");
    assert!(yaml.contains("detect: changes"), "{yaml}");
    assert!(
        yaml.contains("version: \"{{ item.updated_at }}\""),
        "{yaml}"
    );
    assert!(
        yaml.contains(
            "auth: { type: api_key, in: header, name: \"X-API-Key\", value: \"{{ api_key }}\" }"
        ),
        "{yaml}"
    );
    assert!(stdout.contains("detect: changes"), "{stdout}");

    let with = format!("api_key={KEY}");
    let test = pollhook(dir.path(), &["test", "tickets.yaml", "--with", &with]);
    let (tout, terr) = text(&test);
    assert!(test.status.success(), "{tout}\n{terr}");
    for id in ["t1", "t2", "t3"] {
        assert!(
            tout.contains(&format!("record {id}: created")),
            "{id} missing:\n{tout}"
        );
    }
    assert!(tout.contains("cursor=c-2 -> 200"), "{tout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_object_is_a_snapshot() {
    let app = axum::Router::new().route(
        "/api/v2/status.json",
        axum::routing::get(|| async {
            (
                [(header::ETAG, "\"s1\"")],
                axum::Json(json!({"page": {"name": "Acme"}, "status": {"indicator": "none"}})),
            )
        }),
    );
    let addr = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/api/v2/status.json");
    let out = pollhook(
        dir.path(),
        &["new", "connector", "status", "--from-url", &url],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let yaml = std::fs::read_to_string(dir.path().join("connectors/status.yaml")).unwrap();
    assert!(yaml.contains("\ndetect: snapshot\n"), "{yaml}");
    assert!(
        !yaml.contains("items:") && !yaml.contains("paginate:"),
        "{yaml}"
    );
    assert!(
        yaml.contains("polls after the first are conditional"),
        "{yaml}"
    );
    let test = pollhook(dir.path(), &["test", "connectors/status.yaml"]);
    let (tout, terr) = text(&test);
    assert!(test.status.success(), "{tout}\n{terr}");
    assert!(
        tout.contains("record snapshot: first value; emits status.changed"),
        "{tout}"
    );
    // An existing file is not replaced without --force …
    std::fs::write(dir.path().join("connectors/status.yaml"), "mine").unwrap();
    let again = pollhook(
        dir.path(),
        &["new", "connector", "status", "--from-url", &url],
    );
    assert!(!again.status.success());
    assert!(text(&again).1.contains("--force"), "{}", text(&again).1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("connectors/status.yaml")).unwrap(),
        "mine"
    );
    // … and is with it.
    let forced = pollhook(
        dir.path(),
        &["new", "connector", "status", "--from-url", &url, "--force"],
    );
    assert!(forced.status.success(), "{:?}", text(&forced));
    assert!(
        std::fs::read_to_string(dir.path().join("connectors/status.yaml"))
            .unwrap()
            .contains("detect: snapshot")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_flags_unreachable_urls_and_error_answers_write_nothing() {
    let addr = link_paged_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!("curl --proxy http://127.0.0.1:9 http://{addr}/repos/acme/issues"),
            "curl flag `--proxy` is not supported",
        ),
        // A port nothing listens on (the listener is dropped first).
        (
            format!("curl http://{}/x", {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            }),
            "cannot connect",
        ),
        // Without the token the upstream answers 401.
        (
            format!("curl http://{addr}/repos/acme/issues"),
            "answered 401 Unauthorized",
        ),
        (
            format!("curl -H 'Authorization: Bearer {TOKEN}' 'http://{addr}/repos/acme/issues"),
            "unterminated single quote",
        ),
    ];
    for (curl, expected) in cases {
        let out = pollhook(
            dir.path(),
            &["new", "connector", "broken", "--from-curl", &curl],
        );
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "`{curl}` succeeded:\n{stdout}");
        assert!(
            stderr.contains(expected),
            "`{curl}`: expected `{expected}` in:\n{stderr}"
        );
        assert!(!stderr.contains(TOKEN), "{stderr}");
        assert!(
            !dir.path().join("connectors/broken.yaml").exists(),
            "`{curl}` wrote a file"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|p| !p.is_dir() || std::fs::read_dir(p).unwrap().next().is_none()),
        "files left behind: {leftovers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rss_feed_is_read_as_xml_with_the_guid_as_id() {
    const FEED: &str = r#"<?xml version="1.0"?><rss version="2.0"><channel><title>T</title>
<item><title>a</title><link>https://e.example/a</link><guid isPermaLink="false">g-1</guid></item>
<item><title>b</title><link>https://e.example/b</link><guid>g-2</guid></item></channel></rss>"#;
    let app = axum::Router::new().route(
        "/feed.xml",
        axum::routing::get(|| async { ([(header::CONTENT_TYPE, "application/rss+xml")], FEED) }),
    );
    let addr = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/feed.xml");
    let out = pollhook(
        dir.path(),
        &["new", "connector", "feed", "--from-url", &url],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let yaml = std::fs::read_to_string(dir.path().join("connectors/feed.yaml")).unwrap();
    assert!(yaml.contains("response: { format: xml }"), "{yaml}");
    assert!(yaml.contains("items: \"$.rss.channel.item[*]\""), "{yaml}");
    assert!(yaml.contains("detect: new"), "{yaml}");
    let test = pollhook(dir.path(), &["test", "connectors/feed.yaml"]);
    let (tout, terr) = text(&test);
    assert!(test.status.success(), "{tout}\n{terr}");
    for id in ["g-1", "g-2"] {
        assert!(
            tout.contains(&format!("record {id}: emits feed.created")),
            "{id}:\n{tout}"
        );
    }
}
