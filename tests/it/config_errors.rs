//! Bad config gets a clear error naming file, line and field, and `validate`
//! exits non-zero; values substituted from the environment, files and
//! systemd credentials stay one value each and are never shown; admin
//! tokens must be given (`none` only as written).

use crate::support::*;

const GOOD_BRIDGE: &str = r#"state_dir: state
sources:
  balances:
    connector: bank-balance
    with: { base_url: "http://127.0.0.1:1", account: acc-0001 }
    schedule: every 30s
    deliver_to: [agent]
endpoints:
  agent:
    url: http://127.0.0.1:2/hook
    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
    timeout: 10s
"#;

/// Runs `pollhook validate` on a bridge (and the bank-balance connector,
/// possibly edited), returning (success, stderr).
fn validate(bridge: &str, connector: &str) -> (bool, String) {
    let d = Daemon::new(bridge, &[("bank-balance.yaml", connector.to_string())]);
    let out = d
        .command(&["validate"])
        .env_remove("NOPE_NOT_SET")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn expect_error(bridge: &str, connector: &str, wanted: &[&str]) {
    let (ok, err) = validate(bridge, connector);
    assert!(!ok, "validate accepted a bad config; wanted {wanted:?}");
    for w in wanted {
        assert!(err.contains(w), "error lacks `{w}`:\n{err}");
    }
}

#[test]
fn the_good_config_validates() {
    let (ok, err) = validate(GOOD_BRIDGE, &repo_connector("bank-balance.yaml"));
    assert!(ok, "{err}");
}

#[test]
fn each_kind_of_bad_config_names_file_line_and_field() {
    let conn = repo_connector("bank-balance.yaml");
    // Broken YAML.
    expect_error(
        &GOOD_BRIDGE.replace("deliver_to: [agent]", "deliver_to: [agent"),
        &conn,
        &["bridge.yaml:8:", "endpoints"],
    );
    // Unknown key (a typo).
    expect_error(
        &GOOD_BRIDGE.replace("    schedule:", "    schedual:"),
        &conn,
        &["bridge.yaml:6:5", "unknown field `schedual`", "schedule"],
    );
    // Missing environment variable.
    expect_error(
        &GOOD_BRIDGE.replace("http://127.0.0.1:2/hook", "${NOPE_NOT_SET}"),
        &conn,
        &[
            "bridge.yaml:10:",
            "endpoints.agent.url",
            "`NOPE_NOT_SET` is not set",
        ],
    );
    // Bad duration.
    expect_error(
        &GOOD_BRIDGE.replace("timeout: 10s", "timeout: 10 parsecs"),
        &conn,
        &[
            "bridge.yaml:12:",
            "endpoints.agent.timeout",
            "expected a duration",
        ],
    );
    // Bad cron.
    expect_error(
        &GOOD_BRIDGE.replace("every 30s", "\"61 * * * *\""),
        &conn,
        &[
            "bridge.yaml:6:",
            "sources.balances.schedule",
            "invalid cron",
        ],
    );
    // Unknown endpoint in deliver_to.
    expect_error(
        &GOOD_BRIDGE.replace("[agent]", "[agnet]"),
        &conn,
        &[
            "bridge.yaml:7:",
            "sources.balances.deliver_to",
            "no endpoint named `agnet`",
            "agent",
        ],
    );
    // Unknown connector param.
    expect_error(
        &GOOD_BRIDGE.replace("account: acc-0001", "acount: acc-0001"),
        &conn,
        &[
            "bridge.yaml:5:",
            "declares no param `acount`",
            "bank-balance.yaml",
        ],
    );
    // Missing required param: names both files.
    expect_error(
        &GOOD_BRIDGE.replace(", account: acc-0001", ""),
        &conn,
        &[
            "bridge.yaml:4:",
            "requires param `account`",
            "bank-balance.yaml:7",
        ],
    );
    // A bad secret is refused without being printed.
    expect_error(
        &GOOD_BRIDGE.replace("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "hunter2-secret"),
        &conn,
        &["bridge.yaml:11:", "endpoints.agent.secret", "whsec_"],
    );
    // A secret from the environment never appears in the error.
    let d = Daemon::new(
        &GOOD_BRIDGE.replace("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "${AGENT_SECRET}"),
        &[("bank-balance.yaml", conn)],
    );
    let out = d
        .command(&["validate"])
        .env("AGENT_SECRET", "hunter2-secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("endpoints.agent.secret"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the secret leaked into the error:\n{err}"
    );
}

#[test]
fn connector_errors_name_the_connector_file() {
    let bridge = GOOD_BRIDGE;
    let conn = repo_connector("bank-balance.yaml");
    // Bad JSONPath.
    let bad = conn.replace(
        "detect: snapshot",
        "detect: new\nitems: \"$.[\"\nid: \"{{ item.id }}\"",
    );
    expect_error(
        bridge,
        &bad,
        &["bank-balance.yaml:", "items", "invalid JSONPath"],
    );
    // A typo in a template variable.
    let bad = conn.replace("{{ account }}/balance", "{{ acount }}/balance");
    expect_error(
        bridge,
        &bad,
        &[
            "bank-balance.yaml:",
            "request.url",
            "unknown variable `acount`",
        ],
    );
    // Bad condition syntax.
    let bad = conn.replace(
        "current.available != previous.available",
        "current.available !=",
    );
    expect_error(
        bridge,
        &bad,
        &["bank-balance.yaml:", "when", "invalid condition"],
    );
    // Unknown key in a connector.
    let bad = conn.replace("detect: snapshot", "detect: snapshot\nemitt: []");
    expect_error(
        bridge,
        &bad,
        &["bank-balance.yaml:", "unknown field `emitt`"],
    );
}

#[test]
fn connector_language_errors_name_file_line_field_and_expectation() {
    let conn = repo_connector("bank-balance.yaml");
    let with_request_extra =
        |extra: &str| conn.replace("request:\n", &format!("request:\n{extra}"));
    // Two paging styles at once.
    expect_error(
        GOOD_BRIDGE,
        &format!("{conn}paginate: {{ link_header: true, next_url: $.next }}\n"),
        &[
            "bank-balance.yaml:",
            "field `paginate`",
            "exactly one paging style",
        ],
    );
    // A raw body and a JSON body.
    expect_error(
        GOOD_BRIDGE,
        &with_request_extra("  body: \"{}\"\n  json: { a: 1 }\n"),
        &[
            "bank-balance.yaml:",
            "field `request`",
            "at most one of `body`",
        ],
    );
    // An auth type that does not exist.
    expect_error(
        GOOD_BRIDGE,
        &with_request_extra("  auth: { type: kerberos }\n"),
        &["bank-balance.yaml:", "kerberos"],
    );
    // `columnar` belongs to lists; with it, `items` names the columns'
    // object, not their entries.
    expect_error(
        GOOD_BRIDGE,
        &format!("{conn}columnar: true\n"),
        &["bank-balance.yaml:", "field `detect`", "`columnar`"],
    );
    expect_error(
        GOOD_BRIDGE,
        &conn.replace(
            "detect: snapshot",
            "detect: new\nitems: \"$.rows.id[*]\"\nid: \"{{ item.id }}\"\ncolumnar: true",
        ),
        &[
            "bank-balance.yaml:21:",
            "field `columnar`",
            "drop the final `[*]`",
        ],
    );
    // An unknown variable in an emit `data` template.
    expect_error(
        GOOD_BRIDGE,
        &conn.replace(
            "  - type: bank.balance.changed\n",
            "  - type: bank.balance.changed\n    data: { x: \"{{ currnt.available }}\" }\n",
        ),
        &[
            "bank-balance.yaml:",
            "emit[0].data",
            "unknown variable `currnt`",
        ],
    );
    // `for_each: discover` on a connector that cannot discover.
    expect_error(
        &GOOD_BRIDGE.replace(
            "    schedule: every 30s\n",
            "    schedule: every 30s\n    for_each: discover\n",
        ),
        &conn,
        &[
            "bridge.yaml:",
            "sources.balances.for_each",
            "no `discover:` block",
        ],
    );
    // `for_each: everything`.
    expect_error(
        &GOOD_BRIDGE.replace(
            "    schedule: every 30s\n",
            "    schedule: every 30s\n    for_each: everything\n",
        ),
        &conn,
        &["bridge.yaml:", "expected `discover` or a map"],
    );
    // A secret file that does not exist: named, line given.
    expect_error(
        &GOOD_BRIDGE.replace(
            "secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "secret: ${file:/nonexistent/agent_secret}",
        ),
        &conn,
        &[
            "bridge.yaml:11:13",
            "endpoints.agent.secret",
            "cannot read secret file /nonexistent/agent_secret",
        ],
    );
    // An unknown time zone.
    expect_error(
        &GOOD_BRIDGE.replace(
            "schedule: every 30s",
            "schedule: { cron: \"0 9 * * *\", tz: Mars/Olympus }",
        ),
        &conn,
        &["bridge.yaml:", "Mars/Olympus"],
    );
}

#[test]
fn secrets_can_come_from_systemd_credentials() {
    let d = Daemon::new(
        &GOOD_BRIDGE.replace(
            "secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "secret: ${credential:agent_secret}",
        ),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    let creds = d.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(
        creds.join("agent_secret"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    )
    .unwrap();
    let out = d
        .command(&["validate"])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d
        .command(&["validate"])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("CREDENTIALS_DIRECTORY is not set"),
        "{err}"
    );
}

#[test]
fn a_bad_api_key_header_name_points_at_the_api_key_name() {
    // The connector's own `name:` is line 3; the api_key's `name:` is the
    // one to fix (line 16 in block style, the `auth:` line in flow style).
    let conn = repo_connector("bank-balance.yaml");
    let block = conn.replace(
        "  auth: { type: bearer, token: \"{{ token }}\" }\n",
        "  auth:\n    type: api_key\n    name: X Bad Header\n    value: \"{{ token }}\"\n",
    );
    let line = block
        .lines()
        .position(|l| l.contains("X Bad Header"))
        .unwrap()
        + 1;
    expect_error(
        GOOD_BRIDGE,
        &block,
        &[
            &format!("bank-balance.yaml:{line}:"),
            "field `request.auth.name`",
            "`X Bad Header` is not a valid header name",
        ],
    );
    let flow = conn.replace(
        "  auth: { type: bearer, token: \"{{ token }}\" }\n",
        "  auth: { type: api_key, name: \"X Bad\", value: \"{{ token }}\" }\n",
    );
    let line = flow.lines().position(|l| l.contains("X Bad")).unwrap() + 1;
    expect_error(
        GOOD_BRIDGE,
        &flow,
        &[
            &format!("bank-balance.yaml:{line}:"),
            "field `request.auth.name`",
        ],
    );
}

#[test]
fn errors_inside_flow_maps_name_only_the_enclosing_keys() {
    let conn = repo_connector("bank-balance.yaml");
    expect_error(
        &format!("{GOOD_BRIDGE}hosts: {{ 127.0.0.1: {{ rate: 10/s, burst: x }} }}\n"),
        &conn,
        &["bridge.yaml:13:", "field `hosts.127.0.0.1.burst`"],
    );
    expect_error(
        &GOOD_BRIDGE.replace(
            "    timeout: 10s\n",
            "    timeout: 10s\n    retry: { max_attempts: 3, backoff: exponential, first: 1s, max: bad }\n",
        ),
        &conn,
        &["bridge.yaml:13:", "field `endpoints.agent.retry.max`"],
    );
}

#[test]
fn zero_and_absurd_timeouts_are_refused_with_the_accepted_range() {
    let conn = repo_connector("bank-balance.yaml");
    for bad in ["0s", "0", "10 years"] {
        expect_error(
            &GOOD_BRIDGE.replace("timeout: 10s", &format!("timeout: {bad}")),
            &conn,
            &[
                "bridge.yaml:12:",
                "field `endpoints.agent.timeout`",
                "more than 0 and at most 1h",
            ],
        );
        let line = conn.lines().position(|l| l == "  timeout: 10s").unwrap() + 1;
        expect_error(
            GOOD_BRIDGE,
            &conn.replace("  timeout: 10s", &format!("  timeout: {bad}")),
            &[
                &format!("bank-balance.yaml:{line}:"),
                "field `request.timeout`",
                "more than 0 and at most 1h",
            ],
        );
    }
    // Zero where it would spin: retry and circuit delays, the seen-id age.
    expect_error(
        &GOOD_BRIDGE.replace(
            "    timeout: 10s\n",
            "    timeout: 10s\n    circuit: { probe_every: 0s }\n",
        ),
        &conn,
        &[
            "bridge.yaml:13:",
            "field `endpoints.agent.circuit.probe_every`",
            "more than 0",
        ],
    );
    expect_error(
        &GOOD_BRIDGE.replace(
            "    timeout: 10s\n",
            "    timeout: 10s\n    retry: { first: 0s }\n",
        ),
        &conn,
        &[
            "bridge.yaml:13:",
            "field `endpoints.agent.retry.first`",
            "more than 0",
        ],
    );
}

/// Runs `pollhook validate` on `bridge` with `env` set, returning
/// (success, stderr).
fn validate_with_env(bridge: &str, env: &[(&str, &str)]) -> (bool, String) {
    let d = Daemon::new(
        bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    let mut c = d.command(&["validate"]);
    c.env_remove("ADMIN_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A `${VAR}` value is one scalar whatever it holds: a value that closes
/// the quotes and writes more keys writes nothing but characters of the
/// value. Here it tries to turn the SSRF guard off for a private address.
#[test]
fn a_substituted_value_cannot_inject_keys() {
    let flow = |url: &str| {
        GOOD_BRIDGE.replace(
            "  agent:\n    url: http://127.0.0.1:2/hook\n    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n    timeout: 10s\n",
            &format!("  agent: {{ url: {url}, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }}\n"),
        )
    };
    for (context, value) in [
        (
            "\"${AGENT_URL}\"",
            "https://10.0.0.1/\", allow_private: true, hub_secret: \"x",
        ),
        (
            "'${AGENT_URL}'",
            "https://10.0.0.1/', allow_private: true, hub_secret: 'x",
        ),
        ("${AGENT_URL}", "https://10.0.0.1/, allow_private: true"),
        ("${AGENT_URL}", "https://10.0.0.1/\n    allow_private: true"),
    ] {
        let bridge = flow(context);
        assert!(bridge.contains(context), "{bridge}");
        let (ok, err) = validate_with_env(&bridge, &[("AGENT_URL", value)]);
        assert!(
            !ok,
            "{context}: the injected `allow_private: true` was obeyed"
        );
        assert!(
            err.contains("bridge.yaml:9:") && err.contains("private or link-local"),
            "{context}: {err}"
        );
    }
}

/// A secret file holding YAML's special characters (a backslash, quotes,
/// `#`, `: `) is read as it is, in quotes or not.
#[test]
fn a_secret_file_with_special_characters_is_one_value() {
    for context in [
        "\"${file:{dir}/acc}\"",
        "${file:{dir}/acc}",
        "'${file:{dir}/acc}'",
    ] {
        let d = Daemon::new(
            &GOOD_BRIDGE.replace("account: acc-0001", &format!("account: {context}")),
            &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
        );
        let dir = d.dir.path().display().to_string();
        std::fs::write(d.dir.path().join("acc"), "a\\b\"c' #d: {e}, *f\n").unwrap();
        let bridge = std::fs::read_to_string(d.config()).unwrap();
        std::fs::write(d.config(), bridge.replace("{dir}", &dir)).unwrap();
        let out = d.command(&["validate"]).output().unwrap();
        assert!(
            out.status.success(),
            "{context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An admin token that came out empty (an unset `${ADMIN_TOKEN:-}`) is an
/// error, not authentication turned off; `token: none` says it on purpose.
#[test]
fn an_empty_admin_token_is_refused_and_none_is_explicit() {
    let with_admin = |admin: &str| GOOD_BRIDGE.replace("sources:", &format!("{admin}\nsources:"));
    for admin in [
        "admin: { listen: \"127.0.0.1:0\", token: \"${ADMIN_TOKEN:-}\" }",
        "admin:\n  listen: 127.0.0.1:0\n  token: ${ADMIN_TOKEN:-}",
        "admin:\n  listen: 127.0.0.1:0\n  token:",
    ] {
        let (ok, err) = validate_with_env(&with_admin(admin), &[]);
        assert!(!ok, "{admin}: an empty token was accepted");
        assert!(
            err.contains("bridge.yaml:2:") || err.contains("bridge.yaml:4:"),
            "{admin}: {err}"
        );
        assert!(
            err.contains("field `admin.token`") && err.contains("token: none"),
            "{admin}: {err}"
        );
    }
    for admin in [
        "admin: { listen: \"127.0.0.1:0\", token: none }",
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", token: \"${ADMIN_TOKEN}\" }",
    ] {
        let (ok, err) = validate_with_env(&with_admin(admin), &[("ADMIN_TOKEN", "t0ken")]);
        assert!(ok, "{admin}: {err}");
    }
}

/// An admin server reachable from other hosts needs a token, or an explicit
/// `token: none`.
#[test]
fn a_non_loopback_admin_listen_needs_a_token() {
    let with_admin = |admin: &str| GOOD_BRIDGE.replace("sources:", &format!("{admin}\nsources:"));
    for listen in ["0.0.0.0:9464", "192.168.1.5:9464", "[::]:9464"] {
        let (ok, err) = validate_with_env(
            &with_admin(&format!("admin: {{ listen: \"{listen}\" }}")),
            &[],
        );
        assert!(!ok, "{listen} without a token was accepted");
        assert!(
            err.contains("bridge.yaml:2:")
                && err.contains("field `admin.listen`")
                && err.contains("not a loopback address")
                && err.contains("token: none"),
            "{listen}: {err}"
        );
        for token in ["t0ken", "none"] {
            let (ok, err) = validate_with_env(
                &with_admin(&format!(
                    "admin: {{ listen: \"{listen}\", token: {token} }}"
                )),
                &[],
            );
            assert!(ok, "{listen} with token {token}: {err}");
        }
    }
    for listen in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:1"] {
        let (ok, err) = validate_with_env(
            &with_admin(&format!("admin: {{ listen: \"{listen}\" }}")),
            &[],
        );
        assert!(ok, "{listen}: {err}");
    }
}

/// A bearer token a source gives that comes out empty (`${BANK_TOKEN}`
/// set to nothing) is an error naming the file, the line of the value and
/// the field, never a poll without `Authorization`; leaving the param out
/// keeps the connector's "empty for none", as does `${BANK_TOKEN:-}` (an
/// empty default, written on purpose), and a real value validates.
#[test]
fn an_empty_bearer_token_is_refused_where_it_is_given() {
    let with_token = |token: &str| {
        GOOD_BRIDGE.replace(
            "with: { base_url: \"http://127.0.0.1:1\", account: acc-0001 }",
            &format!(
                "with:\n      base_url: \"http://127.0.0.1:1\"\n      account: acc-0001\n      token: {token}"
            ),
        )
    };
    for token in ["\"${BANK_TOKEN}\"", "${BANK_TOKEN}", "\"\""] {
        let (ok, err) = validate_with_env(&with_token(token), &[("BANK_TOKEN", "")]);
        assert!(!ok, "{token}: an empty bearer token was accepted");
        assert!(err.contains("bridge.yaml:8:"), "{token}: {err}");
        assert!(
            err.contains("sources.balances.with.token")
                && err.contains("no `Authorization: Bearer` token")
                && err.contains("leave `token` out"),
            "{token}: {err}"
        );
    }
    let (ok, err) = validate_with_env(&with_token("\"${BANK_TOKEN}\""), &[("BANK_TOKEN", "t0ken")]);
    assert!(ok, "{err}");
    let (ok, err) = validate_with_env(GOOD_BRIDGE, &[]);
    assert!(ok, "{err}");
    // An empty default says "none unless set" on purpose, as the bank
    // example's bridge.yaml does.
    for set in [&[][..], &[("BANK_TOKEN", "")][..]] {
        let (ok, err) = validate_with_env(&with_token("\"${BANK_TOKEN:-}\""), set);
        assert!(ok, "{set:?}: {err}");
    }
}
