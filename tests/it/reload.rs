//! SIGHUP: the real binary reloads its configuration. A bad file changes
//! nothing; a good one starts, restarts (on their stored state) and stops
//! only what changed; removed instances keep their state for `retention`.

use std::time::Duration;

use crate::support::*;

fn bridge(bank: &str, rx: &str, sources: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
{sources}
endpoints:
  agent: {{ url: "{rx}", secret: "{}" }}
"#,
        secret()
    )
    .replace("BANK", &format!("http://{bank}"))
}

const V1: &str = r#"
  balances:
    connector: bank-balance
    with: { base_url: BANK }
    for_each: { account: [acc-0001, acc-0002] }
    schedule: every 100ms
    deliver_to: [agent]
  changed:
    connector: bank-balance
    with: { base_url: BANK, account: acc-0003 }
    schedule: every 100ms
    deliver_to: [agent]
  gone:
    connector: bank-balance
    with: { base_url: BANK, account: acc-0004 }
    schedule: every 100ms
    retention: 1s
    deliver_to: [agent]
"#;

/// `balances` gains an instance, `changed` polls at another pace, `gone`
/// is removed.
const V2: &str = r#"
  balances:
    connector: bank-balance
    with: { base_url: BANK }
    for_each: { account: [acc-0001, acc-0002, acc-0005] }
    schedule: every 100ms
    deliver_to: [agent]
  changed:
    connector: bank-balance
    with: { base_url: BANK, account: acc-0003 }
    schedule: every 150ms
    deliver_to: [agent]
"#;

fn hup(d: &Daemon) {
    let pid = d.pid().expect("running");
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
}

/// The sequence numbers `changed/default` delivered for `bank.balance.changed`.
fn sequences(rx: &Receiver, instance: &str) -> Vec<u64> {
    rx.accepted_of("bank.balance.changed")
        .iter()
        .filter(|d| d.body["instance"] == instance && d.body["source"] == "changed")
        .map(|d| d.body["sequence"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_keeps_running_on_a_bad_one() {
    let bank = Bank::new(&["acc-0001", "acc-0002", "acc-0003", "acc-0004", "acc-0005"]);
    let addr = bank.serve("127.0.0.1:0").await.to_string();
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let mut d = Daemon::new(
        &bridge(&addr, &rx.url, V1),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/acc-0001", "changed/default", "gone/default"], 2)
        .await;
    bank.set_balance("acc-0003", 100_000);
    wait_for("the first change", Duration::from_secs(20), || {
        sequences(&rx, "default") == [1]
    })
    .await;

    // A bad file: refused with file, line and field; everything goes on.
    let good = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(
        d.config(),
        good.replace(
            "connector: bank-balance\n    with: { base_url: http://127.0.0.1",
            "connector: bank-balanse\n    with: { base_url: http://127.0.0.1",
        ),
    )
    .unwrap();
    let before = polls_of(&d.status().await, "balances/acc-0001");
    hup(&d);
    let s = d
        .wait_status("the bad reload refused", |s| {
            s["config"]["reloads_failed"] == 1
        })
        .await;
    let why = s["config"]["last_reload_error"].as_str().unwrap();
    assert!(
        why.contains("bridge.yaml:")
            && why.contains("sources.balances.connector")
            && why.contains("bank-balanse"),
        "{why}"
    );
    assert!(d.log().contains("reload refused"), "{}", d.log());
    d.wait_polls(&["balances/acc-0001", "gone/default"], before + 3)
        .await;

    // A good file: one instance added, one restarted, one source removed.
    std::fs::write(d.config(), bridge(&addr, &rx.url, V2)).unwrap();
    hup(&d);
    d.wait_status("the good reload applied", |s| s["config"]["reloads"] == 1)
        .await;
    let log = d.log();
    assert!(
        log.contains("reload done: 1 started, 1 restarted, 1 stopped"),
        "{log}"
    );
    assert!(log.contains("unit=changed/default"), "{log}");
    assert!(
        !log.contains("unit=balances/acc-0001") && !log.contains("unit=balances/acc-0002"),
        "unchanged instances are untouched:\n{log}"
    );
    d.wait_polls(&["balances/acc-0005", "changed/default"], 2)
        .await;
    let s = d.status().await;
    assert!(s["instances"]["gone/default"].is_null(), "{s:#}");
    // The restarted instance kept its state: its next event continues the
    // sequence (a fresh state would baseline and start again at 1).
    bank.set_balance("acc-0003", 200_000);
    wait_for(
        "the change after the reload",
        Duration::from_secs(20),
        || sequences(&rx, "default") == [1, 2],
    )
    .await;
    // The removed source's state is deleted once its retention (1 s)
    // passed, at the next reload (or hourly sweep).
    assert!(!d.log().contains("state deleted"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    hup(&d);
    d.wait_status("the second reload", |s| s["config"]["reloads"] == 2)
        .await;
    assert!(
        d.log().contains("state deleted") && d.log().contains("gone/default"),
        "{}",
        d.log()
    );
    // A connector change that makes every instance emit again is warned
    // about (here `watch`), and the instances restart.
    std::fs::write(
        d.dir.path().join("connectors/bank-balance.yaml"),
        repo_connector("bank-balance.yaml").replace(
            "detect: snapshot",
            "detect: snapshot\nwatch: \"$.available\"",
        ),
    )
    .unwrap();
    hup(&d);
    let s = d
        .wait_status("the third reload", |s| s["config"]["reloads"] == 3)
        .await;
    let warnings = s["config"]["last_reload_warnings"].to_string();
    assert!(
        warnings.contains("`watch` changed") && warnings.contains("source `balances`"),
        "{warnings}"
    );
    assert!(
        d.log()
            .contains("reload done: 0 started, 4 restarted, 0 stopped"),
        "{}",
        d.log()
    );
    // The store cannot move under a running daemon: refused.
    let v2 = bridge(&addr, &rx.url, V2);
    std::fs::write(
        d.config(),
        v2.replace("state_dir: state", "state_dir: elsewhere"),
    )
    .unwrap();
    hup(&d);
    let s = d
        .wait_status("the state_dir change refused", |s| {
            s["config"]["reloads_failed"] == 2
        })
        .await;
    assert!(
        s["config"]["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("state_dir changed"),
        "{s:#}"
    );
    // The admin token follows a reload.
    std::fs::write(
        d.config(),
        v2.replace(
            "admin: { listen: \"127.0.0.1:0\" }",
            "admin: { listen: \"127.0.0.1:0\", token: rotated-t0ken }",
        ),
    )
    .unwrap();
    hup(&d);
    let url = format!("http://{}/status", d.admin.clone().unwrap());
    let client = reqwest::Client::new();
    wait_for("the token required", Duration::from_secs(20), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(client.get(&url).send())
                .unwrap()
                .status()
                == 401
        })
    })
    .await;
    // The new token takes effect while the reload is applied, a moment
    // before the reload is counted: wait for the count with the token.
    let status = || {
        tokio::task::block_in_place(|| {
            let body = tokio::runtime::Handle::current()
                .block_on(async {
                    client
                        .get(&url)
                        .bearer_auth("rotated-t0ken")
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                })
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        })
    };
    wait_for("the fourth reload counted", Duration::from_secs(20), || {
        status()["config"]["reloads"] == 4
    })
    .await;
    let s = status();
    assert_eq!(s["config"]["reloads"], 4, "{s:#}");
    assert!(d.terminate().success());
}
