//! Running as a service: the systemd notify protocol, read from a socket
//! the test provides, through the real binary and real signals.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::*;

fn messages(sock: &UnixDatagram, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !until(&got) {
        assert!(Instant::now() < deadline, "only got {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_watchdog_and_stopping() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{addr}", account: acc-0001 }}
    schedule: every 1s
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/", secret: "{}" }}
"#,
        secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    let path = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    d.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    // WatchdogSec=200ms: a ping every 100 ms.
    d.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    d.start().await;
    let got = tokio::task::block_in_place(|| {
        messages(&sock, |m| {
            m.iter().filter(|x| x.as_str() == "WATCHDOG=1").count() >= 3
        })
    });
    assert!(
        got[0].starts_with("READY=1\nSTATUS=polling 1 instances"),
        "{got:?}"
    );
    assert!(d.terminate().success());
    let got = tokio::task::block_in_place(|| {
        messages(&sock, |m| m.iter().any(|x| x.starts_with("STOPPING=1")))
    });
    assert!(got.last().unwrap().starts_with("STOPPING=1"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_everything_but_healthz_and_status_prints_tables() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0", token: "${{ADMIN_TOKEN}}" }}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{addr}", account: acc-0001 }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/", secret: "{}" }}
"#,
        secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.env.push(("ADMIN_TOKEN".into(), "adm-t0ken-123".into()));
    d.start().await;
    let base = format!("http://{}", d.admin.clone().unwrap());
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    for path in ["/status", "/metrics", "/readyz"] {
        assert_eq!(get(path, None).await.unwrap().status(), 401, "{path}");
        assert_eq!(
            get(path, Some("wrong")).await.unwrap().status(),
            401,
            "{path}"
        );
        assert_eq!(
            get(path, Some("adm-t0ken-123")).await.unwrap().status(),
            200,
            "{path}"
        );
    }
    // The CLI reads the token from the same config.
    let polls = |d: &Daemon| {
        let out =
            tokio::task::block_in_place(|| d.command(&["status", "--json"]).output().unwrap());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["instances"]["balances/default"]["polls_ok"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while polls(&d) < 1 {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::task::block_in_place(|| d.command(&["status"]).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("INSTANCE") && text.contains("\nENDPOINT"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("balances/default ")),
        "{text}"
    );
    let out = tokio::task::block_in_place(|| d.command(&["status", "--json"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["instances"]["balances/default"]["polls_ok"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        !d.log().contains("adm-t0ken-123"),
        "the token is never logged"
    );
}
