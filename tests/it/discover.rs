//! `for_each: discover`: the bank's own `GET /accounts` decides which
//! instances poll. Accounts that appear start polling; accounts that leave
//! stop, keep their state for the retention period (and resume from their
//! cursor if they come back in time), and lose it after.

use std::time::Duration;

use crate::support::*;

const TOKEN: &str = "disc0very-token";

fn tx_of(rx: &Receiver, instance: &str) -> Vec<String> {
    rx.accepted_of("bank.transaction.created")
        .iter()
        .filter(|d| d.body["instance"] == instance)
        .map(|d| d.body["data"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_instances_start_stop_resume_within_retention_and_reset_after() {
    let bank = Bank::new(&["acc-1", "acc-2"]).with_token(TOKEN);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  tx:
    connector: bank-transactions
    with: {{ base_url: "http://{addr}", token: {TOKEN} }}
    for_each: discover
    discover_schedule: every 100ms
    # 6 s: acc-2 must come back within it even when a loaded machine
    # stalls the daemon for a few seconds (with 3 s it failed once under load 10).
    retention: 6s
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: {secret}, retry: {{ first: 50ms, max: 500ms }} }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[(
            "bank-transactions.yaml",
            repo_connector("bank-transactions.yaml"),
        )],
    );
    d.start().await;
    d.wait_polls(&["tx/acc-1", "tx/acc-2"], 1).await;
    let s = d.status().await;
    assert_eq!(s["discovery"]["tx"]["instances"], 2, "{s:#}");

    // A new account: polled from its own baseline, then its bookings arrive.
    bank.open_account("acc-3");
    d.wait_polls(&["tx/acc-3"], 1).await;
    let ids3 = bank.book("acc-3", &[-100, -200]);
    wait_for("acc-3's bookings", Duration::from_secs(20), || {
        tx_of(&rx, "acc-3").len() == 2
    })
    .await;
    assert_eq!(tx_of(&rx, "acc-3"), ids3);

    // acc-2 leaves the list: its instance stops, its state is kept.
    bank.close_account("acc-2");
    d.wait_status("acc-2 stopped, its state kept", |s| {
        s["instances"].get("tx/acc-2").is_none() && s["discovery"]["tx"]["removed"] == 1
    })
    .await;
    // Booked while nobody polls it; it comes back within the retention:
    // it resumes from its cursor, so these are new to it, not a baseline.
    let ids2 = bank.book("acc-2", &[-300, -400]);
    bank.open_account("acc-2");
    wait_for(
        "acc-2's bookings after it came back",
        Duration::from_secs(20),
        || tx_of(&rx, "acc-2").len() == 2,
    )
    .await;
    assert_eq!(tx_of(&rx, "acc-2"), ids2);

    // acc-1 leaves for longer than the retention: its state is removed, and
    // when it comes back it starts from a new baseline.
    bank.close_account("acc-1");
    d.wait_status("acc-1's state removed after the 6 s retention", |s| {
        s["instances"].get("tx/acc-1").is_none() && s["discovery"]["tx"]["removed"] == 0
    })
    .await;
    let before_baseline = bank.book("acc-1", &[-500]);
    bank.open_account("acc-1");
    d.wait_polls(&["tx/acc-1"], 1).await;
    let after = bank.book("acc-1", &[-600]);
    wait_for(
        "acc-1's booking after the new baseline",
        Duration::from_secs(20),
        || !tx_of(&rx, "acc-1").is_empty(),
    )
    .await;
    assert_eq!(
        tx_of(&rx, "acc-1"),
        after,
        "{before_baseline:?} is part of the new baseline"
    );
    assert!(rx.accepted().iter().all(|d| d.verified));
}
