//! Real APIs, as they really answer: compressed bodies, status pages
//! tried with `pollhook test`, lists returned in another order, negative
//! magnitudes, feeds of one entry, and the headers that say how often to
//! poll. Each against a real upstream on 127.0.0.1.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::support::*;

/// Runs `pollhook test <file> --with k=v …` from the repository's root (so
/// the README's own commands run as written): (success, stdout + stderr).
async fn pollhook_test(file: &str, with: &[String]) -> (bool, String) {
    let mut c = Command::new(bin());
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("POLLHOOK_LOG", "warn")
        .arg("test")
        .arg(file);
    for w in with {
        c.args(["--with", w]);
    }
    // Blocking the runtime's worker would starve the upstream.
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `pollhook test` on a connector given as text.
async fn pollhook_test_text(connector: &str, with: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, connector).unwrap();
    let r = pollhook_test(file.to_str().unwrap(), with).await;
    drop(dir);
    r
}

/// The event bodies a `pollhook test` output shows.
fn dry_events(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("webhook-id "))
        .map(|l| serde_json::from_str(l.split_once(": ").unwrap().1).unwrap())
        .collect()
}

// ------------------------------------------------------------ compression

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

/// HTTP's `deflate` is the zlib format (RFC 9110, 8.4.1.2).
fn zlib(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

fn brotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(body).unwrap();
    }
    out
}

#[derive(Clone)]
struct Compressing {
    value: Arc<AtomicU64>,
    accept_encoding: Arc<Mutex<Vec<String>>>,
    bomb: Arc<Vec<u8>>,
}

/// Compresses whatever the request asked (as some servers do): the mode
/// in the path picks the encoding.
async fn compressing(
    State(up): State<Compressing>,
    UrlPath(mode): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    up.accept_encoding.lock().unwrap().push(
        headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
    );
    // A body as real listings are: large and repetitive.
    let body = json!({
        "value": up.value.load(Ordering::SeqCst),
        "padding": "abcdefgh".repeat(4096),
    })
    .to_string();
    let (encoding, bytes) = match mode.as_str() {
        "gzip" => ("gzip", gzip(body.as_bytes())),
        "deflate" => ("deflate", zlib(body.as_bytes())),
        "br" => ("br", brotli(body.as_bytes())),
        "bomb" => ("gzip", up.bomb.to_vec()),
        _ => return axum::http::StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            ("content-type", "application/json"),
            ("content-encoding", encoding),
        ],
        bytes,
    )
        .into_response()
}

/// pollhook asks for compressed bodies and reads gzip, deflate and brotli;
/// the body cap counts decoded bytes, so a gzip bomb (256 MiB of spaces
/// in 1.2 MB) is refused as too large, an error of its instance only, and
/// never decoded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_asked_for_and_read_and_a_gzip_bomb_is_refused() {
    // 256 MiB of spaces, compressed a MiB at a time (never held whole).
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mib = vec![b' '; 1 << 20];
    for _ in 0..256 {
        e.write_all(&mib).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    let up = Compressing {
        value: Arc::new(AtomicU64::new(1)),
        accept_encoding: Arc::default(),
        bomb: Arc::new(bomb),
    };
    let addr = serve(
        Router::new()
            .route("/{mode}", get(compressing))
            .with_state(up.clone()),
    )
    .await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let connector = r#"
name: packed
params: { base_url: { required: true }, mode: { required: true } }
request: { url: "{{ base_url }}/{{ mode }}" }
detect: snapshot
watch: "$.value"
emit: [{ type: packed.changed }]
"#;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  packed:
    connector: packed
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ mode: [gzip, deflate, br, bomb] }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(&bridge, &[("packed.yaml", connector.to_string())]);
    d.start().await;
    d.wait_polls(&["packed/gzip", "packed/deflate", "packed/br"], 1)
        .await;
    up.value.store(2, Ordering::SeqCst);
    wait_for(
        "a change read through each encoding",
        Duration::from_secs(20),
        || rx.accepted().len() >= 3,
    )
    .await;
    let mut got: Vec<String> = rx
        .accepted()
        .iter()
        .map(|e| e.body["instance"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["br", "deflate", "gzip"]);
    let s = d
        .wait_status("the bomb refused", |s| {
            s["instances"]["packed/bomb"]["polls_failed"]
                .as_u64()
                .is_some_and(|n| n >= 2)
        })
        .await;
    let err = s["instances"]["packed/bomb"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        err.contains("/bomb: response larger than the 10485760-byte cap")
            && err.contains("after decompression"),
        "{s:#}"
    );
    assert_eq!(s["instances"]["packed/bomb"]["events"], 0);
    // Decoding stopped at the cap: the daemon never held the 256 MiB (its
    // peak is about 75 MB in a debug build).
    if let Some(pid) = d.pid() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kb: u64 = st
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        assert!(hwm_kb < 160 << 10, "peak RSS {hwm_kb} kB");
    }
    for seen in up.accept_encoding.lock().unwrap().iter() {
        for enc in ["gzip", "deflate", "br"] {
            assert!(seen.contains(enc), "Accept-Encoding: {seen}");
        }
    }
    assert!(d.terminate().success());
}

