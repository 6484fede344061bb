//! A full disk: the store on a 4 MiB tmpfs fills while changes flow. The
//! instance reports the store's error (not a detection error), `/readyz`
//! says not ready and why, `/status` says "no space left", the daemon
//! stops with the distinct status the unit's `Restart=` acts on, and once
//! space returns a restarted daemon delivers every committed event and the
//! latest value: nothing is lost.
//!
//! Needs root (it mounts a tmpfs). Where it cannot mount one it prints
//! `SKIPPED` and passes, unless `CI` is set (or
//! `POLLHOOK_TEST_REQUIRE_TMPFS`, which `.ci/run` sets as root): there a
//! skip fails the run, so the test can never pass by not running.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use crate::support::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether a skip must fail the test: on CI (`CI` set to anything but
/// `false`), or when asked to by `POLLHOOK_TEST_REQUIRE_TMPFS`.
fn skip_fails(ci: Option<&str>, require: Option<&str>) -> bool {
    ci.is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
        || require.is_some_and(|v| !v.is_empty())
}

/// Says the test was skipped and why; fails it where it must run.
fn skipped(why: &str) {
    let msg = format!(
        "a_full_disk_is_reported_and_survived_without_losing_anything: cannot mount a tmpfs (needs root): {why}"
    );
    let ci = std::env::var("CI").ok();
    let require = std::env::var("POLLHOOK_TEST_REQUIRE_TMPFS").ok();
    if skip_fails(ci.as_deref(), require.as_deref()) {
        panic!("SKIPPED {msg}; CI or POLLHOOK_TEST_REQUIRE_TMPFS is set: this test must run here (as root)");
    }
    eprintln!("SKIPPED {msg}");
}

#[test]
fn a_skip_fails_on_ci_and_when_required() {
    assert!(skip_fails(Some("true"), None));
    assert!(skip_fails(Some("1"), None));
    assert!(skip_fails(None, Some("1")));
    assert!(!skip_fails(None, None));
    assert!(!skip_fails(Some("false"), None));
    assert!(!skip_fails(Some(""), Some("")));
}

/// Each request is a new 200 KB snapshot until `last`, then stays.
async fn value(State((n, last)): State<(Arc<AtomicU64>, u64)>) -> axum::Json<serde_json::Value> {
    let v = (n.fetch_add(1, Ordering::SeqCst) + 1).min(last);
    axum::Json(serde_json::json!({ "v": v, "pad": "x".repeat(200_000) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_survived_without_losing_anything() {
    const LAST: u64 = 400;
    let counter = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/value", get(value))
        .with_state((counter.clone(), LAST));
    let addr = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let connector = r#"
name: big
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/value" }
detect: snapshot
emit: [{ type: big.changed, data: "{{ current.v }}" }]
"#;
    let bridge = one_source_bridge("big", "big", addr, "50ms", &rx.url, "");
    let mut d = Daemon::new(&bridge, &[("big.yaml", connector.to_string())]);
    let disk = match Tmpfs::mount(&d.state_dir(), "4m") {
        Ok(t) => t,
        Err(why) => {
            skipped(&why);
            return;
        }
    };
    d.env.push(("POLLHOOK_STORE_GIVE_UP".into(), "4s".into()));
    d.start().await;
    // The store fills: the instance says so, and so do /status and /readyz.
    // (The store's health may turn first, from a delivery or an attempt
    // record that could not be written: wait for both.)
    let s = d
        .wait_status("the store full and the instance failing", |s| {
            s["store"]["error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("no space left"))
                && s["instances"]["big/default"]["last_error"].is_string()
        })
        .await;
    let err = s["instances"]["big/default"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("cannot commit to the store"), "{err}");
    assert!(!err.contains("detection failed"), "{err}");
    let ready = reqwest::get(format!("http://{}/readyz", d.admin.as_ref().unwrap()))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(ready.text().await.unwrap().contains("store unavailable"));
    // It gives up with the status the unit restarts on.
    let exit = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(60)));
    assert_eq!(exit.code(), Some(75), "{}", d.log());
    // Space returns; the service manager starts it again.
    disk.resize("256m");
    d.start().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !rx
        .accepted()
        .iter()
        .any(|e| e.body["data"].to_string().trim_matches('"') == LAST.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the latest value was not delivered; {} accepted\n{}",
            rx.accepted().len(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every committed event arrived: sequences 1..=max, no gap.
    let mut seqs: Vec<u64> = rx
        .accepted()
        .iter()
        .filter_map(|e| e.body["sequence"].as_u64())
        .collect();
    seqs.sort();
    seqs.dedup();
    let max = *seqs.last().unwrap();
    assert_eq!(
        seqs,
        (1..=max).collect::<Vec<_>>(),
        "a committed event was lost"
    );
    assert!(d.terminate().success());
}
