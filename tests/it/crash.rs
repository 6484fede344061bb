//! Guarantee 1: no detected change is lost, whatever instant the process
//! dies; and the delivery torture of issue 5: a few hundred changes, the
//! process SIGKILLed at random moments many times, the receiver failing a
//! third of the requests and down for a stretch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_duplicates_keep_their_id() {
    let accounts = ["acc-0001", "acc-0002", "acc-0003"];
    let bank = Bank::new(&accounts);
    let addr = bank.serve("127.0.0.1:0").await;
    // The receiver fails a third of the requests.
    let flaky = || Plan::Flaky {
        fail_per_mille: 333,
        rng: 0x2545F4914F6CDD1D,
    };
    let rx = Receiver::start(&secret(), flaky()).await;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  transactions:
    connector: bank-transactions
    with: {{ base_url: "http://{addr}" }}
    for_each: {{ account: [acc-0001, acc-0002, acc-0003] }}
    schedule: every 30ms
    deliver_to: [agent]
endpoints:
  agent:
    url: {url}
    secret: {secret}
    retry: {{ max_attempts: 1000, first: 10ms, max: 100ms }}
    circuit: {{ probe_every: 100ms }}
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
    d.wait_polls(
        &[
            "transactions/acc-0001",
            "transactions/acc-0002",
            "transactions/acc-0003",
        ],
        1,
    )
    .await;

    // Changes keep flowing while the process is killed again and again.
    let mut rng: u64 = 0x9E3779B97F4A7C15;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut booked: Vec<String> = Vec::new();
    for round in 0..12 {
        // Rounds 4 to 6: the receiver is down (503 to everything).
        match round {
            4 => rx.set_plan(Plan::Always(503)),
            7 => rx.set_plan(flaky()),
            _ => {}
        }
        for _ in 0..(15 + next(20)) {
            let acc = accounts[next(3) as usize];
            booked.extend(bank.book(acc, &[-(1 + next(5000) as i64)]));
        }
        // Let it run a random while (mid-poll, mid-delivery, mid-commit), then SIGKILL.
        tokio::time::sleep(Duration::from_millis(20 + next(400))).await;
        d.kill();
        booked.extend(bank.book(accounts[round % 3], &[-42]));
        d.start().await;
    }
    let total = booked.len();
    assert!(total >= 200, "a few hundred changes: {total}");
    wait_for(
        "every booked transaction to be delivered",
        Duration::from_secs(60),
        || {
            let got: HashSet<String> = rx
                .accepted()
                .iter()
                .map(|e| e.body["data"]["id"].as_str().unwrap().to_string())
                .collect();
            got.len() >= total
        },
    )
    .await;

    let all = rx.all();
    assert!(
        all.iter().all(|e| e.verified),
        "every request, retries included, is signed correctly"
    );
    let accepted = rx.accepted();
    let got: HashSet<&str> = accepted
        .iter()
        .map(|e| e.body["data"]["id"].as_str().unwrap())
        .collect();
    let want: HashSet<&str> = booked.iter().map(String::as_str).collect();
    assert_eq!(got, want, "every change arrived, and nothing else");

    // A duplicate always carries the id the change had before.
    let mut id_of: HashMap<&str, &str> = HashMap::new();
    for e in &all {
        let tx = e.body["data"]["id"].as_str().unwrap();
        let prev = id_of.insert(tx, e.id.as_str());
        assert!(
            prev.is_none_or(|p| p == e.id),
            "transaction {tx} arrived under two webhook-ids"
        );
    }
    // Per instance, first deliveries arrive in detection order.
    let mut first_seen = HashSet::new();
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    for e in &accepted {
        if !first_seen.insert(e.id.clone()) {
            continue;
        }
        let inst = e.body["instance"].as_str().unwrap().to_string();
        let seq = e.body["sequence"].as_u64().unwrap();
        let last = last_seq.entry(inst.clone()).or_default();
        assert!(seq > *last, "{inst}: sequence {seq} after {last}");
        *last = seq;
    }
    assert!(
        accepted.len() >= total && all.len() > accepted.len(),
        "the receiver did fail some requests"
    );
}