// ------------------------------------------------- the status-page example

/// A Statuspage page's `/api/v2/status.json`, as githubstatus.com answers.
async fn status_json() -> impl IntoResponse {
    axum::Json(json!({
        "page": {
            "id": "kctbh9vrtdwd",
            "name": "GitHub",
            "url": "https://www.githubstatus.com",
            "time_zone": "Etc/UTC",
            "updated_at": "2026-12-04T16:58:27.150Z"
        },
        "status": { "indicator": "none", "description": "All Systems Operational" }
    }))
}

/// The README's own `pollhook test connectors/statuspage.yaml --with
/// base_url=…` exited 1: the dry run emits the first value as a baseline,
/// and `status.changed`'s data needs `previous`, which a first value does
/// not have. Rules that need `previous` do not fire on a first value (the
/// daemon with `baseline: emit` does the same); the rest still show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_status_page_example_runs_with_pollhook_test() {
    let addr = serve(Router::new().route("/api/v2/status.json", get(status_json))).await;
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let example = "pollhook test connectors/statuspage.yaml --with base_url=";
    assert!(readme.contains(example), "the README's example moved");
    let (ok, out) = pollhook_test(
        "connectors/statuspage.yaml",
        &[format!("base_url=http://{addr}")],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("so not emitted: status.changed (its `data`: undefined value"),
        "{out}"
    );
    assert!(dry_events(&out).is_empty(), "{out}");

    // A rule that needs no `previous` still shows its event.
    let connector = r#"
name: page
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/api/v2/status.json" }
detect: snapshot
watch: "$.status"
emit:
  - type: status.changed
    data: { previous: "{{ previous.indicator }}" }
  - type: status.seen
    data: { page: "{{ resource.page.name }}", indicator: "{{ current.indicator }}" }
"#;
    let (ok, out) = pollhook_test_text(connector, &[format!("base_url=http://{addr}")]).await;
    assert!(ok, "{out}");
    let events = dry_events(&out);
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["type"], "status.seen");
    assert_eq!(
        events[0]["data"],
        json!({"page": "GitHub", "indicator": "none"})
    );
}

// ------------------------------------------------------ negative magnitudes

/// A USGS summary feed with an event below zero and one whose magnitude is
/// not known yet (both real: about 2% of a day's `all_day` feed is below 0).
async fn usgs_feed() -> impl IntoResponse {
    let quake = |id: &str, mag: Value| {
        json!({
            "type": "Feature",
            "properties": { "mag": mag, "place": format!("{id} place"), "time": 1764490321450u64,
                            "url": format!("https://earthquake.usgs.gov/earthquakes/eventpage/{id}"),
                            "magType": "ml", "tsunami": 0, "alert": null, "status": "automatic" },
            "geometry": { "type": "Point", "coordinates": [-117.5, 35.7, 3.2] },
            "id": id
        })
    };
    (
        [("content-type", "application/geo+json")],
        axum::Json(json!({
            "type": "FeatureCollection",
            "metadata": { "count": 3 },
            "features": [quake("ak1", json!(-0.4)), quake("nc2", Value::Null), quake("ci3", json!(2.71))]
        })),
    )
}

