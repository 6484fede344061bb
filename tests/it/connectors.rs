//! The daemon runs of the first catalog connectors (`github-issues`,
//! `rss-feed`, `statuspage`, from `connectors/`), each against a fixture
//! server shaped like the real API, through the real binary to a
//! verifying receiver, over several changes. The rest of the catalog is in
//! `catalog.rs`, which also runs `pollhook test` on every connector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::support::*;

fn bridge(source: &str, receiver: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  {source}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent:
    url: {receiver}
    secret: {secret}
    retry: {{ max_attempts: 10, first: 50ms, max: 500ms }}
"#,
        secret = secret()
    )
}

fn kinds(rx: &Receiver) -> Vec<String> {
    rx.accepted()
        .iter()
        .map(|d| d.body["type"].as_str().unwrap().to_string())
        .collect()
}

// ------------------------------------------------------------ github-issues

type Issues = Arc<Mutex<Vec<Value>>>;

/// GitHub's issue list: `since` (inclusive), ascending by `updated_at`, two
/// per page whatever `per_page` says, `Link` headers, bearer token.
async fn github(
    State(issues): State<Issues>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> impl IntoResponse {
    if headers
        .get("authorization")
        .is_none_or(|v| v != "Bearer ghp_test")
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let since = q.get("since").cloned().unwrap_or_default();
    let mut list: Vec<Value> = issues
        .lock()
        .unwrap()
        .iter()
        .filter(|i| i["updated_at"].as_str().unwrap() >= since.as_str())
        .cloned()
        .collect();
    list.sort_by(|a, b| a["updated_at"].as_str().cmp(&b["updated_at"].as_str()));
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let chunk: Vec<Value> = list.iter().skip((page - 1) * 2).take(2).cloned().collect();
    let host = headers["host"].to_str().unwrap();
    let mut link = String::new();
    if page * 2 < list.len() {
        let mut next = q.clone();
        next.insert("page".into(), (page + 1).to_string());
        let qs: Vec<String> = next
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(':', "%3A")))
            .collect();
        link = format!(
            "<http://{host}/repos/a/b/issues?{}>; rel=\"next\"",
            qs.join("&")
        );
    }
    ([("link", link)], axum::Json(chunk)).into_response()
}

