//! What an API asks of pollers: how often (`X-Poll-Interval`,
//! `Cache-Control: max-age`) as a floor under the schedule, shown on
//! `/status` as the reason; who is asking (`user_agent`, bridge-wide or
//! per connector); rate limits (long windows that restarts cannot
//! overspend, a source's over its connector's); and a conditional paged
//! listing that stops at a `304` on page one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::support::*;

/// An upstream that answers with `headers` and records each request's
/// arrival and User-Agent.
#[derive(Default)]
struct Api {
    headers: Mutex<Vec<(&'static str, String)>>,
    seen: Mutex<Vec<(Instant, String)>>,
}

async fn answer(State(api): State<Arc<Api>>, req: HeaderMap) -> impl IntoResponse {
    let ua = req
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    api.seen.lock().unwrap().push((Instant::now(), ua));
    let mut h = HeaderMap::new();
    for (k, v) in api.headers.lock().unwrap().iter() {
        h.insert(*k, v.parse().unwrap());
    }
    (h, Json(json!({ "items": [] })))
}

impl Api {
    /// How many requests came with this User-Agent.
    fn requests_from(&self, ua: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, u)| u == ua)
            .count()
    }
}

async fn start_api(headers: &[(&'static str, &str)]) -> (Arc<Api>, std::net::SocketAddr) {
    let api = Arc::new(Api::default());
    *api.headers.lock().unwrap() = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let addr = serve(
        Router::new()
            .route("/items", get(answer))
            .with_state(api.clone()),
    )
    .await;
    (api, addr)
}

fn connector(extra: &str) -> String {
    format!(
        r#"
name: api
params:
  base_url: {{ required: true }}
  contact: {{ default: "nobody@example.com" }}
request:
  url: "{{{{ base_url }}}}/items"
{extra}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit:
  - type: item.created
"#
    )
}

fn bridge(addr: std::net::SocketAddr, every: &str, top: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{top}
sources:
  api:
    connector: api
    with: {{ base_url: "http://{addr}" }}
    schedule: every {every}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        secret()
    )
}

/// The gaps between consecutive requests.
fn gaps(api: &Api) -> Vec<Duration> {
    let seen = api.seen.lock().unwrap();
    seen.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_poll_interval_floors_the_schedule_and_status_says_why() {
    let (api, addr) = start_api(&[("x-poll-interval", "1")]).await;
    let mut d = Daemon::new(&bridge(addr, "100ms", ""), &[("api.yaml", connector(""))]);
    d.start().await;
    wait_for("four polls", Duration::from_secs(30), || {
        api.seen.lock().unwrap().len() >= 4
    })
    .await;
    let g = gaps(&api);
    assert!(
        g.iter().all(|g| *g >= Duration::from_millis(950)),
        "every 100ms asked, 1 s between polls wanted: {g:?}"
    );
    let s = d.status().await;
    let i = &s["instances"]["api/default"];
    assert_eq!(i["interval_floor_ms"], 1000, "{i}");
    assert_eq!(i["interval_reason"], "X-Poll-Interval: 1", "{i}");
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_max_age_floors_it_too_unless_the_connector_says_no() {
    let (api, addr) = start_api(&[("cache-control", "public, max-age=1")]).await;
    let mut d = Daemon::new(&bridge(addr, "100ms", ""), &[("api.yaml", connector(""))]);
    d.start().await;
    wait_for("three polls", Duration::from_secs(30), || {
        api.seen.lock().unwrap().len() >= 3
    })
    .await;
    assert!(gaps(&api).iter().all(|g| *g >= Duration::from_millis(950)));
    assert!(d.terminate().success());

    // `poll_hints: false`: the schedule alone.
    let (api, addr) =
        start_api(&[("cache-control", "max-age=60"), ("x-poll-interval", "60")]).await;
    let mut d = Daemon::new(
        &bridge(addr, "100ms", ""),
        &[("api.yaml", connector("poll_hints: false"))],
    );
    d.start().await;
    wait_for(
        "five polls, at the schedule's pace",
        Duration::from_secs(30),
        || api.seen.lock().unwrap().len() >= 5,
    )
    .await;
    let s = d.status().await;
    assert!(
        s["instances"]["api/default"]["interval_reason"].is_null(),
        "{s}"
    );
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_agent_is_the_bridges_unless_the_connector_sets_its_own() {
    let (api, addr) = start_api(&[]).await;
    let mut d = Daemon::new(
        &bridge(
            addr,
            "100ms",
            "user_agent: \"acme-agents/1.0 (ops@acme.example)\"",
        ),
        &[("api.yaml", connector(""))],
    );
    d.start().await;
    wait_for("a poll", Duration::from_secs(30), || {
        !api.seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        api.seen.lock().unwrap()[0].1,
        "acme-agents/1.0 (ops@acme.example)"
    );
    assert!(d.terminate().success());

    // Without one: pollhook's own.
    let (api, addr) = start_api(&[]).await;
    let mut d = Daemon::new(&bridge(addr, "100ms", ""), &[("api.yaml", connector(""))]);
    d.start().await;
    wait_for("a poll", Duration::from_secs(30), || {
        !api.seen.lock().unwrap().is_empty()
    })
    .await;
    assert!(api.seen.lock().unwrap()[0].1.starts_with("pollhook/"));
    assert!(d.terminate().success());

    // The connector's own, a template of its params, wins.
    let (api, addr) = start_api(&[]).await;
    let mut d = Daemon::new(
        &bridge(addr, "100ms", "user_agent: bridge-wide"),
        &[(
            "api.yaml",
            connector("  user_agent: \"weather-bot ({{ contact }})\""),
        )],
    );
    d.start().await;
    wait_for("a poll", Duration::from_secs(30), || {
        !api.seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        api.seen.lock().unwrap()[0].1,
        "weather-bot (nobody@example.com)"
    );
    assert!(d.terminate().success());
}

#[test]
fn a_user_agent_given_twice_or_unusable_is_a_config_error() {
    let d = Daemon::new(
        &bridge("127.0.0.1:9".parse().unwrap(), "1m", ""),
        &[(
            "api.yaml",
            connector("  user_agent: a\n  headers: { User-Agent: b }"),
        )],
    );
    let out = d.command(&["validate"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("request.user_agent") && err.contains("not both"),
        "{err}"
    );

    let d = Daemon::new(
        &bridge("127.0.0.1:9".parse().unwrap(), "1m", "user_agent: \"\""),
        &[("api.yaml", connector(""))],
    );
    let out = d.command(&["validate"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("user_agent") && err.contains("User-Agent header value"),
        "{err}"
    );
}

/// `rate_limit: 1/1h` (a long window, counted in the store): restarted
/// three times, the daemon still made one request, not four. A second
/// source without a limit, due at the same moments, shows each run had
/// the time to poll (its requests are told apart by their User-Agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_window_rate_limit_survives_restarts() {
    let (api, addr) = start_api(&[]).await;
    let limited =
        connector("  user_agent: limited").replace("request:", "rate_limit: 1/1h\nrequest:");
    let free = connector("  user_agent: free").replace("name: api", "name: free");
    let bridge = bridge(addr, "100ms", "").replace(
        "endpoints:",
        &format!(
            "  free:\n    connector: free\n    with: {{ base_url: \"http://{addr}\" }}\n    schedule: every 100ms\n    deliver_to: [agent]\nendpoints:"
        ),
    );
    let mut d = Daemon::new(&bridge, &[("api.yaml", limited), ("free.yaml", free)]);
    let count = |ua: &str| api.requests_from(ua);
    for run in 0..4 {
        if run > 0 {
            assert!(d.terminate().success());
        }
        let before = count("free");
        d.start().await;
        wait_for("the free source's polls", Duration::from_secs(30), || {
            count("free") >= before + 3
        })
        .await;
        if run == 0 {
            assert_eq!(count("limited"), 1, "the first run's one request");
        }
    }
    // Put off, not failing, and `/status` says why.
    let s = d
        .wait_status("the limited instance put off", |s| {
            s["instances"]["api/default"]["interval_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("rate_limit 1/1h"))
        })
        .await;
    assert_eq!(
        s["instances"]["api/default"]["consecutive_failures"], 0,
        "{s}"
    );
    assert!(d.terminate().success());
    assert_eq!(count("limited"), 1, "restarts spent the hour's quota");
}

/// A source's `rate_limit:` in bridge.yaml replaces its connector's, both
/// ways: above a connector's `1/1h` (an operator with a bigger quota) and
/// below a connector without one. Every source polls every 100 ms; the
/// User-Agent (the `contact` param) tells their requests apart. Once the
/// raised and the free sources made three requests each, the two held to
/// 1/1h made one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_rate_limit_overrides_its_connectors() {
    let (api, addr) = start_api(&[]).await;
    let agent = r#"  user_agent: "{{ contact }}""#;
    let hourly = connector(agent).replace("request:", "rate_limit: 1/1h\nrequest:");
    let free = connector(agent).replace("name: api", "name: free");
    let source = |name: &str, connector: &str, extra: &str| {
        format!(
            "  {name}:\n    connector: {connector}\n    with: {{ base_url: \"http://{addr}\", contact: {name} }}\n    schedule: every 100ms\n{extra}    deliver_to: [agent]\n"
        )
    };
    let sources = [
        source("raised", "api", "    rate_limit: 100/s\n"),
        source("lowered", "free", "    rate_limit: 1/1h\n"),
        source("free", "free", ""),
    ]
    .concat();
    // The bridge's own `api` source keeps the connector's 1/1h.
    let bridge = bridge(addr, "100ms", "")
        .replace("with: { base_url:", "with: { contact: kept, base_url:")
        .replace("endpoints:", &format!("{sources}endpoints:"));
    let mut d = Daemon::new(&bridge, &[("api.yaml", hourly), ("free.yaml", free)]);
    let count = |ua: &str| api.requests_from(ua);
    d.start().await;
    wait_for(
        "three polls of each unlimited source",
        Duration::from_secs(30),
        || {
            count("raised") >= 3
                && count("free") >= 3
                && count("kept") >= 1
                && count("lowered") >= 1
        },
    )
    .await;
    let s = d
        .wait_status("the lowered instance put off", |s| {
            s["instances"]["lowered/default"]["interval_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("rate_limit 1/1h"))
        })
        .await;
    assert_eq!(count("kept"), 1, "the connector's 1/1h: {s}");
    assert_eq!(count("lowered"), 1, "the source's 1/1h: {s}");
    assert!(d.terminate().success());
}

/// A paged listing whose first page's `ETag` covers the whole listing.
#[derive(Default)]
struct Listing {
    /// Every item, two per page; the ETag names this version.
    items: Mutex<(Vec<u64>, &'static str)>,
    /// Each request: page number, whether it was conditional, status.
    seen: Mutex<Vec<(usize, bool, u16)>>,
}

async fn listing_page(
    State(l): State<Arc<Listing>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let (items, etag) = l.items.lock().unwrap().clone();
    let asked = headers.get("if-none-match").and_then(|v| v.to_str().ok());
    let status = if page == 1 && asked == Some(etag) {
        304
    } else {
        200
    };
    l.seen.lock().unwrap().push((page, asked.is_some(), status));
    if status == 304 {
        return axum::http::StatusCode::NOT_MODIFIED.into_response();
    }
    let chunk: Vec<_> = items
        .iter()
        .skip((page - 1) * 2)
        .take(2)
        .map(|id| json!({ "id": id }))
        .collect();
    ([("etag", etag)], Json(json!({ "items": chunk }))).into_response()
}

/// `paginate.conditional: true`: page 1 is asked with `If-None-Match`,
/// and its `304` ends the poll (no page 2); a new ETag reads the listing
/// whole, and the item that appeared on page 2 is delivered. Without the
/// option the same listing is never asked conditionally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_paged_listing_stops_at_a_304_on_page_one() {
    let l = Arc::new(Listing::default());
    *l.items.lock().unwrap() = (vec![1, 2, 3], "\"v1\"");
    let addr = serve(
        Router::new()
            .route("/items", get(listing_page))
            .with_state(l.clone()),
    )
    .await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let api = |conditional: &str| {
        connector("").replace(
            "items: \"$.items[*]\"",
            &format!("paginate: {{ page: {{ param: page }}{conditional} }}\nitems: \"$.items[*]\""),
        )
    };
    let bridge = bridge(addr, "100ms", "")
        .replace("http://127.0.0.1:9/hook", &rx.url)
        .replace(
            "endpoints:",
            &format!("  plain:\n    connector: plain\n    with: {{ base_url: \"http://{addr}\" }}\n    schedule: every 1h\n    deliver_to: [agent]\nendpoints:"),
        );
    let plain = api("").replace("name: api", "name: plain");
    let mut d = Daemon::new(
        &bridge,
        &[
            ("api.yaml", api(", conditional: true")),
            ("plain.yaml", plain),
        ],
    );
    d.start().await;
    let count = |f: &dyn Fn(&(usize, bool, u16)) -> bool| {
        l.seen.lock().unwrap().iter().filter(|r| f(r)).count()
    };
    wait_for(
        "three 304s on page 1 and the plain source's read",
        Duration::from_secs(30),
        || count(&|r| r.2 == 304) >= 3 && count(&|r| r.0 == 2) >= 2,
    )
    .await;
    // Two whole reads (the plain source's and the first conditional
    // one's): page 2 asked twice, never after a 304; page 1 asked without
    // a validator only by those two.
    let seen = format!("{:?}", l.seen.lock().unwrap());
    assert_eq!(count(&|r| r.0 == 2), 2, "{seen}");
    assert_eq!(count(&|r| r.0 == 1 && !r.1), 2, "{seen}");
    assert_eq!(count(&|r| r.1 && r.0 != 1), 0, "only page 1 is conditional");
    // A new item on page 2, a new ETag: read whole, the item delivered.
    *l.items.lock().unwrap() = (vec![1, 2, 3, 4], "\"v2\"");
    wait_for("item 4 delivered", Duration::from_secs(30), || {
        rx.accepted().iter().any(|e| e.body["data"]["id"] == 4)
    })
    .await;
    assert!(d.terminate().success());
    assert!(rx.accepted().iter().all(|e| e.verified));
    assert_eq!(rx.accepted().len(), 1, "only item 4 is new");
}