/// Without `min_magnitude`, every earthquake of the feed is sent, those
/// below zero too; a minimum sends those known to be at least it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usgs_sends_every_earthquake_without_a_minimum_negative_magnitudes_too() {
    let addr = serve(Router::new().route(
        "/earthquakes/feed/v1.0/summary/{feed}",
        get(|| async { usgs_feed().await }),
    ))
    .await;
    let base = format!("base_url=http://{addr}");
    let ids = |out: &str| -> Vec<String> {
        dry_events(out)
            .iter()
            .map(|e| e["data"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (ok, out) = pollhook_test(
        "connectors/usgs-earthquakes.yaml",
        std::slice::from_ref(&base),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(ids(&out), ["ak1", "nc2", "ci3"], "{out}");
    assert_eq!(dry_events(&out)[0]["data"]["mag"], json!(-0.4));
    for (min, want) in [
        ("-1", vec!["ak1", "ci3"]),
        ("0", vec!["ci3"]),
        ("2.5", vec!["ci3"]),
    ] {
        let (ok, out) = pollhook_test(
            "connectors/usgs-earthquakes.yaml",
            &[base.clone(), format!("min_magnitude={min}")],
        )
        .await;
        assert!(ok, "{out}");
        assert_eq!(ids(&out), want, "min_magnitude={min}: {out}");
    }
}

// --------------------------------------------------- a feed of one entry

const ONE_ENTRY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <id>tag:github.com,2008:https://github.com/acme/tool/releases</id>
  <title>Release notes from tool</title>
  <updated>2026-12-01T10:00:00Z</updated>
  <entry>
    <id>tag:github.com,2008:Repository/1/v1.0.0</id>
    <updated>2026-12-01T10:00:00Z</updated>
    <link rel="alternate" type="text/html" href="https://github.com/acme/tool/releases/tag/v1.0.0"/>
    <title>v1.0.0</title>
    <content type="html">First release</content>
    <author><name>octocat</name></author>
  </entry>
</feed>"#;

/// `pollhook test` counted a one-entry feed's records as the entry's child
/// elements (6); one entry is one record, as detection sees it, in XML
/// and JSON alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollhook_test_counts_a_one_entry_feed_as_one_record() {
    let addr = serve(
        Router::new()
            .route(
                "/releases.atom",
                get(|| async { ([("content-type", "application/atom+xml")], ONE_ENTRY) }),
            )
            .route(
                "/items.json",
                get(|| async { axum::Json(json!({"items": [{"id": 1, "a": 1, "b": 2}]})) }),
            ),
    )
    .await;
    let (ok, out) = pollhook_test(
        "connectors/atom-feed.yaml",
        &[format!("url=http://{addr}/releases.atom")],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("/releases.atom -> 200 ("), "{out}");
    assert!(out.contains(" bytes, 1 records)"), "{out}");
    assert_eq!(dry_events(&out).len(), 1, "{out}");

    let connector = r#"
name: list
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/items.json" }
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
emit: [{ type: item.created }]
"#;
    let (ok, out) = pollhook_test_text(connector, &[format!("base_url=http://{addr}")]).await;
    assert!(ok, "{out}");
    assert!(out.contains(" bytes, 1 records)"), "{out}");
}

// -------------------------------------------------- what the API asks for

/// GitHub's notifications answer with `X-Poll-Interval: 60` and
/// `Cache-Control: private, max-age=60, s-maxage=60`: `/status` named
/// `max-age` as the reason. The reason is the header that is about polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_x_poll_interval_when_max_age_asks_the_same() {
    let addr = serve(Router::new().route(
        "/notifications",
        get(|| async {
            (
                [
                    ("x-poll-interval", "1"),
                    ("cache-control", "private, max-age=1, s-maxage=1"),
                ],
                axum::Json(json!({"ok": true})),
            )
        }),
    ))
    .await;
    let connector = r#"
name: hinted
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/notifications" }
detect: snapshot
emit: [{ type: hinted.changed }]
"#;
    let bridge = one_source_bridge("hinted", "hinted", addr, "50ms", "http://127.0.0.1:9/", "");
    let mut d = Daemon::new(&bridge, &[("hinted.yaml", connector.to_string())]);
    d.start().await;
    let s = d
        .wait_status("a floor from the answer", |s| {
            s["instances"]["hinted/default"]["interval_reason"].is_string()
        })
        .await;
    let i = &s["instances"]["hinted/default"];
    assert_eq!(i["interval_reason"], "X-Poll-Interval: 1", "{s:#}");
    assert_eq!(i["interval_floor_ms"], 1000, "{s:#}");
    assert!(d.terminate().success());
}

// ------------------------------------------------------ order is no change

fn psd2_fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/psd2")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A bank that lists an account's balances in another order from one
/// answer to the next (stage 0: as documented; 1: the same balances
/// reversed; 2: new amounts, reversed).
async fn reordering_bank(State(stage): State<Arc<AtomicU64>>) -> impl IntoResponse {
    let stage = stage.load(Ordering::SeqCst);
    let mut body = psd2_fixture(if stage < 2 {
        "balances-before.json"
    } else {
        "balances-after.json"
    });
    if stage >= 1 {
        body["balances"].as_array_mut().unwrap().reverse();
    }
    axum::Json(body)
}

/// The PSD2 balances connector sent a false `changed` when the bank listed
/// the same balances in another order. Its balances are a set now
/// (`watch_key: balanceType`): reordered, nothing is sent; a real change
/// is sent once, with amounts keyed by balance type, not by position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psd2_balances_listed_in_another_order_are_no_change() {
    let stage = Arc::new(AtomicU64::new(0));
    let addr = serve(
        Router::new()
            .route("/v1/accounts/{id}/balances", get(reordering_bank))
            .with_state(stage.clone()),
    )
    .await;
    let connector = repo_connector("psd2-balances.yaml");
    assert!(connector.contains("\nrate_limit: 4/1d\n"));
    // PSD2's 4 reads a day would allow one poll: a test rate instead.
    let connector = connector.replace("\nrate_limit: 4/1d\n", "\nrate_limit: 100/s\n");
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  balances:
    connector: psd2-balances
    with: {{ base_url: "http://{addr}", account_id: 3dc3d5b3-7023-4848-9853-f5400a64e80f, consent_id: c-1, token: t-1 }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(&bridge, &[("psd2-balances.yaml", connector)]);
    d.start().await;
    d.wait_polls(&["balances/default"], 2).await;
    stage.store(1, Ordering::SeqCst);
    let polls = polls_of(&d.status().await, "balances/default");
    d.wait_polls(&["balances/default"], polls + 5).await;
    assert!(rx.all().is_empty(), "reordered: {:#?}", rx.all());

    stage.store(2, Ordering::SeqCst);
    wait_for("the change", Duration::from_secs(20), || {
        !rx.accepted().is_empty()
    })
    .await;
    let polls = polls_of(&d.status().await, "balances/default");
    d.wait_polls(&["balances/default"], polls + 3).await;
    let got = rx.accepted();
    assert_eq!(got.len(), 1, "{got:#?}");
    let data = &got[0].body["data"];
    assert_eq!(got[0].body["type"], "psd2.balance.changed");
    assert_eq!(
        data["previous_amounts"],
        json!({"closingBooked": {"currency": "EUR", "amount": "1543.21"},
               "expected": {"currency": "EUR", "amount": "1498.71"}})
    );
    assert_eq!(
        data["amounts"],
        json!({"closingBooked": {"currency": "EUR", "amount": "1286.54"},
               "expected": {"currency": "EUR", "amount": "1241.04"}})
    );
    // The balances themselves as the bank listed them.
    assert_eq!(data["balances"][0]["balanceType"], "expected");
    assert!(d.terminate().success());
}
