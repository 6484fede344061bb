//! The dashboard (`GET /` on the admin server) in a real browser: Debian's
//! Chromium, headless, driven through chromedriver (WebDriver, with the
//! fantoccini client). The page shows what `/status` reports, a failing
//! instance as failing; its replay button delivers a dead letter under its
//! original webhook-id, its enable button sends to a disabled endpoint
//! again; without the token nothing is shown or done.
//!
//! Needs `chromium` and `chromium-driver` (Debian packages; `.ci/run`
//! installs them). Without them the test says SKIPPED, unless
//! `POLLHOOK_TEST_REQUIRE_BROWSER` is set or `CI=true`.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fantoccini::{Client, Locator};
use serde_json::{json, Value};

use crate::support::*;

const TOKEN: &str = "dashboard-test-token-5f2c";

/// Headless Chromium through chromedriver, killed when dropped.
///
/// Why a process group: chromedriver starts Chromium as its child, and
/// killing chromedriver alone (as a panicking test does, without closing
/// the WebDriver session) leaves Chromium running as an orphan for ever.
/// Both are put in a group of their own and the whole group is killed.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own process group; no memory is involved.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn required() -> bool {
    std::env::var_os("POLLHOOK_TEST_REQUIRE_BROWSER").is_some_and(|v| !v.is_empty())
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

async fn browser() -> Option<Browser> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let driver = ["/usr/bin/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let (Some(chromium), Some(driver)) = (chromium, driver) else {
        let why = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)";
        if required() {
            panic!("{why} (POLLHOOK_TEST_REQUIRE_BROWSER or CI=true is set)");
        }
        eprintln!("SKIPPED (the dashboard's browser test: {why})");
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().unwrap();
    let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1100",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    }))
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match Client::with_capabilities_and_connector(&url, &caps, connector).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no browser session: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    Some(Browser {
        client,
        driver: child,
        _profile: profile,
    })
}

/// The upstream: feed `bad` answers 500, the others a shared list.
#[derive(Default)]
struct Feeds {
    items: Mutex<Vec<u32>>,
    fixed: AtomicBool,
}

async fn feed(State(f): State<Arc<Feeds>>, Path(name): Path<String>) -> Response {
    if name == "bad" && !f.fixed.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "broken").into_response();
    }
    let items: Vec<Value> = f
        .items
        .lock()
        .unwrap()
        .iter()
        .map(|n| json!({ "id": n.to_string() }))
        .collect();
    Json(json!({ "items": items })).into_response()
}

const CONNECTOR: &str = r#"
name: feed
params:
  base_url: { required: true }
  name: { required: true }
request:
  url: "{{ base_url }}/feeds/{{ name }}"
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
emit:
  - type: feed.item.created
"#;

