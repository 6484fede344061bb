//! The connector language, feature by feature, against fixture servers on
//! 127.0.0.1: paging styles and their stop conditions, authentication
//! (API keys, OAuth2 token caching), request bodies and request ids, the
//! detection modes across several polls, CSV bodies, and error bodies
//! that must not read as empty listings. These go through the library's
//! real `fetch` (real HTTP) and pure `detect`, one poll at a time, so each
//! feature's failure side is checked precisely; the catalog's connectors
//! run through the binary in `connectors.rs` and `catalog.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use pollhook::config::resolve::load_connector;
use pollhook::config::Instance;
use pollhook::connector::auth::TokenCache;
use pollhook::connector::detect::{detect, Detection};
use pollhook::connector::fetch::{fetch_via, FetchEnv, Fetched, Memo};
use pollhook::connector::spec::Connector;
use pollhook::connector::transport::Transport;
use pollhook::quota::HostGates;
use pollhook::store::InstanceState;
use serde_json::{json, Map, Value};

use crate::support::*;

/// A connector from YAML text, loaded like a file.
pub fn connector(yaml: &str) -> Connector {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, yaml).unwrap();
    match load_connector(&p) {
        Ok(c) => c,
        Err(e) => panic!("connector does not load:\n{e}"),
    }
}

/// One instance with these params (defaults filled in).
pub fn instance(c: &Connector, given: Value) -> Instance {
    let mut vars = Map::new();
    for (k, p) in &c.params {
        if let Some(d) = &p.default {
            vars.insert(k.clone(), d.clone());
        }
    }
    vars.extend(given.as_object().cloned().unwrap_or_default());
    Instance::new(
        "t",
        "default",
        c,
        std::sync::Arc::new(vars),
        std::iter::empty(),
    )
}

/// Polls like the daemon does, minus the store.
pub struct Poller {
    pub c: Connector,
    pub inst: Instance,
    pub state: InstanceState,
    client: reqwest::Client,
    hosts: HostGates,
    tokens: Arc<TokenCache>,
    /// The request kept between polls, as a poll task keeps it.
    memo: Memo,
}

impl Poller {
    pub fn new(yaml: &str, given: Value) -> Poller {
        let c = connector(yaml);
        let inst = instance(&c, given);
        Poller {
            c,
            inst,
            state: InstanceState::default(),
            client: pollhook::daemon::poll_client(),
            hosts: HostGates::new(&BTreeMap::new()),
            tokens: Arc::new(TokenCache::default()),
            memo: Memo::default(),
        }
    }

    pub async fn fetch(&mut self) -> Result<Fetched, String> {
        let env = FetchEnv {
            client: &self.client,
            hosts: &self.hosts,
            rate_limit: None,
            tokens: &self.tokens,
            user_agent: None,
        };
        let now = chrono::Utc::now();
        let live = Transport::Live(&self.client);
        let memo = Some(&mut self.memo);
        fetch_via(&self.c, &self.inst, &self.state, &env, live, now, memo)
            .await
            .map_err(|e| e.to_string())
    }

    /// One poll; on success the state moves on, as a commit would.
    pub async fn poll(&mut self) -> Result<(Fetched, Detection), String> {
        let f = self.fetch().await?;
        let d = detect(
            &self.c,
            &self.inst.vars(),
            &self.state,
            &f.pages,
            chrono::Utc::now(),
            None,
            f.listing(),
        )
        .map_err(|e| e.to_string())?;
        self.state = d.state.clone();
        Ok((f, d))
    }

    /// The event types and change keys of one poll.
    pub async fn events(&mut self) -> Vec<(String, Value)> {
        let (_, d) = self.poll().await.unwrap();
        d.events.into_iter().map(|e| (e.kind, e.data)).collect()
    }
}

fn ids(pages: &[Value], path: &str) -> Vec<u64> {
    let p = serde_json_path::JsonPath::parse(path).unwrap();
    pages
        .iter()
        .flat_map(|pg| p.query(pg).all().into_iter().cloned().collect::<Vec<_>>())
        .map(|v| v.as_u64().unwrap())
        .collect()
}

type Q = Query<BTreeMap<String, String>>;

