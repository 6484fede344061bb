//! The bank example end to end: the repository's connectors against the
//! mock bank, through the real binary, to a verifying receiver.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

fn bridge(bank: &str, receiver: &str, sources: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
connectors: [connectors/*.yaml]
sources:
{sources}
endpoints:
  agent:
    url: {receiver}
    secret: {secret}
    retry: {{ max_attempts: 10, first: 50ms, max: 500ms }}
hosts:
  127.0.0.1: {{ rate: 200/s, burst: 20 }}
"#,
        secret = secret()
    )
    .replace("BANK", bank)
}

const TOKEN: &str = "s3cr3t-bank-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_changes_reach_the_agent_and_thresholds_fire_only_on_crossings() {
    let bank = Bank::new(&["acc-0001", "acc-0002"]).with_token(TOKEN);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let sources = format!(
        r#"  balances:
    connector: bank-balance
    with: {{ base_url: "http://BANK", token: "{TOKEN}", low_threshold: "100" }}
    for_each: {{ account: [acc-0001, acc-0002] }}
    schedule: every 50ms
    deliver_to: [agent]"#
    );
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &rx.url, &sources),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/acc-0001", "balances/acc-0002"], 1)
        .await;

    // Each step waits for its event before the next change: polling cannot
    // see a value that lasted less than one interval, and that is not the
    // point of this test.
    let steps: [(i64, bool); 5] = [
        (45_000, false),
        (9_000, true),
        (8_000, false),
        (15_000, false),
        (5_000, true),
    ];
    for (i, (cents, _)) in steps.iter().enumerate() {
        bank.set_balance("acc-0001", *cents);
        wait_for(
            &format!("change #{} to reach the agent", i + 1),
            Duration::from_secs(20),
            || rx.accepted_of("bank.balance.changed").len() > i,
        )
        .await;
    }
    // A few more polls: nothing else may arrive.
    let before = polls_of(&d.status().await, "balances/acc-0001");
    d.wait_polls(&["balances/acc-0001"], before + 5).await;

    let changed = rx.accepted_of("bank.balance.changed");
    let currents: Vec<f64> = changed
        .iter()
        .map(|e| e.body["data"]["current"]["available"].as_f64().unwrap())
        .collect();
    assert_eq!(currents, [450.0, 90.0, 80.0, 150.0, 50.0]);
    let low = rx.accepted_of("bank.balance.low");
    let lows: Vec<f64> = low
        .iter()
        .map(|e| e.body["data"]["current"]["available"].as_f64().unwrap())
        .collect();
    assert_eq!(lows, [90.0, 50.0], "low fires only when crossing below 100");
    assert_eq!(low[0].body["data"]["previous"]["available"], 450.0);

    let all = rx.accepted();
    assert!(
        all.iter().all(|e| e.verified),
        "every signature verifies with the reference library"
    );
    assert!(all
        .iter()
        .all(|e| e.body["instance"] == "acc-0001" && e.body["source"] == "balances"));
    let seqs: Vec<u64> = all
        .iter()
        .map(|e| e.body["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=7).collect::<Vec<_>>(),
        "sequence counts per instance, in order"
    );
    let ids: HashSet<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 7);
    assert!(all[0].body["timestamp"].as_str().unwrap().ends_with('Z'));

    // The bank offers ETags: unchanged balances were answered with 304.
    let s = d.status().await;
    assert!(
        s["instances"]["balances/acc-0002"]["polls_not_modified"]
            .as_u64()
            .unwrap()
            > 0,
        "{s:#}"
    );
    assert!(!d.log().contains(TOKEN), "the token must never be logged");
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_transactions_across_pages_once_each_and_a_restart_resumes_from_the_cursor() {
    let bank = Bank::new(&["acc-0001"]);
    bank.book("acc-0001", &[100, 200, 300, 400, 500]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(200)).await;
    let sources = r#"  transactions:
    connector: bank-transactions
    with: { base_url: "http://BANK", account: acc-0001 }
    schedule: every 50ms
    deliver_to: [agent]"#;
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &rx.url, sources),
        &[(
            "bank-transactions.yaml",
            repo_connector("bank-transactions.yaml"),
        )],
    );
    d.start().await;
    d.wait_polls(&["transactions/default"], 1).await;

    // 250 new transactions: 3 pages of the connector's limit of 100.
    let booked = bank.book("acc-0001", &vec![-1_00; 250]);
    wait_for(
        "250 transactions to arrive",
        Duration::from_secs(30),
        || rx.accepted().len() >= 250,
    )
    .await;
    let polls = polls_of(&d.status().await, "transactions/default");
    d.wait_polls(&["transactions/default"], polls + 5).await;
    let got: Vec<String> = rx
        .accepted()
        .iter()
        .map(|e| e.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, booked,
        "each new transaction once, in booking order; the 5 of the baseline not at all"
    );
    let seqs: Vec<u64> = rx
        .accepted()
        .iter()
        .map(|e| e.body["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=250).collect::<Vec<_>>());
    let paged = bank
        .requests()
        .iter()
        .filter(|r| r.contains("since=cur_"))
        .count();
    assert!(paged >= 3, "pages were followed with the opaque cursor");

    let cursor = d.status().await["instances"]["transactions/default"]["cursor"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cursor.starts_with("cur_"),
        "cursor advanced to the last page's next_cursor"
    );
    assert!(d.terminate().success(), "SIGTERM drains and exits 0");

    // While stopped, 30 more; after the restart, exactly those.
    let more = bank.book("acc-0001", &vec![5_00; 30]);
    let seen_before = bank.requests().len();
    d.start().await;
    wait_for(
        "30 more transactions after restart",
        Duration::from_secs(30),
        || rx.accepted().len() >= 280,
    )
    .await;
    let first_after = bank.requests()[seen_before].clone();
    assert!(
        first_after.contains(&format!("since={cursor}")),
        "resumed from the stored cursor: {first_after}"
    );
    let polls = polls_of(&d.status().await, "transactions/default");
    d.wait_polls(&["transactions/default"], polls + 5).await;
    let got: Vec<String> = rx.accepted()[250..]
        .iter()
        .map(|e| e.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, more);
    assert_eq!(rx.accepted().len(), 280, "nothing twice");
    assert_eq!(
        rx.accepted()[250].body["sequence"],
        251,
        "sequence survives restarts"
    );
}
