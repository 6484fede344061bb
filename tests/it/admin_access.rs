//! The admin server as a browser meets it: which `Host` and `Origin` it
//! answers (DNS rebinding), the headers of its pages, the dashboard's
//! sessions, failed token attempts, and `token: none` only as written.
//! The real binary on 127.0.0.1, the mock bank as its upstream.

use std::time::Duration;

use base64::Engine;
use sha2::Digest;

use crate::support::*;

const TOKEN: &str = "admin-access-token-8c1e";

/// A bridge polling the mock bank slowly, with `admin` as its admin block.
async fn daemon(admin: &str, env: &[(&str, &str)]) -> (Daemon, Bank) {
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let bridge = format!(
        r#"
state_dir: state
admin: {admin}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{addr}", account: acc-0001 }}
    schedule: every 10s
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        secret()
    );
    let mut d = Daemon::new(
        &bridge,
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    d.start().await;
    (d, bank)
}

fn url(d: &Daemon, path: &str) -> String {
    format!("http://{}{path}", d.admin.as_ref().unwrap())
}

fn port(d: &Daemon) -> u16 {
    d.admin
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn get_as(d: &Daemon, path: &str, host: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url(d, path))
        .header("host", host)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_name_or_a_foreign_origin_reads_and_changes_nothing() {
    // No token, as the shipped bridge.yaml: the Host check is all that
    // keeps a page of another site out.
    let (mut d, _bank) = daemon(r#"{ listen: "127.0.0.1:0" }"#, &[]).await;
    let p = port(&d);
    // A page of evil.example whose name now resolves to 127.0.0.1.
    let evil = format!("evil.example:{p}");
    for path in ["/status", "/state/export", "/metrics", "/", "/readyz"] {
        let r = get_as(&d, path, &evil).await;
        assert_eq!(r.status(), 403, "{path}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("evil.example") && body.contains("admin.allowed_hosts"),
            "{path}: {body}"
        );
    }
    let drop = reqwest::Client::new()
        .post(url(&d, "/dlq/drop"))
        .header("host", &evil)
        .header("content-type", "application/json")
        .body(r#"{"all":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(drop.status(), 403);
    // A name that merely starts like localhost is a name like any other.
    assert_eq!(
        get_as(&d, "/status", &format!("localhost.evil.example:{p}"))
            .await
            .status(),
        403
    );
    // The listen address and localhost (a tunnel's port too) are
    // answered; liveness answers anyone.
    for host in [
        format!("127.0.0.1:{p}"),
        format!("localhost:{p}"),
        "localhost:8080".to_string(),
    ] {
        assert_eq!(get_as(&d, "/status", &host).await.status(), 200, "{host}");
    }
    assert_eq!(get_as(&d, "/healthz", &evil).await.status(), 200);

    // A name the operator lists (a proxy's, say) is answered from the
    // next reload on.
    assert_eq!(
        get_as(&d, "/status", "pollhook.internal.example")
            .await
            .status(),
        403
    );
    let text = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(
        d.config(),
        text.replace(
            r#"listen: "127.0.0.1:0" }"#,
            r#"listen: "127.0.0.1:0", allowed_hosts: [pollhook.internal.example] }"#,
        ),
    )
    .unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    d.wait_status("the reload", |s| s["config"]["reloads"] == 1)
        .await;
    assert_eq!(
        get_as(&d, "/status", "POLLHOOK.internal.example:443")
            .await
            .status(),
        200
    );

    // A request from a page of another origin is refused even with an
    // accepted Host; this server's own origin and the listed name are not.
    let list = |origin: String| {
        reqwest::Client::new()
            .post(url(&d, "/dlq/list"))
            .header("origin", origin)
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    assert_eq!(
        list("http://evil.example".into()).await.unwrap().status(),
        403
    );
    assert_eq!(list("null".into()).await.unwrap().status(), 403);
    assert_eq!(
        list(format!("http://127.0.0.1:{}", p.wrapping_add(1)))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        list(format!("http://127.0.0.1:{p}"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        list("https://pollhook.internal.example".into())
            .await
            .unwrap()
            .status(),
        200
    );

    // The CLI reaches the daemon as before (it names the listen address).
    let out = tokio::task::block_in_place(|| d.command(&["status", "--json"]).output()).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::block_in_place(|| d.command(&["state", "export"]).output()).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The list follows every reload.
    let text = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(
        d.config(),
        text.replace("pollhook.internal.example", "ops.example"),
    )
    .unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    d.wait_status("the second reload", |s| s["config"]["reloads"] == 2)
        .await;
    assert_eq!(get_as(&d, "/status", "ops.example").await.status(), 200);
    assert_eq!(
        get_as(&d, "/status", "pollhook.internal.example")
            .await
            .status(),
        403
    );
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_listen_address_answers_its_own_host() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED (no IPv6 loopback here)");
        return;
    }
    let (mut d, _bank) = daemon(r#"{ listen: "[::1]:0" }"#, &[]).await;
    let addr = d.admin.clone().unwrap();
    assert!(addr.starts_with("[::1]:"), "{addr}");
    let p = port(&d);
    // reqwest sends `[::1]:port`, as a browser does.
    let r = reqwest::get(url(&d, "/status")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        get_as(&d, "/status", &format!("localhost:{p}"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get_as(&d, "/status", &format!("evil.example:{p}"))
            .await
            .status(),
        403
    );
    let out = tokio::task::block_in_place(|| d.command(&["status", "--json"]).output()).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_cannot_be_framed_or_sniffed_and_allow_only_their_own_styles() {
    let (mut d, _bank) = daemon(
        &format!(r#"{{ listen: "127.0.0.1:0", token: "{TOKEN}" }}"#),
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let login = client.get(url(&d, "/")).send().await.unwrap();
    let page = client
        .get(url(&d, "/"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = client.get(url(&d, "/status")).send().await.unwrap();
    for (what, r) in [("login", login), ("page", page), ("401", status)] {
        let h = r.headers().clone();
        let get = |n: &str| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{what}: no {n}"))
                .to_string()
        };
        assert_eq!(get("x-frame-options"), "DENY", "{what}");
        assert_eq!(get("x-content-type-options"), "nosniff", "{what}");
        assert_eq!(get("referrer-policy"), "same-origin", "{what}");
        let csp = get("content-security-policy");
        for directive in [
            "default-src 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
            "base-uri 'none'",
        ] {
            assert!(csp.contains(directive), "{what}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
        if what == "401" {
            continue;
        }
        // The page's own stylesheet is allowed, by its hash, and it has no
        // inline style attributes (which the policy would block).
        let body = r.text().await.unwrap();
        let start = body.find("<style>").unwrap() + "<style>".len();
        let end = start + body[start..].find("</style>").unwrap();
        let hash = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(&body.as_bytes()[start..end]));
        assert!(csp.contains(&format!("'sha256-{hash}'")), "{what}: {csp}");
        assert!(
            !body.contains(" style="),
            "{what}: an inline style attribute"
        );
        assert!(!body.contains("<script"), "{what}");
    }
    assert!(d.terminate().success());
}

/// The sign-in form's CSRF value.
async fn csrf(d: &Daemon) -> String {
    let page = reqwest::get(url(d, "/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page.find("name=\"csrf\" value=\"").expect("a sign-in form") + 19;
    page[at..at + page[at..].find('"').unwrap()].to_string()
}

/// Signs in with `token` from `from` (a local address); the answer.
async fn sign_in(d: &Daemon, token: &str, from: &str) -> reqwest::Response {
    let csrf = csrf(d).await;
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
        .post(url(d, "/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string([("token", token), ("csrf", csrf.as_str())]).unwrap())
        .send()
        .await
        .unwrap()
}

fn session(r: &reqwest::Response) -> (String, String) {
    let set = r
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string();
    let value = set.split(';').next().unwrap().to_string();
    (value, set)
}

async fn status_with_cookie(d: &Daemon, cookie: &str) -> u16 {
    reqwest::Client::new()
        .get(url(d, "/status"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_random_expire_and_end_with_the_process_or_the_token() {
    let (mut d, _bank) = daemon(
        &format!(r#"{{ listen: "127.0.0.1:0", token: "{TOKEN}" }}"#),
        &[],
    )
    .await;
    let first = sign_in(&d, TOKEN, "127.0.0.1").await;
    assert_eq!(first.status(), 303);
    let (cookie, set) = session(&first);
    assert!(cookie.starts_with("pollhook_session="), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    // A bounded lifetime, said to the browser too.
    let max_age: u64 = set
        .split(';')
        .find_map(|a| a.trim().strip_prefix("Max-Age="))
        .unwrap_or_else(|| panic!("no Max-Age: {set}"))
        .parse()
        .unwrap();
    assert!((3600..=86_400).contains(&max_age), "{set}");
    // Not derived from the token: another sign-in, another id.
    let (again, _) = session(&sign_in(&d, TOKEN, "127.0.0.1").await);
    assert_ne!(cookie, again);
    let id = cookie.split_once('=').unwrap().1;
    assert!(!id.contains(TOKEN));
    assert_eq!(status_with_cookie(&d, &cookie).await, 200);
    assert_eq!(status_with_cookie(&d, &again).await, 200);
    assert_eq!(
        status_with_cookie(&d, "pollhook_session=0123456789abcdef").await,
        401
    );

    // A restart ends every session: the cookie of the last process opens
    // nothing, though the token is the same.
    assert!(d.terminate().success());
    d.start().await;
    assert_eq!(status_with_cookie(&d, &cookie).await, 401);

    // A reload that changes the token ends the sessions; one that keeps
    // it keeps them.
    let (cookie, _) = session(&sign_in(&d, TOKEN, "127.0.0.1").await);
    assert_eq!(status_with_cookie(&d, &cookie).await, 200);
    let text = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(d.config(), text.replace("every 10s", "every 9s")).unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    let reloads = |n: u64| move |s: &serde_json::Value| s["config"]["reloads"].as_u64() == Some(n);
    wait_authorized_status(&d, TOKEN, reloads(1)).await;
    assert_eq!(status_with_cookie(&d, &cookie).await, 200);
    let text = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(d.config(), text.replace(TOKEN, "the-next-token-77")).unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    wait_authorized_status(&d, "the-next-token-77", reloads(2)).await;
    assert_eq!(status_with_cookie(&d, &cookie).await, 401);
    assert!(d.terminate().success());
}

/// Waits until `/status`, read with `token`, satisfies `done`.
async fn wait_authorized_status(
    d: &Daemon,
    token: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = reqwest::Client::new()
            .get(url(d, "/status"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 && done(&serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_logged_and_a_client_that_keeps_guessing_waits() {
    let (mut d, _bank) = daemon(
        &format!(r#"{{ listen: "127.0.0.1:0", token: "{TOKEN}" }}"#),
        &[],
    )
    .await;
    let guess = |token: &'static str, from: &'static str| {
        let u = url(&d, "/status");
        async move {
            reqwest::Client::builder()
                .local_address(from.parse::<std::net::IpAddr>().unwrap())
                .build()
                .unwrap()
                .get(u)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    // Ten guesses are answered 401, each logged with the client's address
    // (never the guess).
    for n in 0..10 {
        assert_eq!(
            guess("guess-one", "127.0.0.1").await.status(),
            401,
            "guess {n}"
        );
    }
    // Then the client waits, the right token included.
    let r = guess(TOKEN, "127.0.0.1").await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let r = sign_in(&d, TOKEN, "127.0.0.1").await;
    assert_eq!(r.status(), 429, "the sign-in form too");
    assert!(r.text().await.unwrap().contains("Too many failed attempts"));
    // Another client is not held back.
    assert_eq!(guess(TOKEN, "127.0.0.2").await.status(), 200);
    // A wrong token on the sign-in form counts and is logged as well.
    assert_eq!(sign_in(&d, "guess-two", "127.0.0.2").await.status(), 401);
    // The daemon's log reaches the test through a pipe: wait for the last
    // lines rather than read it at once (it lagged under a loaded machine).
    wait_for(
        "every failed attempt in the log",
        Duration::from_secs(20),
        || {
            let log = d.log();
            log.matches("admin token refused").count() >= 11
                && log.contains("route=/login")
                && log.contains("too many failed admin token attempts")
        },
    )
    .await;
    let log = d.log();
    assert!(
        log.matches("admin token refused").count() >= 11,
        "every failed attempt is logged:\n{log}"
    );
    assert!(
        log.contains("127.0.0.1") && log.contains("127.0.0.2"),
        "{log}"
    );
    assert!(log.contains("route=/login"), "{log}");
    assert!(
        log.contains("too many failed admin token attempts"),
        "{log}"
    );
    assert!(
        !log.contains("guess-one") && !log.contains("guess-two") && !log.contains(TOKEN),
        "no token in the log:\n{log}"
    );
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variable_that_says_none_is_a_token_not_the_absence_of_one() {
    let (mut d, _bank) = daemon(
        r#"{ listen: "127.0.0.1:0", token: "${ADMIN_TOKEN}" }"#,
        &[("ADMIN_TOKEN", "none")],
    )
    .await;
    let status = |token: Option<&'static str>| {
        let u = url(&d, "/status");
        async move {
            let mut r = reqwest::Client::new().get(u);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(status(None).await, 401, "authentication is on");
    assert_eq!(status(Some("none")).await, 200, "with the token `none`");
    assert!(d.terminate().success());

    // Only the file itself says there is no token; `validate` warns when
    // that admin server listens beyond loopback.
    let (mut d, _bank) = daemon(r#"{ listen: "127.0.0.1:0", token: none }"#, &[]).await;
    assert_eq!(status_with_cookie(&d, "").await, 200);
    assert!(d.terminate().success());
    let text = std::fs::read_to_string(d.config()).unwrap();
    std::fs::write(d.config(), text.replace("127.0.0.1:0", "0.0.0.0:0")).unwrap();
    let out = d.command(&["validate"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:")
            && err.contains("bridge.yaml:3: admin.token")
            && err.contains("0.0.0.0:0")
            && err.contains("not a loopback address"),
        "{err}"
    );
    // On loopback, or with a token, nothing to warn about.
    std::fs::write(d.config(), text).unwrap();
    let out = d.command(&["validate"]).output().unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn allowed_hosts_are_names_without_scheme_or_port() {
    let bridge = |hosts: &str| {
        format!(
            "state_dir: state\nadmin:\n  listen: \"127.0.0.1:0\"\n  allowed_hosts: {hosts}\nsources: {{}}\nendpoints: {{}}\n"
        )
    };
    let d = Daemon::new(&bridge(r#"["http://ops.example:8080"]"#), &[]);
    let out = d.command(&["validate"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bridge.yaml:4:")
            && err.contains("admin.allowed_hosts")
            && err.contains("without scheme, port or path"),
        "{err}"
    );
    let d = Daemon::new(&bridge("[ops.example, \"::1\"]"), &[]);
    let out = d.command(&["validate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