fn issue(n: u64, title: &str, state: &str, minute: u32) -> Value {
    json!({
        "number": n, "title": title, "state": state,
        "updated_at": format!("2026-11-29T10:{minute:02}:00Z"),
        "html_url": format!("https://github.com/a/b/issues/{n}"),
        "closed_by": if state == "closed" { json!({"login": "octocat"}) } else { Value::Null },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_issues_created_updated_closed_once_each_across_link_pages() {
    let issues: Issues = Arc::new(Mutex::new(vec![
        issue(1, "crash on start", "open", 1),
        issue(2, "typo", "open", 2),
        issue(3, "docs", "open", 3),
    ]));
    let app = Router::new()
        .route("/repos/a/b/issues", get(github))
        .with_state(issues.clone());
    let up = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(
            &format!(
                "issues:\n    connector: github-issues\n    with: {{ base_url: \"http://{up}\", repo: a/b, token: ghp_test }}"
            ),
            &rx.url,
        ),
        &[("github-issues.yaml", repo_connector("github-issues.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["issues/default"], 2).await;
    assert!(rx.all().is_empty(), "baseline: nothing emitted");
    {
        let mut v = issues.lock().unwrap();
        v[1] = issue(2, "typo in README", "open", 5);
        v[0] = issue(1, "crash on start", "closed", 6);
        v.push(issue(4, "new feature", "open", 7));
    }
    wait_for("four events", Duration::from_secs(20), || {
        rx.accepted().len() >= 4
    })
    .await;
    // More polls over the overlapping lookback window: nothing repeats.
    let polls = polls_of(&d.status().await, "issues/default");
    d.wait_polls(&["issues/default"], polls + 5).await;
    assert_eq!(
        kinds(&rx),
        [
            "issue.updated",
            "issue.updated",
            "issue.closed",
            "issue.created"
        ]
    );
    let got = rx.accepted();
    assert_eq!(got[0].body["data"]["number"], 2);
    assert_eq!(
        got[0].body["data"]["changed"],
        json!(["title", "updated_at"])
    );
    assert_eq!(got[2].body["data"]["closed_by"], "octocat");
    assert_eq!(got[3].body["data"]["title"], "new feature");
    assert!(got.iter().all(|d| d.verified));
    let status = d.status().await;
    assert_eq!(
        status["instances"]["issues/default"]["cursor"],
        "2026-11-29T10:07:00Z"
    );
}

// ----------------------------------------------------------------- rss-feed

fn rss(items: &[(&str, &str)]) -> String {
    let items: String = items
        .iter()
        .map(|(guid, title)| {
            format!(
                "<item><title>{title}</title><link>https://news.example/{guid}</link>\
                 <guid isPermaLink=\"false\">{guid}</guid>\
                 <pubDate>Sun, 29 Nov 2026 10:00:00 GMT</pubDate></item>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<rss version=\"2.0\"><channel>\
         <title>News</title>{items}</channel></rss>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_feed_items_arrive_once_from_a_feed_of_one_then_many() {
    let feed = Arc::new(Mutex::new(rss(&[("g1", "First")])));
    let f2 = feed.clone();
    let app = Router::new().route(
        "/feed.xml",
        get(move || {
            let f = f2.clone();
            async move {
                (
                    [("content-type", "application/rss+xml")],
                    f.lock().unwrap().clone(),
                )
            }
        }),
    );
    let up = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(
            &format!(
                "news:\n    connector: rss-feed\n    with: {{ url: \"http://{up}/feed.xml\" }}"
            ),
            &rx.url,
        ),
        &[("rss-feed.yaml", repo_connector("rss-feed.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["news/default"], 2).await;
    assert!(rx.all().is_empty());
    *feed.lock().unwrap() = rss(&[
        ("g3", "Third &amp; last"),
        ("g2", "Second"),
        ("g1", "First"),
    ]);
    wait_for("two items", Duration::from_secs(20), || {
        rx.accepted().len() >= 2
    })
    .await;
    let polls = polls_of(&d.status().await, "news/default");
    d.wait_polls(&["news/default"], polls + 3).await;
    let got = rx.accepted();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].body["data"],
        json!({"title": "Third & last", "link": "https://news.example/g3",
               "published": "Sun, 29 Nov 2026 10:00:00 GMT", "feed": format!("http://{up}/feed.xml")})
    );
    assert_eq!(got[1].body["data"]["title"], "Second");
    assert_eq!(kinds(&rx), ["feed.item.published", "feed.item.published"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_is_not_xml_is_an_error_not_an_event() {
    let app = Router::new().route(
        "/feed.xml",
        get(|| async {
            (
                [("content-type", "text/html")],
                "<html><body><p>Bad gateway</body></html>",
            )
        }),
    );
    let up = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(
            &format!(
                "news:\n    connector: rss-feed\n    with: {{ url: \"http://{up}/feed.xml\" }}"
            ),
            &rx.url,
        ),
        &[("rss-feed.yaml", repo_connector("rss-feed.yaml"))],
    );
    d.start().await;
    let mut err = String::new();
    wait_for(
        "the poll error on the status",
        Duration::from_secs(20),
        || {
            let s = block_on(d.status());
            err = s["instances"]["news/default"]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            !err.is_empty()
        },
    )
    .await;
    assert!(err.contains("not valid XML"), "{err}");
    assert!(err.contains("Bad gateway"), "shows the body's start: {err}");
    assert!(rx.all().is_empty());
}

/// Runs a future to completion from a sync closure (status polling inside
/// `wait_for`).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

// --------------------------------------------------------------- statuspage

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuspage_degraded_and_recovered_but_not_on_page_updates() {
    let status = Arc::new(Mutex::new(("none", "All Systems Operational", 1)));
    let s2 = status.clone();
    let app = Router::new().route(
        "/api/v2/status.json",
        get(move || {
            let s = s2.clone();
            async move {
                let (ind, desc, n) = *s.lock().unwrap();
                axum::Json(json!({
                    "page": {"id": "x", "name": "Acme Cloud", "updated_at": format!("2026-11-29T10:00:{n:02}Z")},
                    "status": {"indicator": ind, "description": desc}
                }))
            }
        }),
    );
    let up = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(
            &format!("acme:\n    connector: statuspage\n    with: {{ base_url: \"http://{up}\" }}"),
            &rx.url,
        ),
        &[("statuspage.yaml", repo_connector("statuspage.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["acme/default"], 2).await;
    // The page's updated_at moves: not a status change.
    status.lock().unwrap().2 = 2;
    let polls = polls_of(&d.status().await, "acme/default");
    d.wait_polls(&["acme/default"], polls + 3).await;
    assert!(rx.all().is_empty());
    *status.lock().unwrap() = ("major", "Partial outage", 3);
    wait_for("degraded", Duration::from_secs(20), || {
        rx.accepted().len() >= 2
    })
    .await;
    *status.lock().unwrap() = ("none", "All Systems Operational", 4);
    wait_for("recovered", Duration::from_secs(20), || {
        rx.accepted().len() >= 4
    })
    .await;
    assert_eq!(
        kinds(&rx),
        [
            "status.changed",
            "status.degraded",
            "status.changed",
            "status.recovered"
        ]
    );
    assert_eq!(
        rx.accepted()[0].body["data"],
        json!({"page": "Acme Cloud", "indicator": "major", "description": "Partial outage", "previous": "none"})
    );
}
