//! Secrets learned at run time, and bounds on what upstreams and configs
//! control (issue 19, items 3 and 4): credentials masked whatever their
//! param says, tokens an upstream echoes masked in every encoding, config
//! errors that name references and not values, capped token bodies,
//! template operators and paging, and the SSRF guard's registry table.

use crate::support::*;

/// `pollhook validate` on a bridge whose one endpoint is at `url`.
fn validate_endpoint(url: &str) -> (bool, String) {
    let bridge = format!(
        "sources: {{}}\nendpoints:\n  agent:\n    url: {url}\n    secret: {}\n",
        secret()
    );
    let d = Daemon::new(&bridge, &[]);
    let out = d.command(&["validate"]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_ssrf_guard_refuses_every_special_purpose_block_iana_does_not_call_reachable() {
    for url in [
        "https://[2001:2::1]/hook",    // benchmarking
        "https://[2001:20::1]/hook",   // ORCHIDv2
        "https://[3fff::1]/hook",      // documentation (RFC 9637)
        "https://[5f00::1]/hook",      // SRv6 SIDs
        "https://[100:0:0:1::1]/hook", // dummy IPv6 prefix
        "https://192.0.0.170/hook",    // NAT64/DNS64 discovery
        "https://[::ffff:192.0.0.8]/hook",
    ] {
        let (ok, err) = validate_endpoint(url);
        assert!(!ok && err.contains("SSRF"), "{url}: {err}");
    }
    // Reachable blocks inside refused ones stay allowed.
    for url in [
        "https://[2001:3::1]/hook", // AMT
        "https://[2001:1::1]/hook", // PCP anycast
        "https://192.0.0.9/hook",   // PCP anycast
        "https://[2606:4700::1]/hook",
    ] {
        let (ok, err) = validate_endpoint(url);
        assert!(ok, "{url}: {err}");
    }
}

/// A bridge with one source, `s`, on the connector file `c.yaml`, with
/// `with` (a YAML flow map) and `extra` top-level keys.
fn one_source_bridge(with: &str, every: &str, extra: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{extra}
sources:
  s:
    connector: c
    with: {with}
    schedule: every {every}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        secret()
    )
}

#[test]
fn validate_refuses_an_absurd_max_pages() {
    let connector = |max: &str| {
        format!(
            r#"
name: c
request: {{ url: "http://127.0.0.1:9/items" }}
paginate:
  next_url: $.next
  max_pages: {max}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
        )
    };
    let run = |max: &str| {
        let d = Daemon::new(
            &one_source_bridge("{}", "1m", ""),
            &[("c.yaml", connector(max))],
        );
        let out = d.command(&["validate"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run("1000000");
    assert!(
        !ok && err.contains("paginate.max_pages") && err.contains("1000"),
        "{err}"
    );
    assert!(err.contains("c.yaml:6"), "names the line: {err}");
    let (ok, err) = run("1000");
    assert!(ok, "{err}");
}

/// Output captured by `{% set %}…{% endset %}`, `{% filter %}`, macros or
/// `{% call %}` is rendered into minijinja's own buffer, beyond the output
/// cap: a loop inside one built gigabytes. `validate` refuses them, naming
/// the file, line and field; an inline `{% set x = … %}` is still fine.
#[test]
fn validate_refuses_templates_that_capture_output_beyond_the_cap() {
    let connector = |body: &str| {
        format!(
            r#"
name: c
request:
  url: "http://127.0.0.1:9/items"
  headers: {{ X-Big: "{body}" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
        )
    };
    let run = |body: &str| {
        let d = Daemon::new(
            &one_source_bridge("{}", "1m", ""),
            &[("c.yaml", connector(body))],
        );
        let out = d.command(&["validate"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for body in [
        "{% set s %}{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}{% endset %}{{ s | length }}",
        "{% filter upper %}{% for i in range(1000) %}x{% endfor %}{% endfilter %}",
        "{% macro f() %}{% for i in range(1000) %}x{% endfor %}{% endmacro %}{{ f() }}",
    ] {
        let (ok, err) = run(body);
        assert!(!ok, "{body}: accepted");
        assert!(
            err.contains("template limit") && err.contains("c.yaml:5") && err.contains("X-Big"),
            "{body}: {err}"
        );
    }
    let (ok, err) = run("{% set s = 'ab' %}{{ s }}");
    assert!(ok, "{err}");
}

/// An access token only the token endpoint knows: pollhook learns it at
/// run time.
const TOKEN: &str = "at-Qm7Zk2Wp9Lx4Rv";
/// The client secret, given through a param *not* marked `secret`.
const CLIENT_SECRET: &str = "cs-Pl4inParam9Tx";
/// A wrong client secret, which the token endpoint echoes.
const WRONG_SECRET: &str = "cs-Wr0ngSecret5Q";
/// A basic-auth password, through a param not marked `secret`.
const PASSWORD: &str = "pw-Vb8Nc3Jd6Hy";

/// The spellings an echoing upstream uses, by name.
const ENCODINGS: &[&str] = &["raw", "html", "htmlhex", "url3", "hex", "upper", "json"];

fn encode(how: &str, s: &str) -> String {
    match how {
        "raw" => s.to_string(),
        "html" => s.chars().map(|c| format!("&#{};", c as u32)).collect(),
        "htmlhex" => s.chars().map(|c| format!("&#x{:X};", c as u32)).collect(),
        "url3" => s.bytes().map(|b| format!("%2525{b:02X}")).collect(),
        "hex" => s.bytes().map(|b| format!("{b:02x}")).collect(),
        "upper" => s.to_uppercase(),
        "json" => s.chars().map(|c| format!("\\u{:04x}", c as u32)).collect(),
        _ => unreachable!(),
    }
}

/// Fails when `text` holds any secret of this test in any spelling.
fn assert_no_secret(what: &str, text: &str) {
    let lower = text.to_lowercase();
    for s in [TOKEN, CLIENT_SECRET, WRONG_SECRET, PASSWORD] {
        for how in ENCODINGS {
            let e = encode(how, s).to_lowercase();
            assert!(!lower.contains(&e), "{what} shows {s} ({how}):\n{text}");
        }
    }
}

/// A token endpoint and an API that echo what they were sent: the token
/// endpoint answers a wrong client secret with it in its error; the API
/// answers the right token with 403 and the token in the spelling its
/// path names, and basic auth with 401 and the password HTML-escaped.
async fn echoing_upstream() -> std::net::SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/token",
            post(|body: String| async move {
                let form: std::collections::HashMap<String, String> =
                    url::form_urlencoded::parse(body.as_bytes())
                        .into_owned()
                        .collect();
                let given = form.get("client_secret").cloned().unwrap_or_default();
                if given != CLIENT_SECRET {
                    return (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({
                            "error": "invalid_client",
                            "error_description": format!("client secret {given} (or {}) is wrong", encode("upper", &given)),
                        })),
                    )
                        .into_response();
                }
                axum::Json(serde_json::json!({
                    "access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600
                }))
                .into_response()
            }),
        )
        .route(
            "/items/{how}",
            get(
                |axum::extract::Path(how): axum::extract::Path<String>, h: HeaderMap| async move {
                    let auth = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if auth != format!("Bearer {TOKEN}") {
                        return StatusCode::UNAUTHORIZED.into_response();
                    }
                    (
                        StatusCode::FORBIDDEN,
                        format!("token {} lacks scope", encode(&how, TOKEN)),
                    )
                        .into_response()
                },
            ),
        )
        .route(
            "/basic",
            get(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "<p>user me, password {} refused</p>",
                        encode("html", PASSWORD)
                    ),
                )
            }),
        );
    serve(app).await
}

/// Credentials masked whatever their param says, tokens learned at run
/// time masked from the moment they are issued, in every spelling an
/// upstream echoes them: not in `/status`, the dashboard, the log, nor
/// `pollhook test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_credentials_and_learned_tokens_are_masked_in_every_spelling() {
    let addr = echoing_upstream().await;
    let oauth = format!(
        r#"
name: api
params:
  how: {{ required: true }}
  client_secret: {{ required: true }}
request:
  url: "http://{addr}/items/{{{{ how }}}}"
  auth:
    type: oauth2
    token_url: "http://{addr}/token"
    client_id: app
    client_secret: "{{{{ client_secret }}}}"
    client_auth: body
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
    );
    let basic = format!(
        r#"
name: basic
params:
  password: {{ required: true }}
request:
  url: "http://{addr}/basic"
  auth: {{ type: basic, username: me, password: "{{{{ password }}}}" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
    );
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  echo:
    connector: api
    with: {{ client_secret: {CLIENT_SECRET} }}
    for_each: {{ how: [{}] }}
    schedule: every 1h
    deliver_to: [agent]
  wrong:
    connector: api
    with: {{ client_secret: {WRONG_SECRET}, how: raw }}
    schedule: every 1h
    deliver_to: [agent]
  basic:
    connector: basic
    with: {{ password: {PASSWORD} }}
    schedule: every 1h
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        ENCODINGS.join(", "),
        secret()
    );
    let mut d = Daemon::new(&bridge, &[("api.yaml", oauth), ("basic.yaml", basic)]);
    d.start().await;
    let mut keys: Vec<String> = ENCODINGS.iter().map(|h| format!("echo/{h}")).collect();
    keys.extend(["wrong/default".into(), "basic/default".into()]);
    let s = d
        .wait_status("every instance failed once", |s| {
            keys.iter()
                .all(|k| s["instances"][k]["last_error"].is_string())
        })
        .await;
    for k in &keys {
        let e = s["instances"][k]["last_error"].as_str().unwrap();
        // The echo is shown, with the secret masked.
        assert!(e.contains("***"), "{k}: {e}");
    }
    assert_no_secret("/status", &s.to_string());
    let admin = d.admin.clone().unwrap();
    let page = reqwest::get(format!("http://{admin}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("***"), "{page}");
    assert_no_secret("the dashboard", &page);
    assert!(d.terminate().success());
    assert!(d.log().contains("***"), "{}", d.log());
    assert_no_secret("the log", &d.log());
    for source in ["echo", "wrong", "basic"] {
        let out = d.command(&["test", source]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("***"), "{source}: {text}");
        assert_no_secret(&format!("pollhook test {source}"), &text);
    }
}

/// A token endpoint whose answer is `size` bytes of valid JSON with no
/// `Content-Length` (the end is the connection's close), written by hand
/// so nothing on the way buffers or limits it.
async fn huge_token_endpoint(size: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                // The whole request first (headers, then the form body).
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock
                    .write_all(br#"{"access_token":"at-huge","expires_in":3600,"padding":""#)
                    .await;
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < size {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                let _ = sock.write_all(b"\"}").await;
            });
        }
    });
    addr
}

/// The token endpoint's answer is read up to the connector's
/// `request.max_response_bytes`, like every poll's: a 4 MiB answer to a
/// connector capped at 64 KiB fails the poll with a clear error instead
/// of growing the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_answer_is_capped_like_a_poll() {
    use axum::routing::get;
    let token = huge_token_endpoint(4 * 1024 * 1024).await;
    let api = serve(axum::Router::new().route(
        "/items",
        get(|| async { axum::Json(serde_json::json!({ "items": [] })) }),
    ))
    .await;
    let connector = format!(
        r#"
name: c
request:
  url: "http://{api}/items"
  max_response_bytes: 65536
  auth:
    type: oauth2
    token_url: "http://{token}/token"
    client_id: app
    client_secret: s3cret-value
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
    );
    let mut d = Daemon::new(&one_source_bridge("{}", "1h", ""), &[("c.yaml", connector)]);
    d.start().await;
    let s = d
        .wait_status("the poll failed", |s| {
            s["instances"]["s/default"]["last_error"].is_string()
                || s["instances"]["s/default"]["polls_ok"].as_u64() > Some(0)
        })
        .await;
    let e = s["instances"]["s/default"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        e.contains("token endpoint")
            && e.contains("65536-byte cap")
            && e.contains(&token.to_string()),
        "{s}"
    );
    assert!(d.terminate().success());
}

/// A config error about a value given through `${VAR}` or `${file:…}`
/// names the reference, never the value.
#[test]
fn config_errors_name_the_reference_never_the_substituted_value() {
    let check = |listen: &str, endpoint: &str, want: &[&str]| {
        let bridge = format!(
            "state_dir: state\nadmin: {{ listen: \"{listen}\" }}\nsources: {{}}\nendpoints:\n  agent:\n{endpoint}"
        );
        let mut d = Daemon::new(&bridge, &[]);
        let file = d.dir.path().join("agent-secret");
        std::fs::write(&file, "hunter2-File-Secret-Value\n").unwrap();
        let bridge = bridge.replace("SECRET_FILE", file.to_str().unwrap());
        std::fs::write(d.config(), &bridge).unwrap();
        d.env = vec![
            ("LISTEN_AT".into(), "listen-Env-Secret-Value".into()),
            ("TIMEOUT".into(), "timeout-Env-Secret-Value".into()),
        ];
        let out = d.command(&["validate"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{err}");
        for value in [
            "hunter2-File-Secret-Value",
            "listen-Env-Secret-Value",
            "timeout-Env-Secret-Value",
        ] {
            assert!(
                !err.to_lowercase().contains(&value.to_lowercase()),
                "{value} shown:\n{err}"
            );
        }
        for w in want {
            assert!(err.contains(w), "{w}:\n{err}");
        }
    };
    let ok_endpoint = format!(
        "    url: http://127.0.0.1:9/hook\n    secret: {}\n",
        secret()
    );
    // A type error while parsing.
    check(
        "127.0.0.1:0",
        &format!("{ok_endpoint}    timeout: \"${{TIMEOUT}}\"\n"),
        &["endpoints.agent.timeout", "got `${TIMEOUT}`"],
    );
    // Errors found while validating.
    check(
        "${LISTEN_AT}",
        &ok_endpoint,
        &["admin.listen", "got `${LISTEN_AT}`"],
    );
    check(
        "127.0.0.1:0",
        "    url: http://127.0.0.1:9/hook\n    secret: \"${file:SECRET_FILE}\"\n",
        &["endpoints.agent.secret"],
    );
    check(
        "127.0.0.1:0",
        &format!("{ok_endpoint}    timeout: \"${{file:SECRET_FILE}}\"\n"),
        &["endpoints.agent.timeout", "got `${file:/"],
    );
}

/// The peak resident memory of a process, in bytes (Linux).
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// `~` (and `*`, `+`) are bounded while a template runs: a header that
/// doubles a 10 MB string five times (320 MB) fails its poll with a clear
/// error, quickly, without the daemon ever holding the string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_concatenation_is_bounded_while_it_builds() {
    use axum::routing::get;
    let api = serve(axum::Router::new().route(
        "/items",
        get(|| async { axum::Json(serde_json::json!({ "items": [] })) }),
    ))
    .await;
    let doubling = format!(
        "{{% set s = 'x' * 10000000 %}}{}{{{{ s | length }}}}",
        "{% set s = s ~ s %}".repeat(5)
    );
    let connector = format!(
        r#"
name: c
request:
  url: "http://{api}/items"
  headers: {{ X-Size: "{doubling}" }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
    );
    let mut d = Daemon::new(&one_source_bridge("{}", "1h", ""), &[("c.yaml", connector)]);
    d.start().await;
    let s = d
        .wait_status("the poll ended", |s| {
            s["instances"]["s/default"]["last_error"].is_string()
                || s["instances"]["s/default"]["polls_ok"].as_u64() > Some(0)
        })
        .await;
    let e = s["instances"]["s/default"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        e.contains("request.headers.X-Size") && e.contains("template limit"),
        "{s}"
    );
    let peak = peak_rss(d.pid().unwrap());
    assert!(peak < 200 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(d.terminate().success());
}

/// An upstream that always has a next page gets at most `max_pages`
/// requests per poll, and every page waits its turn at the host's quota
/// like a first request: at `rate: 10/s, burst: 1`, no 1 s window holds
/// more than 11 requests, however many pages the poll wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_goes_through_the_host_quota() {
    use axum::extract::{Query, State};
    use axum::routing::get;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let api = serve(
        axum::Router::new()
            .route(
                "/items",
                get(
                    |State(seen): State<Arc<Mutex<Vec<Instant>>>>,
                     Query(q): Query<std::collections::HashMap<String, String>>| async move {
                        seen.lock().unwrap().push(Instant::now());
                        let n: u64 = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
                        axum::Json(serde_json::json!({
                            "items": [{ "id": n }],
                            "next": format!("/items?page={}", n + 1),
                        }))
                    },
                ),
            )
            .with_state(seen.clone()),
    )
    .await;
    let connector = format!(
        r#"
name: c
request: {{ url: "http://{api}/items" }}
paginate: {{ next_url: $.next, max_pages: 1000 }}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
    );
    let hosts = format!("hosts:\n  \"{api}\": {{ rate: 10/s, burst: 1 }}\n");
    let mut d = Daemon::new(
        &one_source_bridge("{}", "1h", &hosts),
        &[("c.yaml", connector)],
    );
    d.start().await;
    wait_for("25 pages", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 25
    })
    .await;
    let times = seen.lock().unwrap().clone();
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 11, "{in_window} requests within 1 s");
    }
    // Mid-poll: nothing to drain that this test looks at.
    d.kill();
}
