//! OAuth2 tokens in the daemon: the one `TokenCache` shared by every
//! instance, whose key must hold everything that makes a token request
//! different (a real token server on 127.0.0.1 issues tokens per audience
//! and an API that accepts only its own audience's tokens tells whether a
//! token went where it was meant to), and rotating refresh tokens kept
//! across restarts, a broken grant stopping its instance.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use pollhook::connector::auth::TokenCache;
use pollhook::connector::fetch::{fetch, FetchEnv};
use pollhook::quota::HostGates;
use pollhook::store::InstanceState;
use serde_json::json;

use crate::language::{connector, instance};
use crate::support::serve;

#[derive(Default)]
struct Idp {
    /// Token requests by audience.
    requests: Mutex<HashMap<String, u64>>,
    /// API answers 401 (a token of another audience).
    rejected: Mutex<u64>,
}

async fn idp() -> (SocketAddr, Arc<Idp>) {
    let st = Arc::new(Idp::default());
    let app = Router::new()
        .route(
            "/token",
            post(|State(st): State<Arc<Idp>>, body: String| async move {
                let aud = url::form_urlencoded::parse(body.as_bytes())
                    .find(|(k, _)| k == "audience")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let mut r = st.requests.lock().unwrap();
                let n = r.entry(aud.clone()).or_default();
                *n += 1;
                axum::Json(json!({
                    "access_token": format!("tok-{aud}-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 3600
                }))
            }),
        )
        .route(
            "/api/{aud}",
            get(
                |State(st): State<Arc<Idp>>, Path(aud): Path<String>, h: HeaderMap| async move {
                    let ok = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&format!("Bearer tok-{aud}-")));
                    if ok {
                        axum::Json(json!({"ok": true})).into_response()
                    } else {
                        *st.rejected.lock().unwrap() += 1;
                        StatusCode::UNAUTHORIZED.into_response()
                    }
                },
            ),
        )
        .with_state(st.clone());
    (serve(app).await, st)
}

/// A connector whose token request differs from its sibling's only by the
/// `audience` param.
fn for_audience(base: SocketAddr, aud: &str) -> String {
    format!(
        r#"
name: api-{aud}
request:
  url: "http://{base}/api/{aud}"
  auth:
    type: oauth2
    token_url: "http://{base}/token"
    client_id: app
    client_secret: s3cret
    scope: read
    params: {{ audience: {aud} }}
detect: snapshot
emit: [{{ type: x }}]
"#
    )
}

#[tokio::test]
async fn connectors_differing_only_in_token_params_get_their_own_tokens() {
    let (base, st) = idp().await;
    // One cache for both, as in the daemon.
    let tokens = TokenCache::default();
    let client = pollhook::daemon::poll_client();
    let hosts = HostGates::new(&BTreeMap::new());
    let env = FetchEnv {
        client: &client,
        hosts: &hosts,
        rate_limit: None,
        tokens: &tokens,
        user_agent: None,
    };
    let conns: Vec<_> = ["billing", "ledger"]
        .iter()
        .map(|a| {
            let c = connector(&for_audience(base, a));
            let i = instance(&c, json!({}));
            (c, i)
        })
        .collect();
    let state = InstanceState::default();
    for _ in 0..3 {
        for (c, i) in &conns {
            fetch(c, i, &state, &env, chrono::Utc::now())
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        }
    }
    let requests = st.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        HashMap::from([("billing".into(), 1), ("ledger".into(), 1)]),
        "one token per audience, reused for its three polls"
    );
    assert_eq!(
        *st.rejected.lock().unwrap(),
        0,
        "no API call carried the other audience's token"
    );
}

/// An identity provider that rotates refresh tokens: each refresh answers
/// a short-lived access token and a new refresh token, and forgets the old
/// one (`invalid_grant` for it), as rotating providers do.
#[derive(Default)]
struct Rotating {
    /// The one refresh token it accepts now.
    current: Mutex<String>,
    refreshes: Mutex<u64>,
}