fn num(q: &BTreeMap<String, String>, k: &str, d: u64) -> u64 {
    q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// 25 items, paged every way an API pages.
async fn paging_server() -> SocketAddr {
    let all: Vec<u64> = (1..=25).collect();
    let slice = move |from: u64, n: u64| -> Vec<Value> {
        all.iter()
            .skip(from as usize)
            .take(n as usize)
            .map(|i| json!({ "id": i }))
            .collect()
    };
    let s1 = slice.clone();
    let s2 = slice.clone();
    let s3 = slice.clone();
    let s4 = slice.clone();
    let app = Router::new()
        // ?page=N&per_page=M, 1-based.
        .route(
            "/page",
            get(move |Query(q): Q| async move {
                let per = num(&q, "per_page", 10);
                let page = num(&q, "page", 1);
                axum::Json(json!({ "items": s1((page - 1) * per, per) }))
            }),
        )
        .route(
            "/offset",
            get(move |Query(q): Q| async move {
                axum::Json(json!({ "data": s2(num(&q, "offset", 0), num(&q, "limit", 10)) }))
            }),
        )
        // GitHub style: Link header with rel="next" (and "last").
        .route(
            "/link",
            get(move |headers: HeaderMap, Query(q): Q| async move {
                let page = num(&q, "page", 1);
                let host = headers["host"].to_str().unwrap().to_string();
                let mut links = vec![format!("<http://{host}/link?page=3>; rel=\"last\"")];
                if page < 3 {
                    links.insert(
                        0,
                        format!("<http://{host}/link?page={}>; rel=\"next\"", page + 1),
                    );
                }
                (
                    [("link", links.join(", "))],
                    axum::Json(json!(s3((page - 1) * 10, 10))),
                )
            }),
        )
        // The next URL in the body, relative.
        .route(
            "/next",
            get(move |Query(q): Q| async move {
                let page = num(&q, "page", 1);
                let next = if page < 3 {
                    Value::from(format!("/next?page={}", page + 1))
                } else {
                    Value::Null
                };
                axum::Json(json!({ "results": s4((page - 1) * 10, 10), "next": next }))
            }),
        )
        // Never ends.
        .route(
            "/forever",
            get(|Query(q): Q| async move {
                let page = num(&q, "page", 1);
                axum::Json(json!({ "items": [{ "id": page }], "next": format!("/forever?page={}", page + 1) }))
            }),
        )
        // A next URL on another host (localhost is not 127.0.0.1).
        .route(
            "/elsewhere",
            get(|headers: HeaderMap| async move {
                let port = headers["host"].to_str().unwrap().rsplit(':').next().unwrap().to_string();
                axum::Json(json!({ "items": [{ "id": 1 }], "next": format!("http://localhost:{port}/next?page=2") }))
            }),
        )
        // has_more flag.
        .route(
            "/flag",
            get(|Query(q): Q| async move {
                let page = num(&q, "page", 1);
                axum::Json(json!({ "items": [{ "id": page }], "has_more": page < 2 }))
            }),
        );
    serve(app).await
}

fn list_connector(base: SocketAddr, path: &str, items: &str, paginate: &str) -> String {
    format!(
        r#"
name: lister
request: {{ url: "http://{base}{path}" }}
paginate:
{paginate}
items: "{items}"
id: "{{{{ item.id }}}}"
detect: new
baseline: emit
emit: [{{ type: item.new }}]
"#
    )
}

/// An instance's name is the tail of its key after its source's name,
/// whatever that name holds (a `/` too): the key is one shared string,
/// the name a view of it.
#[test]
fn an_instance_name_is_its_key_after_the_source_name() {
    let c = connector(&list_connector(
        "127.0.0.1:9".parse().unwrap(),
        "/x",
        "$.items[*]",
        "  next_url: $.next",
    ));
    let own = [("account".to_string(), json!("a/1"))];
    let i = Instance::new("team/bank", "a/1", &c, Arc::new(Map::new()), own);
    assert_eq!(&*i.key, "team/bank/a/1");
    assert_eq!(i.name(), "a/1");
    let d = instance(&c, json!({}));
    assert_eq!((&*d.key, d.name()), ("t/default", "default"));
}

#[tokio::test]
async fn every_paging_style_reads_the_whole_listing_once() {
    let base = paging_server().await;
    let cases = [
        (
            "/page",
            "$.items[*]",
            "  page: { param: page, size_param: per_page, size: 10 }",
            3,
        ),
        (
            "/offset",
            "$.data[*]",
            "  offset: { param: offset, limit_param: limit, limit: 10 }",
            3,
        ),
        ("/link", "$[*]", "  link_header: true", 3),
        ("/next", "$.results[*]", "  next_url: $.next", 3),
    ];
    for (path, items, paginate, pages) in cases {
        let mut p = Poller::new(&list_connector(base, path, items, paginate), json!({}));
        let f = p.fetch().await.unwrap();
        let item_path = items.replace("[*]", "[*].id");
        assert_eq!(
            ids(&f.pages, &item_path),
            (1..=25).collect::<Vec<_>>(),
            "{path}"
        );
        assert_eq!(f.log.len(), pages, "{path}: {:?}", f.log);
        assert!(f.complete(), "{path}: {:?}", f.warning);
    }
}

#[tokio::test]
async fn page_size_stop_saves_the_empty_last_request() {
    // Without `size`, page 3 (5 items) is not known to be the last: one more
    // request finds the empty page 4.
    let base = paging_server().await;
    let mut p = Poller::new(
        &list_connector(
            base,
            "/page",
            "$.items[*]",
            "  page: { param: page, size_param: per_page }",
        ),
        json!({}),
    );
    let f = p.fetch().await.unwrap();
    assert_eq!(f.log.len(), 4);
    assert_eq!(f.log[3].items, Some(0));
    assert_eq!(ids(&f.pages, "$.items[*].id").len(), 25);
}

#[tokio::test]
async fn stop_when_ends_paging_on_a_flag() {
    let base = paging_server().await;
    let mut p = Poller::new(
        &list_connector(
            base,
            "/flag",
            "$.items[*]",
            "  page: { param: page }\n  stop_when: \"not page.has_more\"",
        ),
        json!({}),
    );
    let f = p.fetch().await.unwrap();
    assert_eq!(f.log.len(), 2);
    assert!(f.complete());
}

#[tokio::test]
async fn a_paginator_that_never_ends_hits_the_cap_and_says_so() {
    let base = paging_server().await;
    let mut p = Poller::new(
        &list_connector(
            base,
            "/forever",
            "$.items[*]",
            "  next_url: $.next\n  max_pages: 5",
        ),
        json!({}),
    );
    let (f, d) = p.poll().await.unwrap();
    assert_eq!(f.log.len(), 5);
    let w = f.warning.clone().expect("cap reported");
    assert!(w.contains("max_pages = 5"), "{w}");
    // What was read is still processed.
    assert_eq!(d.events.len(), 5);
}

#[tokio::test]
async fn a_next_url_on_another_host_is_refused_unless_allowed() {
    let base = paging_server().await;
    let mut p = Poller::new(
        &list_connector(base, "/elsewhere", "$.items[*]", "  next_url: $.next"),
        json!({}),
    );
    let err = p.fetch().await.unwrap_err();
    assert!(
        err.contains("another host (localhost:") && err.contains("allow_hosts"),
        "{err}"
    );
    let mut p = Poller::new(
        &list_connector(
            base,
            "/elsewhere",
            "$.items[*]",
            &format!(
                "  next_url: $.next\n  allow_hosts: [\"localhost:{}\"]",
                base.port()
            ),
        ),
        json!({}),
    );
    let f = p.fetch().await.unwrap();
    assert!(f.log.len() >= 2, "{:?}", f.log);
}

// ------------------------------------------------------------------ auth

#[derive(Default)]
struct AuthState {
    tokens_issued: AtomicU64,
    current: Mutex<String>,
    fail_token: std::sync::atomic::AtomicBool,
    api_calls: AtomicU64,
}

async fn auth_server() -> (SocketAddr, Arc<AuthState>) {
    let st = Arc::new(AuthState::default());
    let app = Router::new()
        .route(
            "/token",
            post(
                |State(st): State<Arc<AuthState>>, headers: HeaderMap, body: String| async move {
                    if st.fail_token.load(Ordering::SeqCst) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            axum::Json(json!({"error": "invalid_client", "error_description": "client disabled"})),
                        )
                            .into_response();
                    }
                    // client_secret_basic: base64("app:s3cret")
                    let ok = headers
                        .get("authorization")
                        .is_some_and(|v| v == "Basic YXBwOnMzY3JldA==");
                    if !ok || !body.contains("grant_type=client_credentials") || !body.contains("scope=read") {
                        return StatusCode::BAD_REQUEST.into_response();
                    }
                    let n = st.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
                    let tok = format!("tok-{n}");
                    *st.current.lock().unwrap() = tok.clone();
                    axum::Json(json!({"access_token": tok, "token_type": "Bearer", "expires_in": 3600}))
                        .into_response()
                },
            ),
        )
        .route(
            "/api",
            get(|State(st): State<Arc<AuthState>>, headers: HeaderMap| async move {
                st.api_calls.fetch_add(1, Ordering::SeqCst);
                let want = format!("Bearer {}", st.current.lock().unwrap());
                if headers.get("authorization").is_some_and(|v| *v == *want) {
                    axum::Json(json!({"ok": true})).into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }),
        )
        .route(
            "/keyed",
            get(|headers: HeaderMap, Query(q): Q| async move {
                let h = headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("");
                let qk = q.get("api_key").map(String::as_str).unwrap_or("");
                if h == "k-123" || qk == "k-123" {
                    axum::Json(json!({"ok": true})).into_response()
                } else {
                    StatusCode::FORBIDDEN.into_response()
                }
            }),
        )
        .with_state(st.clone());
    (serve(app).await, st)
}

