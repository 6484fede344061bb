//! OAuth2 client-credentials tokens shared across connectors: the daemon
//! keeps one `TokenCache` for every instance, so its key must hold
//! everything that makes a token request different. A real token server on
//! 127.0.0.1 issues tokens per audience and an API that accepts only its
//! own audience's tokens tells whether a token went where it was meant to.

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
