//! The CLI's one-shot commands.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::*;

#[test]
fn secret_generate_prints_a_valid_whsec_secret() {
    let out = Command::new(bin())
        .args(["secret", "generate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    let s = s.trim();
    assert!(s.starts_with("whsec_"), "{s}");
    standardwebhooks::Webhook::new(s).expect("the reference library accepts it");
}

#[test]
fn verify_checks_the_reference_vector() {
    let run = |sig: &str| {
        let mut child = Command::new(bin())
            .args([
                "verify",
                "--secret",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "--id",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "--timestamp",
                "1614265330",
                "--signature",
                sig,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"test": 2432232314}"#)
            .unwrap();
        child.wait_with_output().unwrap().status.success()
    };
    assert!(run("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
    assert!(!run("v1,AAAA9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_polls_once_prints_events_and_touches_no_state() {
    let bank = Bank::new(&["acc-0001", "acc-0002"]).with_token("tok-123456");
    bank.book("acc-0002", &[1_00, 2_00]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = format!(
        r#"
state_dir: state
sources:
  transactions:
    connector: bank-transactions
    with: {{ base_url: "http://{addr}", token: tok-123456 }}
    for_each: {{ account: [acc-0001, acc-0002] }}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: "{secret}" }}
"#,
        secret = secret()
    );
    let d = Daemon::new(
        &bridge,
        &[(
            "bank-transactions.yaml",
            repo_connector("bank-transactions.yaml"),
        )],
    );
    let out = tokio::task::spawn_blocking(move || {
        let out = d
            .command(&["test", "transactions", "--instance", "acc-0002"])
            .output()
            .unwrap();
        assert!(
            !d.state_dir().exists(),
            "a dry run must not create the store"
        );
        out
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("== transactions/acc-0002"), "{stdout}");
    assert!(
        !stdout.contains("acc-0001"),
        "--instance picks one instance: {stdout}"
    );
    assert!(stdout.contains("GET http://"), "{stdout}");
    assert!(stdout.contains("2 event(s)"), "{stdout}");
    assert!(
        stdout.contains(r#""type":"bank.transaction.created""#),
        "{stdout}"
    );
    assert!(stdout.contains("webhook-id msg_"), "{stdout}");
    assert!(stdout.contains("cursor: (none) -> cur_"), "{stdout}");
    assert!(
        !stdout.contains("tok-123456"),
        "secrets are masked: {stdout}"
    );
}
