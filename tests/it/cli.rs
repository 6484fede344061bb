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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_a_secret_param_is_sent_and_masked() {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("crm-user:pa55-w0rd-xyz")
    );
    let app = axum::Router::new().route(
        "/tickets",
        axum::routing::get(move |headers: HeaderMap| {
            let ok = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some(expected.as_str());
            async move {
                if ok {
                    axum::Json(
                        serde_json::json!({"tickets": [{"id": 7, "title": "printer on fire"}]}),
                    )
                    .into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }
        }),
    );
    let addr = serve(app).await;
    let connector = r#"
name: tickets
params:
  base_url: { required: true }
  user: { required: true }
  password: { required: true, secret: true }
request:
  url: "{{ base_url }}/tickets"
  query: { key: "{{ password }}" }   # some legacy APIs want it in the URL too
  auth: { type: basic, username: "{{ user }}", password: "{{ password }}" }
items: "$.tickets[*]"
id: "{{ item.id }}"
detect: new
emit: [{ type: ticket.created }]
"#;
    let run = move |password: &'static str| {
        let bridge = format!(
            "sources:\n  t:\n    connector: tickets\n    with: {{ base_url: \"http://{addr}\", user: crm-user, password: \"${{CRM_PASSWORD}}\" }}\n    schedule: every 1m\n    deliver_to: [a]\nendpoints:\n  a: {{ url: \"http://127.0.0.1:9/\", secret: \"{}\" }}\n",
            secret()
        );
        let d = Daemon::new(&bridge, &[("tickets.yaml", connector.to_string())]);
        let out = d
            .command(&["test", "t"])
            .env("CRM_PASSWORD", password)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = tokio::task::spawn_blocking(move || run("pa55-w0rd-xyz"))
        .await
        .unwrap();
    assert!(
        ok && out.contains("1 event(s)") && out.contains("printer on fire"),
        "{out}"
    );
    let (ok, out) = tokio::task::spawn_blocking(move || run("wrong-password"))
        .await
        .unwrap();
    assert!(!ok && out.contains("HTTP 401"), "{out}");
    assert!(
        !out.contains("wrong-password"),
        "the secret param is masked: {out}"
    );
}
