//! The `jsonapi-updated-since` catalog connector against a JSON:API
//! fixture server (part of `catalog.rs`, whose helpers it uses).

use std::collections::BTreeMap;

use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::*;

// ---------------------------------------------------- jsonapi-updated-since

/// A JSON:API server: `filter[updated_since]` (inclusive), oldest first,
/// two resources a page whatever `page[size]` says, `links.next` relative.
fn jsonapi(up: Upstream) -> Router {
    Router::new().route(
        "/api/v1/articles",
        get(
            move |uri: Uri, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>| {
                let up = up.clone();
                async move {
                    if headers
                        .get("accept")
                        .is_none_or(|v| v != "application/vnd.api+json")
                    {
                        return up.answer(
                            &uri,
                            &headers,
                            StatusCode::NOT_ACCEPTABLE.into_response(),
                        );
                    }
                    let file = ["before", "after"][up.stage().min(1)];
                    let all = fixture_json(&format!("jsonapi-updated-since/articles-{file}.json"));
                    let since = q.get("filter[updated_since]").cloned().unwrap_or_default();
                    let mut list: Vec<Value> = all["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|a| {
                            a["attributes"]["updated_at"].as_str().unwrap() >= since.as_str()
                        })
                        .cloned()
                        .collect();
                    list.sort_by(|a, b| {
                        a["attributes"]["updated_at"]
                            .as_str()
                            .cmp(&b["attributes"]["updated_at"].as_str())
                    });
                    let page: usize = q
                        .get("page[number]")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(1);
                    let chunk: Vec<Value> =
                        list.iter().skip((page - 1) * 2).take(2).cloned().collect();
                    let next = (page * 2 < list.len()).then(|| {
                        let abs =
                            with_param(&headers, &uri, "page[number]", &(page + 1).to_string());
                        // Relative, as many servers write it.
                        abs[abs.find("/api/").unwrap()..].to_string()
                    });
                    let body = json!({
                        "data": chunk,
                        "links": {"self": uri.to_string(), "next": next},
                        "meta": {"total": list.len()},
                        "jsonapi": {"version": "1.1"},
                    });
                    up.answer(
                        &uri,
                        &headers,
                        (
                            [("content-type", "application/vnd.api+json")],
                            body.to_string(),
                        )
                            .into_response(),
                    )
                }
            },
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonapi_updated_since_pages_through_links_next_and_resumes_from_the_cursor() {
    let up = Upstream::default();
    let addr = serve(jsonapi(up.clone())).await;

    let out = dry_run(
        "jsonapi-updated-since.yaml",
        &[
            ("base_url", format!("http://{addr}")),
            ("path", "/api/v1/articles".into()),
            ("type_prefix", "article".into()),
            ("token", "jsonapi-s3cret-token".into()),
        ],
    )
    .await;
    assert!(
        out.contains("page%5Bnumber%5D=2") || out.contains("page[number]=2"),
        "{out}"
    );
    // The token goes to every page as a bearer token, and is never shown.
    let dry_hits = up.hits();
    assert!(dry_hits.len() >= 2);
    assert!(dry_hits
        .iter()
        .all(|h| h.headers["authorization"] == "Bearer jsonapi-s3cret-token"));
    assert!(!out.contains("jsonapi-s3cret-token"), "{out}");
    let events = dry_events(&out);
    assert_eq!(types(&events), ["article.created"; 3], "{out}");
    assert_eq!(events[0]["data"]["id"], "1");
    assert_eq!(events[0]["data"]["type"], "articles");
    assert_eq!(
        events[0]["data"]["attributes"]["title"],
        "JSON:API paints my bikeshed!"
    );
    assert!(
        out.contains("cursor: (none) -> 2026-11-30T08:20:00Z"),
        "{out}"
    );

    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let d = daemon(
        &source(
            "articles",
            "jsonapi-updated-since",
            &format!("base_url: \"http://{addr}\", path: /api/v1/articles, type_prefix: article"),
        ),
        &["jsonapi-updated-since.yaml"],
        &rx,
    )
    .await;
    baseline(&d, &rx, "articles/default").await;
    up.set_stage(1);
    let got = settle(&d, &rx, "articles/default", 2, 4).await;
    assert_eq!(types(&got), ["article.updated", "article.created"]);
    assert_eq!(got[0]["data"]["id"], "2");
    assert_eq!(got[0]["data"]["attributes"]["status"], "published");
    assert_eq!(
        got[0]["data"]["changed"],
        json!(["attributes.status", "attributes.updated_at"])
    );
    assert_eq!(got[1]["data"]["id"], "4");
    // Polls ask from the newest updated_at minus a minute.
    assert!(up.hits().iter().any(|h| {
        let u = h
            .uri
            .replace("%5B", "[")
            .replace("%5D", "]")
            .replace("%3A", ":");
        u.contains("filter[updated_since]=2026-11-30T09:09:00Z")
    }));
    assert_eq!(
        d.status().await["instances"]["articles/default"]["cursor"],
        "2026-11-30T09:10:00Z"
    );
    // No token given: the connector's "empty for none", no Authorization.
    assert!(up.hits()[dry_hits.len()..]
        .iter()
        .all(|h| !h.headers.contains_key("authorization")));
}
