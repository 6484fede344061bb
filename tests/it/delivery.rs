//! Guarantee 2: at-least-once delivery with retries, then dead letters; and
//! isolation: a dead endpoint never delays another.

use std::collections::VecDeque;
use std::time::Duration;

use crate::support::*;

fn bridge(bank: &str, endpoints: &str, deliver_to: &str) -> String {
    balance_bridge(bank, "50ms", deliver_to, endpoints, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_then_200_is_retried_and_delivered_with_the_same_id() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Script(VecDeque::from([500, 503]))).await;
    let endpoints = format!(
        "  agent:\n    url: {}\n    secret: {}\n    retry: {{ max_attempts: 5, first: 50ms, max: 200ms }}\n    circuit: {{ probe_every: 100ms }}",
        rx.url,
        secret()
    );
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &endpoints, "[agent]"),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    bank.set_balance("acc-0001", 42_000);
    wait_for(
        "the third attempt to succeed",
        Duration::from_secs(20),
        || !rx.accepted().is_empty(),
    )
    .await;
    let all = rx.all();
    assert_eq!(
        all.iter().map(|e| e.answered).collect::<Vec<_>>(),
        [500, 503, 204]
    );
    assert!(
        all.iter().all(|e| e.verified && e.id == all[0].id),
        "same webhook-id and a valid signature on every attempt"
    );
    assert!(
        all.iter().all(|e| e.raw == all[0].raw),
        "the body is identical on every attempt"
    );
    let s = d.status().await;
    assert_eq!(s["endpoints"]["agent"]["delivered"], 1);
    assert_eq!(s["endpoints"]["agent"]["failed_attempts"], 2);
    assert_eq!(s["endpoints"]["agent"]["queue_depth"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_always_fails_dead_letters_and_never_delays_another() {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let dead = Receiver::start(&secret(), Plan::Always(500)).await;
    let live = Receiver::start(&secret(), Plan::Always(204)).await;
    let endpoints = format!(
        "  dead:\n    url: {}\n    secret: {s}\n    retry: {{ max_attempts: 3, first: 100ms, max: 100ms }}\n    circuit: {{ probe_every: 100ms }}\n  live:\n    url: {}\n    secret: {s}\n",
        dead.url,
        live.url,
        s = secret()
    );
    let mut d = Daemon::new(
        &bridge(&addr.to_string(), &endpoints, "[dead, live]"),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    for (i, cents) in [40_000, 30_000, 20_000].into_iter().enumerate() {
        bank.set_balance("acc-0001", cents);
        wait_for(
            "the healthy endpoint to get the change",
            Duration::from_secs(20),
            || live.accepted().len() > i,
        )
        .await;
    }
    // The dead endpoint: 3 attempts per event, then dead letters.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = d.status().await;
        if s["endpoints"]["dead"]["dead_letters"] == 3 {
            assert_eq!(s["endpoints"]["dead"]["queue_depth"], 0);
            assert_eq!(s["endpoints"]["live"]["dead_letters"], 0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never dead-lettered: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dead.all().len(), 9, "exactly max_attempts per event");
    assert_eq!(live.accepted().len(), 3);
    // Dead letters are kept across restarts.
    assert!(d.terminate().success());
    d.start().await;
    assert_eq!(d.status().await["endpoints"]["dead"]["dead_letters"], 3);
}
