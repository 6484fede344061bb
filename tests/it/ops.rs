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