async fn admin_get(d: &Daemon, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(format!("http://{}{path}", d.admin.as_ref().unwrap()));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn status(d: &Daemon) -> Value {
    let body = admin_get(d, "/status", Some(TOKEN))
        .await
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

async fn wait_status(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(d).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Text of the first element matching `css`.
async fn text(c: &Client, css: &str) -> String {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"))
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_daemon_and_acts_from_a_real_browser() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let feeds = Arc::new(Feeds::default());
    let addr = serve(
        Router::new()
            .route("/feeds/{name}", get(feed))
            .with_state(feeds.clone()),
    )
    .await;
    let agent = Receiver::start(&secret(), Plan::Always(500)).await;
    let gone = Receiver::start(&secret(), Plan::Always(410)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0", token: "{TOKEN}" }}
sources:
  news:
    connector: feed
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ name: [good, bad] }}
    schedule: every 300ms
    deliver_to: [agent, gone]
endpoints:
  agent: {{ url: "{}", secret: {}, retry: {{ schedule: [50ms], max_attempts: 1 }} }}
  gone: {{ url: "{}", secret: {} }}
"#,
        agent.url,
        secret(),
        gone.url,
        secret()
    );
    let mut d = Daemon::new(&bridge, &[("feed.yaml", CONNECTOR.to_string())]);
    d.start().await;
    wait_status(&d, "the first poll (the baseline)", |s| {
        s["instances"]["news/good"]["polls_ok"].as_u64() >= Some(1)
    })
    .await;
    feeds.items.lock().unwrap().push(1);
    // The item dies at `agent` (one attempt, 500) and disables `gone` (410).
    let s = wait_status(&d, "a dead letter and a disabled endpoint", |s| {
        s["endpoints"]["agent"]["dead_letters"] == 1
            && s["endpoints"]["gone"]["disabled"].is_string()
            && s["instances"]["news/bad"]["consecutive_failures"].as_u64() >= Some(1)
    })
    .await;
    let dead_id = agent.all()[0].id.clone();

    // Without the token: nothing shown, nothing done.
    let admin = format!("http://{}", d.admin.as_ref().unwrap());
    let page = admin_get(&d, "/", None).await.text().await.unwrap();
    assert!(
        page.contains("admin token") && !page.contains("news/good"),
        "{page}"
    );
    assert_eq!(admin_get(&d, "/status", None).await.status(), 401);
    let posted = reqwest::Client::new()
        .post(format!("{admin}/ui/enable"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("endpoint=gone&csrf=x")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 401);

    // Sign in once.
    c.goto(&format!("{admin}/")).await.unwrap();
    let token = c.wait().for_element(Locator::Id("token")).await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    c.find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    if let Err(e) = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("instances-table"))
        .await
    {
        panic!(
            "signing in did not lead to the page ({e}): {} at {}",
            c.source().await.unwrap_or_default(),
            c.current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default()
        );
    }

    // What /status reports is on the page.
    for (key, _) in s["instances"].as_object().unwrap() {
        let row = format!("tr[data-instance=\"{key}\"]");
        assert!(!text(c, &row).await.is_empty());
    }
    assert_eq!(
        text(c, "tr[data-instance=\"news/good\"] .state").await,
        "ok"
    );
    assert_eq!(
        text(c, "tr[data-instance=\"news/bad\"] .state").await,
        "failing"
    );
    assert!(text(c, "tr[data-instance=\"news/bad\"] .err")
        .await
        .contains("500"));
    assert!(text(c, "tr[data-endpoint=\"gone\"]")
        .await
        .contains("disabled"));
    let dead_row = format!("tr[data-event=\"{dead_id}\"]");
    assert!(text(c, &dead_row).await.contains("news/good"));
    assert!(text(c, "#sources-table").await.contains("news"));
    // The stylesheet applies under the page's content security policy
    // (a wrong hash would leave the failing state and the chart's legend
    // in the default black).
    let css = |css: &'static str, property: &'static str| async move {
        c.find(Locator::Css(css))
            .await
            .unwrap()
            .css_value(property)
            .await
            .unwrap()
    };
    assert_eq!(
        css("tr[data-instance=\"news/bad\"] .state", "color").await,
        "rgba(207, 34, 46, 1)"
    );
    assert_eq!(
        css("#activity-chart .legend-polls", "fill").await,
        "rgb(9, 105, 218)"
    );
    assert!(
        !c.source().await.unwrap().contains(TOKEN),
        "the page shows no secret"
    );
    let shot = c.screenshot().await.unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &shot).unwrap();
    if std::env::var_os("POLLHOOK_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png"),
            &shot,
        )
        .unwrap();
    }

    // Replay: the dead letter is delivered with its original webhook-id.
    agent.set_plan(Plan::Always(204));
    c.find(Locator::Css(&format!("{dead_row} button.replay")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the replayed event", Duration::from_secs(30), || {
        agent.accepted().iter().any(|x| x.id == dead_id)
    })
    .await;
    assert!(text(c, "#flash").await.contains("replayed 1"));

    // Enable: the disabled endpoint gets what waited for it.
    gone.set_plan(Plan::Always(204));
    c.find(Locator::Css("tr[data-endpoint=\"gone\"] button.enable"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the enabled endpoint's event",
        Duration::from_secs(30),
        || !gone.accepted().is_empty(),
    )
    .await;
    wait_status(&d, "gone enabled", |s| {
        s["endpoints"]["gone"]["disabled"].is_null()
    })
    .await;
    assert!(text(c, "#flash").await.contains("endpoint gone enabled"));

    // A form posted from another site is refused, signed in or not.
    let session = c
        .get_named_cookie(pollhook::admin::dashboard::COOKIE)
        .await
        .expect("the session cookie");
    let cookie = format!("{}={}", session.name(), session.value());
    let cross = reqwest::Client::new()
        .post(format!("{admin}/ui/drop"))
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("id={dead_id}&csrf=guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    // The failing instance recovers and the page says so at its refresh.
    feeds.fixed.store(true, Ordering::SeqCst);
    wait_status(&d, "bad recovered", |s| {
        s["instances"]["news/bad"]["consecutive_failures"] == 0
    })
    .await;
    c.goto(&format!("{admin}/")).await.unwrap();
    assert_eq!(text(c, "tr[data-instance=\"news/bad\"] .state").await, "ok");
    assert!(d.terminate().success());
}