async fn rotating_idp(seed: &str) -> (SocketAddr, Arc<Rotating>) {
    let st = Arc::new(Rotating::default());
    *st.current.lock().unwrap() = seed.to_string();
    let app = Router::new()
        .route(
            "/token",
            post(|State(st): State<Arc<Rotating>>, body: String| async move {
                let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
                    .into_owned()
                    .collect();
                let mut n = st.refreshes.lock().unwrap();
                *n += 1;
                let mut cur = st.current.lock().unwrap();
                if form.get("grant_type").map(String::as_str) != Some("refresh_token")
                    || form.get("refresh_token") != Some(&*cur)
                {
                    return (
                        StatusCode::BAD_REQUEST,
                        axum::Json(json!({ "error": "invalid_grant", "error_description": "unknown refresh token" })),
                    )
                        .into_response();
                }
                *cur = format!("rt-rotated-{n}");
                axum::Json(json!({
                    "access_token": format!("at-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 1,
                    "refresh_token": *cur,
                }))
                .into_response()
            }),
        )
        .route(
            "/items",
            get(|h: HeaderMap| async move {
                let ok = h
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer at-"));
                if ok {
                    axum::Json(json!({ "items": [] })).into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }),
        )
        .with_state(st.clone());
    (serve(app).await, st)
}

/// The `refresh_token` grant against a provider that rotates: the newest
/// refresh token is kept in the store and used after a restart (the seed
/// is dead by then), never written to the log or a backup; an
/// `invalid_grant` stops asking the provider and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_refresh_tokens_survive_restarts_and_a_broken_grant_stops() {
    use crate::support::{wait_for, Daemon};
    use std::time::Duration;
    let (addr, idp) = rotating_idp("rt-seed-0").await;
    let connector = format!(
        r#"
name: api
params:
  refresh: {{ secret: true }}
request:
  url: "http://{addr}/items"
  auth:
    type: oauth2
    token_url: "http://{addr}/token"
    client_id: app
    client_secret: s3cret
    refresh_token: "{{{{ refresh }}}}"
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit:
  - type: item.created
"#
    );
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  api:
    connector: api
    with: {{ refresh: rt-seed-0 }}
    schedule: every 200ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        crate::support::secret()
    );
    let mut d = Daemon::new(&bridge, &[("api.yaml", connector)]);
    d.start().await;
    wait_for("two rotations", Duration::from_secs(30), || {
        *idp.refreshes.lock().unwrap() >= 2
    })
    .await;
    let ok = |s: &serde_json::Value| {
        s["instances"]["api/default"]["polls_ok"]
            .as_u64()
            .unwrap_or(0)
    };
    d.wait_status("polls with the rotated tokens", |s| ok(s) >= 2)
        .await;
    assert!(d.terminate().success());
    let before = *idp.refreshes.lock().unwrap();
    // The seed is dead now: only the stored newest token works.
    d.start().await;
    let s = d.status().await;
    let base = ok(&s);
    d.wait_status("polls after the restart", |s| ok(s) >= base + 2)
        .await;
    assert!(*idp.refreshes.lock().unwrap() > before);
    let s = d.status().await;
    assert!(s["instances"]["api/default"]["last_error"].is_null(), "{s}");
    // Never in the log or a backup.
    let current = idp.current.lock().unwrap().clone();
    let out = d.command(&["state", "export"]).output().unwrap();
    let export = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !export.contains("rt-rotated") && !export.contains("rt-seed"),
        "{export}"
    );
    assert!(!d.log().contains("rt-rotated"), "{}", d.log());
    let _ = current;

    // The provider revokes the chain: one invalid_grant, then no more
    // requests to it while the polls fail with a clear error.
    *idp.current.lock().unwrap() = "revoked".into();
    d.wait_status("invalid_grant on the status", |s| {
        s["instances"]["api/default"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid_grant") && e.contains("new `refresh_token`"))
    })
    .await;
    let asked = *idp.refreshes.lock().unwrap();
    let failed = |s: &serde_json::Value| {
        s["instances"]["api/default"]["polls_failed"]
            .as_u64()
            .unwrap_or(0)
    };
    let f0 = failed(&d.status().await);
    d.wait_status("two more failed polls", |s| failed(s) >= f0 + 2)
        .await;
    assert_eq!(
        *idp.refreshes.lock().unwrap(),
        asked,
        "the provider was asked again"
    );
    assert!(d.terminate().success());
}
