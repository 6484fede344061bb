//! The CLI's one-shot commands through the real binary: `secret
//! generate`, `verify`, `schema`, `pollhook test` (one poll, no state
//! touched; a connector file alone with `--with`; `--seed`; inline
//! connectors; masked credentials), and what operator commands read of
//! bridge.yaml (only the state dir and admin settings).

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
    let run = |sig: &str| verify(sig, br#"{"test": 2432232314}"#).0;
    assert!(run("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
    assert!(!run("v1,AAAA9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
}

/// The reference vector is from 2021: with the Standard Webhooks tolerance
/// (5 minutes, the default) it is a replay, and said to be one.
#[test]
fn verify_refuses_a_timestamp_outside_the_tolerance() {
    let (ok, out) = verify_with(
        &[],
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        br#"{"test": 2432232314}"#,
    );
    assert!(!ok);
    assert!(out.contains("more than the 300s tolerance"), "{out}");
}

/// An Ed25519 endpoint's receiver holds only the `whpk_` public key.
#[test]
fn verify_checks_v1a_with_a_public_key() {
    let out = Command::new(bin())
        .args(["secret", "generate", "--ed25519"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let key = |prefix: &str| {
        text.split_whitespace()
            .find(|w| w.starts_with(prefix))
            .unwrap()
            .to_string()
    };
    let (sk, pk) = (key("whsk_"), key("whpk_"));
    let now = chrono::Utc::now().timestamp();
    let sig = pollhook::deliver::sign::SigningKey::parse(&sk)
        .unwrap()
        .sign("msg_1", now, b"{}");
    let run = |body: &[u8]| {
        let mut child = Command::new(bin())
            .args(["verify", "--secret", &pk, "--id", "msg_1", "--timestamp"])
            .arg(now.to_string())
            .args(["--signature", &sig])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(body).unwrap();
        child.wait_with_output().unwrap().status.success()
    };
    assert!(run(b"{}"));
    assert!(!run(b"{ }"));
}

/// A body saved with a final newline (as `echo` and editors do) fails,
/// and the command says why.
#[test]
fn verify_explains_a_trailing_newline() {
    let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    let (ok, out) = verify(good, b"{\"test\": 2432232314}\n");
    assert!(!ok, "{out}");
    assert!(out.contains("does NOT match"), "{out}");
    assert!(out.contains("without its trailing newline"), "{out}");
    // A plain mismatch gets no such hint.
    let (ok, out) = verify(good, b"{\"test\": 1}\n");
    assert!(!ok);
    assert!(!out.contains("trailing newline"), "{out}");
}

/// Runs `pollhook verify` on the reference vector's key, id and time (a
/// tolerance wide enough for a vector of 2021).
fn verify(sig: &str, body: &[u8]) -> (bool, String) {
    verify_with(&["--tolerance", "100000d"], sig, body)
}

fn verify_with(extra: &[&str], sig: &str, body: &[u8]) -> (bool, String) {
    {
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
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(body).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
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
    // The dry run forces `baseline: emit`, and says so.
    assert!(stdout.contains("with `baseline: emit`"), "{stdout}");
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

fn run_blocking(mut c: Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_tries_a_connector_file_with_params_and_no_bridge() {
    let bank = Bank::new(&["acc-7"]).with_token("tok-abcdef");
    bank.book("acc-7", &[-12_34]);
    let addr = bank.serve("127.0.0.1:0").await;
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("connectors")
        .join("bank-transactions.yaml");
    let file = file.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(bin());
        // No bridge.yaml anywhere: the connector file is all there is.
        c.current_dir(dir.path()).arg("test").arg(&file).args(args);
        c
    };
    let base = format!("base_url=http://{addr}");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let c = cmd(&[
            "--with",
            &base,
            "--with",
            "account=acc-7",
            "--with",
            "token=tok-abcdef",
        ]);
        move || run_blocking(c)
    })
    .await
    .unwrap();
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("GET http://"), "{out}");
    assert!(out.contains("/accounts/acc-7/transactions"), "{out}");
    assert!(out.contains("1 event(s)"), "{out}");
    assert!(out.contains("\"amount\":-12.34"), "{out}");
    assert!(!out.contains("tok-abcdef"), "secret masked: {out}");

    // Without `account`, the connector's `discover` lists the accounts.
    let (ok, out, err) = tokio::task::spawn_blocking({
        let c = cmd(&["--with", &base, "--with", "token=tok-abcdef"]);
        move || run_blocking(c)
    })
    .await
    .unwrap();
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("1 instance(s) found") && out.contains("- acc-7 (account=acc-7)"),
        "{out}"
    );

    // Unknown and missing params name the connector file.
    let (ok, _, err) = tokio::task::spawn_blocking({
        let c = cmd(&["--with", &base, "--with", "acount=acc-7"]);
        move || run_blocking(c)
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("declares no param `acount`") && err.contains("bank-transactions.yaml"),
        "{err}"
    );
    let (ok, _, err) = tokio::task::spawn_blocking({
        let c = cmd(&["--with", "account=acc-7"]);
        move || run_blocking(c)
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("requires `base_url`") && err.contains("--with base_url="),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_seed_stores_a_baseline_the_daemon_resumes_from() {
    let bank = Bank::new(&["acc-1"]);
    let old = bank.book("acc-1", &[-1_00, -2_00]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    // `baseline: emit` in this copy of the connector: without the seed, the
    // daemon's first poll would send the two old transactions.
    let connector = repo_connector("bank-transactions.yaml")
        .replace("detect: new", "detect: new\nbaseline: emit");
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  tx:
    connector: bank-transactions
    with: {{ base_url: "http://{addr}", account: acc-1 }}
    schedule: every 50ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{url}", secret: "{secret}" }}
"#,
        url = rx.url,
        secret = secret()
    );
    let mut d = Daemon::new(&bridge, &[("bank-transactions.yaml", connector)]);
    let seed = |d: &Daemon| run_blocking(d.command(&["test", "tx", "--seed"]));
    let (ok, out, err) = tokio::task::block_in_place(|| seed(&d));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("seeded: cursor cur_"), "{out}");
    let (ok, out, _) = tokio::task::block_in_place(|| seed(&d));
    assert!(ok && out.contains("already has state"), "{out}");

    d.start().await;
    d.wait_polls(&["tx/default"], 2).await;
    let new = bank.book("acc-1", &[-3_00]);
    wait_for(
        "the new transaction",
        std::time::Duration::from_secs(20),
        || !rx.accepted().is_empty(),
    )
    .await;
    let polls = polls_of(&d.status().await, "tx/default");
    d.wait_polls(&["tx/default"], polls + 3).await;
    let got: Vec<String> = rx
        .accepted()
        .iter()
        .map(|x| x.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, new, "old ones {old:?} were seeded, not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_connector_needs_no_file_and_its_errors_point_into_the_bridge() {
    let app = axum::Router::new().route(
        "/status.json",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    );
    let up = serve(app).await;
    let bridge = |url: &str| {
        format!(
            r#"
sources:
  health:
    connector:
      request: {{ url: "{url}" }}
      detect: snapshot
      emit: [{{ type: health.changed }}]
    schedule: every 1m
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/", secret: "{secret}" }}
"#,
            secret = secret()
        )
    };
    let d = Daemon::new(&bridge(&format!("http://{up}/status.json")), &[]);
    let (ok, out, err) =
        tokio::task::block_in_place(|| run_blocking(d.command(&["test", "health"])));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("== health/default (connector health)"),
        "{out}"
    );
    assert!(out.contains("\"current\":{\"status\":\"ok\"}"), "{out}");

    let d = Daemon::new(&bridge("http://x/{{ nope }}"), &[]);
    let (ok, _, err) = tokio::task::block_in_place(|| run_blocking(d.command(&["validate"])));
    assert!(!ok);
    assert!(err.contains("bridge.yaml:5:"), "{err}");
    assert!(
        err.contains("sources.health.connector.request.url"),
        "{err}"
    );
    assert!(err.contains("unknown variable `nope`"), "{err}");
}

#[test]
fn schema_prints_json_schemas_of_both_files() {
    for (kind, title) in [("bridge", "bridge"), ("connector", "connector")] {
        let out = Command::new(bin()).args(["schema", kind]).output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["$schema"].as_str().unwrap().contains("json-schema.org"),
            "{kind}"
        );
        assert!(
            v["title"].as_str().unwrap().to_lowercase().contains(title),
            "{kind}: {}",
            v["title"]
        );
        assert_eq!(v["additionalProperties"], false, "{kind}: typos are errors");
    }
}

#[test]
fn secrets_with_url_special_characters_are_masked_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keyed.yaml");
    std::fs::write(
        &file,
        r#"
name: keyed
params: { base_url: { required: true }, key: { secret: true, required: true } }
request:
  url: "{{ base_url }}/x"
  auth: { type: api_key, in: query, name: api_key, value: "{{ key }}" }
detect: snapshot
emit: [{ type: x }]
"#,
    )
    .unwrap();
    // A port nobody listens on: the error names the URL, with the key in it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(bin())
        .current_dir(dir.path())
        .args(["test", file.to_str().unwrap()])
        .args(["--with", &format!("base_url=http://{closed}")])
        .args(["--with", "key=ab/c+d=e f&g"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("api_key=***"), "{text}");
    assert!(!text.contains("ab%2Fc") && !text.contains("ab/c"), "{text}");
}

/// Operator commands read only what they need of bridge.yaml: the state
/// directory and the admin token. A variable only the daemon's sources
/// use (the demo's `BANK_URL`) need not be set to list dead letters, read
/// the history, export a backup or enable an endpoint of a stopped daemon.
#[test]
fn operator_commands_need_only_the_state_dir_and_admin_settings() {
    let bridge = format!(
        r#"
state_dir: state
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "${{POLLHOOK_TEST_UNSET_BANK_URL}}", account: acc-1 }}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "${{POLLHOOK_TEST_UNSET_AGENT_URL}}", secret: "{}" }}
"#,
        secret()
    );
    let d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    // The daemon itself needs them, and says which.
    let out = d.command(&["validate"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("POLLHOOK_TEST_UNSET_BANK_URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        &["dlq", "list"][..],
        &["events"],
        &["state", "export"],
        &["endpoint", "enable", "agent"],
    ] {
        let out = d.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `status` needs a running daemon, and says so (not a missing variable).
    let out = d.command(&["status"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no running daemon"), "{err}");
    // An unknown endpoint is named.
    let out = d.command(&["endpoint", "enable", "nope"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no endpoint named `nope`"), "{err}");
}