fn oauth_connector(base: SocketAddr) -> String {
    format!(
        r#"
name: oauth
params: {{ secret: {{ secret: true, required: true }} }}
request:
  url: "http://{base}/api"
  auth:
    type: oauth2
    token_url: "http://{base}/token"
    client_id: app
    client_secret: "{{{{ secret }}}}"
    scope: read
detect: snapshot
emit: [{{ type: x }}]
"#
    )
}

#[tokio::test]
async fn oauth2_token_is_cached_and_refreshed_once_on_401() {
    let (base, st) = auth_server().await;
    let mut p = Poller::new(&oauth_connector(base), json!({"secret": "s3cret"}));
    for _ in 0..3 {
        p.fetch().await.unwrap();
    }
    assert_eq!(
        st.tokens_issued.load(Ordering::SeqCst),
        1,
        "one token for three polls"
    );
    // The provider rotates the token: the API answers 401 to the cached one.
    *st.current.lock().unwrap() = "rotated".into();
    p.fetch().await.unwrap();
    assert_eq!(st.tokens_issued.load(Ordering::SeqCst), 2, "refreshed once");
    assert_eq!(st.api_calls.load(Ordering::SeqCst), 5, "3 + 401 + retry");
}

#[tokio::test]
async fn a_failing_token_endpoint_is_a_clear_error_without_the_secret() {
    let (base, st) = auth_server().await;
    st.fail_token.store(true, Ordering::SeqCst);
    let mut p = Poller::new(&oauth_connector(base), json!({"secret": "s3cret"}));
    let err = p.fetch().await.unwrap_err();
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("/token answered HTTP 401"), "{err}");
    assert!(err.contains("client disabled"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert_eq!(st.api_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn api_keys_in_a_header_or_the_query() {
    let (base, _) = auth_server().await;
    for (location, name) in [("header", "X-API-Key"), ("query", "api_key")] {
        let yaml = format!(
            r#"
name: keyed
params: {{ key: {{ secret: true }} }}
request:
  url: "http://{base}/keyed"
  auth: {{ type: api_key, in: {location}, name: {name}, value: "{{{{ key }}}}" }}
detect: snapshot
emit: [{{ type: x }}]
"#
        );
        Poller::new(&yaml, json!({"key": "k-123"}))
            .fetch()
            .await
            .unwrap();
        let err = Poller::new(&yaml, json!({"key": "wrong"}))
            .fetch()
            .await
            .unwrap_err();
        assert!(err.contains("HTTP 403"), "{err}");
    }
}

// ---------------------------------------------------------------- bodies

#[tokio::test]
async fn json_and_form_bodies_are_rendered_with_their_types() {
    let seen = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let s2 = seen.clone();
    let app = Router::new().route(
        "/rpc",
        post(move |headers: HeaderMap, body: String| {
            let seen = s2.clone();
            async move {
                let ct = headers["content-type"].to_str().unwrap().to_string();
                seen.lock().unwrap().push((ct, body));
                axum::Json(json!({"result": {"n": 1}}))
            }
        }),
    );
    let base = serve(app).await;
    let json_yaml = format!(
        r#"
name: rpc
params: {{ limit: {{ default: 50 }}, account: {{ required: true }} }}
request:
  method: POST
  url: "http://{base}/rpc"
  json:
    jsonrpc: "2.0"
    method: ledger.list
    params: {{ account: "{{{{ account }}}}", limit: "{{{{ limit }}}}", since: "{{{{ cursor | default(none) }}}}" }}
    id: 1
detect: snapshot
emit: [{{ type: x }}]
"#
    );
    Poller::new(&json_yaml, json!({"account": "acc-1"}))
        .fetch()
        .await
        .unwrap();
    let form_yaml = format!(
        r#"
name: form
request:
  method: POST
  url: "http://{base}/rpc"
  form: {{ q: "a b&c", when: "{{{{ now[:4] }}}}" }}
detect: snapshot
emit: [{{ type: x }}]
"#
    );
    Poller::new(&form_yaml, json!({})).fetch().await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, "application/json");
    let body: Value = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(
        body,
        json!({"jsonrpc": "2.0", "method": "ledger.list", "params": {"account": "acc-1", "limit": 50, "since": null}, "id": 1})
    );
    assert_eq!(seen[1].0, "application/x-www-form-urlencoded");
    assert!(seen[1].1.starts_with("q=a+b%26c&when=20"), "{}", seen[1].1);
}

// ------------------------------------------------------------- detection

/// A mutable listing: `/items` returns what the test puts in.
async fn list_server() -> (SocketAddr, Arc<Mutex<Value>>) {
    let body = Arc::new(Mutex::new(json!({"items": []})));
    let b2 = body.clone();
    let app = Router::new().route(
        "/items",
        get(move |Query(q): Q| {
            let b = b2.clone();
            async move {
                let v = b.lock().unwrap().clone();
                // `?since=` filters like an API with a `>=` cursor.
                match q.get("since") {
                    Some(since) => {
                        let items: Vec<Value> = v["items"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(|i| i["updated_at"].as_str().unwrap_or("") >= since.as_str())
                            .cloned()
                            .collect();
                        axum::Json(json!({ "items": items }))
                    }
                    None => axum::Json(v),
                }
            }
        }),
    );
    (serve(app).await, body)
}

#[tokio::test]
async fn changes_reports_created_updated_and_deleted_with_previous_and_fields() {
    let (base, body) = list_server().await;
    let yaml = format!(
        r#"
name: tickets
request: {{ url: "http://{base}/items" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
version: "{{{{ item.rev }}}}"
detect: changes
emit:
  - type: "ticket.{{{{ change }}}}"
"#
    );
    let mut p = Poller::new(&yaml, json!({}));
    *body.lock().unwrap() = json!({"items": [
        {"id": 1, "rev": 1, "title": "a", "who": {"name": "x"}},
        {"id": 2, "rev": 1, "title": "b"}
    ]});
    assert!(p.events().await.is_empty(), "baseline: skip");
    // Same revision with a different field: `version` says unchanged.
    *body.lock().unwrap() = json!({"items": [
        {"id": 1, "rev": 1, "title": "a-ignored", "who": {"name": "x"}},
        {"id": 2, "rev": 1, "title": "b"}
    ]});
    assert!(p.events().await.is_empty());
    *body.lock().unwrap() = json!({"items": [
        {"id": 1, "rev": 2, "title": "a2", "who": {"name": "y"}},
        {"id": 3, "rev": 1, "title": "c"}
    ]});
    let ev = p.events().await;
    let kinds: Vec<&str> = ev.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["ticket.updated", "ticket.created", "ticket.deleted"]
    );
    assert_eq!(ev[0].1["previous"]["title"], "a");
    assert_eq!(ev[0].1["current"]["title"], "a2");
    assert_eq!(ev[0].1["changed"], json!(["rev", "title", "who.name"]));
    assert_eq!(ev[1].1, json!({"id": 3, "rev": 1, "title": "c"}));
    assert_eq!(ev[2].1, json!({"id": 2, "rev": 1, "title": "b"}));
    // Nothing more.
    assert!(p.events().await.is_empty());
}

#[tokio::test]
async fn changes_never_deletes_from_an_incomplete_listing() {
    let base = paging_server().await;
    let mut p = Poller::new(
        &format!(
            r#"
name: capped
request: {{ url: "http://{base}/forever" }}
paginate: {{ next_url: $.next, max_pages: 2 }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: changes
emit: [{{ type: "t.{{{{ change }}}}" }}]
"#
        ),
        json!({}),
    );
    p.poll().await.unwrap();
    // The same two pages again, but pretend earlier polls saw more items.
    p.state.known.insert(
        "99".into(),
        pollhook::store::KnownItem {
            version: "v".into(),
            item: json!({"id": 99}),
        },
    );
    let (_, d) = p.poll().await.unwrap();
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert!(p.state.known.contains_key("99"));
}

/// A poll task keeps its instance's request between polls only while it
/// would be made the same: a request reading `uuid()` or `now` is made
/// afresh each time, one reading neither is kept (and follows the cursor:
/// the lookback test below polls through the same kept request).
#[tokio::test]
async fn a_request_reading_a_uuid_or_the_time_is_made_afresh_at_every_poll() {
    let (base, _body) = list_server().await;
    let yaml = |query: &str| {
        format!(
            r#"
name: stamped
request:
  url: "http://{base}/items"
  query: {{ {query} }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: row.new }}]
"#
        )
    };
    let mut p = Poller::new(&yaml(r#"nonce: "{{ uuid() }}""#), json!({}));
    assert!(!p.c.request.steady);
    let first = p.fetch().await.unwrap().log[0].url.clone();
    let second = p.fetch().await.unwrap().log[0].url.clone();
    assert_ne!(first, second, "the same uuid sent twice");
    let stamped = Poller::new(&yaml(r#"at: "{{ now }}""#), json!({}));
    assert!(!stamped.c.request.steady);
    let mut kept = Poller::new(&yaml(r#"since: "{{ cursor | default('') }}""#), json!({}));
    assert!(kept.c.request.steady);
    let first = kept.fetch().await.unwrap().log[0].url.clone();
    assert_eq!(kept.fetch().await.unwrap().log[0].url, first);
}

#[tokio::test]
async fn lookback_overlap_and_ge_cursor_never_duplicate_and_cursor_never_rewinds() {
    let (base, body) = list_server().await;
    let yaml = format!(
        r#"
name: incremental
request:
  url: "http://{base}/items"
  query: {{ since: "{{{{ cursor | default('') }}}}" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
cursor: {{ max: "{{{{ item.updated_at }}}}", lookback: 5m }}
detect: new
emit: [{{ type: row.new }}]
"#
    );
    let mut p = Poller::new(&yaml, json!({}));
    *body.lock().unwrap() = json!({"items": [
        {"id": "a", "updated_at": "2026-11-29T10:00:00Z"}
    ]});
    assert!(p.events().await.is_empty());
    assert_eq!(p.state.cursor.as_deref(), Some("2026-11-29T10:00:00Z"));
    // A late write lands 2 minutes behind the cursor; `a` is returned again
    // by the `>=`/lookback window.
    *body.lock().unwrap() = json!({"items": [
        {"id": "a", "updated_at": "2026-11-29T10:00:00Z"},
        {"id": "late", "updated_at": "2026-11-29T09:58:00Z"},
        {"id": "b", "updated_at": "2026-11-29T10:01:00Z"}
    ]});
    let ev = p.events().await;
    let got: Vec<&str> = ev.iter().map(|(_, d)| d["id"].as_str().unwrap()).collect();
    assert_eq!(got, ["late", "b"], "late write caught, `a` not repeated");
    assert_eq!(p.state.cursor.as_deref(), Some("2026-11-29T10:01:00Z"));
    // The request asked from cursor - 5m.
    let f = p.fetch().await.unwrap();
    assert!(
        f.log[0].url.contains("since=2026-11-29T09%3A56%3A00Z"),
        "{}",
        f.log[0].url
    );
    // An upstream that ignores `since` and returns older items does not
    // rewind the cursor (the same connector without the query parameter).
    *body.lock().unwrap() = json!({"items": [
        {"id": "old", "updated_at": "2020-01-01T00:00:00Z"}
    ]});
    let mut q = Poller::new(
        &yaml.replace("  query: { since: \"{{ cursor | default('') }}\" }\n", ""),
        json!({}),
    );
    q.state = p.state.clone();
    let before = q.state.cursor.clone();
    let (f, d) = q.poll().await.unwrap();
    assert!(!f.log[0].url.contains("since="), "{}", f.log[0].url);
    assert_eq!(d.events.len(), 1, "a new id is still new");
    assert_eq!(q.state.cursor, before, "never backwards");
}

#[tokio::test]
async fn an_id_template_that_yields_nothing_fails_the_poll_clearly() {
    let (base, body) = list_server().await;
    *body.lock().unwrap() = json!({"items": [{"id": 1}, {"ID": 2}]});
    let mut p = Poller::new(
        &format!(
            r#"
name: noid
request: {{ url: "http://{base}/items" }}
items: "$.items[*]"
id: "{{{{ item.id | default('') }}}}"
detect: new
baseline: emit
emit: [{{ type: x }}]
"#
        ),
        json!({}),
    );
    let err = p.poll().await.expect_err("an error, not events");
    assert!(err.contains("`id` rendered empty"), "{err}");
    assert!(err.contains(r#"{"ID":2}"#), "names the item: {err}");
    assert!(!p.state.initialized, "nothing committed");
}

#[tokio::test]
async fn snapshot_watch_ignores_other_fields_and_data_templates_shape_events() {
    let (base, body) = list_server().await;
    let yaml = format!(
        r#"
name: status
request: {{ url: "http://{base}/items" }}
detect: snapshot
watch: "$.status.indicator"
emit:
  - type: "status.{{{{ current }}}}"
    data:
      from: "{{{{ previous }}}}"
      to: "{{{{ current }}}}"
      page: "{{{{ resource.page.name }}}}"
      fixed: 1
"#
    );
    let mut p = Poller::new(&yaml, json!({}));
    *body.lock().unwrap() =
        json!({"page": {"name": "Acme", "updated_at": "1"}, "status": {"indicator": "none"}});
    assert!(p.events().await.is_empty());
    *body.lock().unwrap() =
        json!({"page": {"name": "Acme", "updated_at": "2"}, "status": {"indicator": "none"}});
    assert!(p.events().await.is_empty(), "only the watched part counts");
    *body.lock().unwrap() =
        json!({"page": {"name": "Acme", "updated_at": "3"}, "status": {"indicator": "major"}});
    let ev = p.events().await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, "status.major");
    assert_eq!(
        ev[0].1,
        json!({"from": "none", "to": "major", "page": "Acme", "fixed": 1})
    );
}

#[tokio::test]
async fn seen_ids_expire_by_age_and_evictions_are_counted() {
    let (base, body) = list_server().await;
    let mut p = Poller::new(
        &format!(
            r#"
name: ttl
request: {{ url: "http://{base}/items" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
seen_ttl: 1h
emit: [{{ type: x }}]
"#
        ),
        json!({}),
    );
    *body.lock().unwrap() = json!({"items": [{"id": "a"}, {"id": "b"}]});
    p.poll().await.unwrap();
    assert_eq!(p.state.seen.len(), 2);
    // Age `a` past the TTL.
    p.state.seen_at[0] -= 2 * 3600 * 1000;
    *body.lock().unwrap() = json!({"items": [{"id": "b"}]});
    p.poll().await.unwrap();
    assert_eq!(p.state.seen, ["b"]);
    assert_eq!(p.state.seen_evicted, 1);
}

#[tokio::test]
async fn csv_exports_are_read_as_rows() {
    let app = Router::new().route(
        "/export.csv",
        get(|| async {
            (
                [("content-type", "text/csv; charset=utf-8")],
                "\u{feff}id,name,amount\n1,\"Smith, J.\",10.50\n2,Doe,3\n",
            )
        }),
    );
    let up = serve(app).await;
    let mut p = Poller::new(
        &format!(
            r#"
name: csv
request: {{ url: "http://{up}/export.csv" }}
items: "$[*]"
id: "{{{{ item.id }}}}"
detect: new
baseline: emit
emit: [{{ type: row.new, data: {{ who: "{{{{ item.name }}}}", cents: "{{{{ (item.amount | float * 100) | round | int }}}}" }} }}]
"#
        ),
        json!({}),
    );
    let ev = p.events().await;
    assert_eq!(
        ev.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
        [
            json!({"who": "Smith, J.", "cents": 1050}),
            json!({"who": "Doe", "cents": 300})
        ]
    );
}

#[tokio::test]
async fn an_error_body_is_not_an_empty_listing_and_a_null_id_is_refused() {
    let (base, body) = list_server().await;
    let yaml = format!(
        r#"
name: tickets
request: {{ url: "http://{base}/items" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: changes
emit: [{{ type: "t.{{{{ change }}}}" }}]
"#
    );
    let mut p = Poller::new(&yaml, json!({}));
    *body.lock().unwrap() = json!({"items": [{"id": 1}, {"id": 2}]});
    p.poll().await.unwrap();
    // Maintenance page with a 200: an error, not "everything was deleted".
    *body.lock().unwrap() = json!({"error": "maintenance"});
    let err = p.poll().await.expect_err("not a listing");
    assert!(err.contains("no list at `items`"), "{err}");
    assert_eq!(p.state.known.len(), 2);
    // Back: nothing happened in between.
    *body.lock().unwrap() = json!({"items": [{"id": 1}, {"id": 2}]});
    assert!(p.events().await.is_empty());
    // A null id would make items collide: refused.
    *body.lock().unwrap() = json!({"items": [{"id": 1}, {"id": null}, {"id": null}]});
    let err = p.poll().await.expect_err("null id");
    assert!(
        err.contains("empty (or null)") && err.contains(r#"{"id":null}"#),
        "{err}"
    );
}

#[tokio::test]
async fn a_watch_that_matches_nothing_is_an_error_not_a_null_status() {
    let (base, body) = list_server().await;
    let mut p = Poller::new(
        &format!(
            r#"
name: st
request: {{ url: "http://{base}/items" }}
detect: snapshot
watch: "$.status.indicator"
emit: [{{ type: changed }}]
"#
        ),
        json!({}),
    );
    *body.lock().unwrap() = json!({"status": {"indicator": "none"}});
    p.poll().await.unwrap();
    *body.lock().unwrap() = json!({"message": "rate limited"});
    let err = p.poll().await.expect_err("watch missing");
    assert!(err.contains("`watch` matches nothing"), "{err}");
}

#[tokio::test]
async fn paged_listings_are_not_conditional_so_changes_on_later_pages_are_seen() {
    let pages = Arc::new(Mutex::new(vec![json!([{"id": 1}]), json!([{"id": 2}])]));
    let p2 = pages.clone();
    let app = Router::new().route(
        "/list",
        get(move |headers: HeaderMap, Query(q): Q| {
            let pages = p2.clone();
            async move {
                let n = num(&q, "page", 1) as usize;
                // Page 1 never changes and always offers an ETag.
                if n == 1 && headers.get("if-none-match").is_some_and(|v| v == "\"p1\"") {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
                let all = pages.lock().unwrap().clone();
                let body = all.get(n - 1).cloned().unwrap_or(json!([]));
                ([("etag", "\"p1\"")], axum::Json(body)).into_response()
            }
        }),
    );
    let up = serve(app).await;
    let mut p = Poller::new(
        &format!(
            r#"
name: paged
request: {{ url: "http://{up}/list" }}
paginate: {{ page: {{ param: page }} }}
items: "$[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: x }}]
"#
        ),
        json!({}),
    );
    p.poll().await.unwrap();
    pages.lock().unwrap()[1] = json!([{"id": 2}, {"id": 3}]);
    let ev = p.events().await;
    assert_eq!(ev.len(), 1, "the new item on page 2: {ev:?}");
}

/// `uuid()` in a header: each request carries a new random version-4 UUID
/// (an idempotency key or request id an API wants fresh), and the
/// function is no variable the connector must declare.
#[tokio::test]
async fn uuid_gives_each_request_a_fresh_request_id() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let app = Router::new().route(
        "/items",
        get(move |headers: HeaderMap| {
            let seen = s2.clone();
            async move {
                let id = headers["x-request-id"].to_str().unwrap().to_string();
                seen.lock().unwrap().push(id);
                axum::Json(json!({ "items": [] }))
            }
        }),
    );
    let up = serve(app).await;
    let mut p = Poller::new(
        &format!(
            r#"
name: ids
request:
  url: "http://{up}/items"
  headers: {{ X-Request-ID: "{{{{ uuid() }}}}" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: x }}]
"#
        ),
        json!({}),
    );
    p.poll().await.unwrap();
    p.poll().await.unwrap();
    let ids = seen.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{id}"
        );
        assert!(
            id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(
            groups[2].starts_with('4') && "89ab".contains(&groups[3][..1]),
            "{id}"
        );
    }
}
