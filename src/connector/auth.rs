//! OAuth2 tokens, shared by every instance that uses the same token
//! endpoint and client: client credentials (RFC 6749 §4.4), or the
//! `refresh_token` grant (§6) with rotating refresh tokens.
//!
//! Rotation: a provider that rotates answers each refresh with a new
//! refresh token and forgets the old one. The newest is written to the
//! store (its own records: never in logs, never in backups) before the
//! access token is used, and read back after a restart; the seed in the
//! configuration is only used until then, or when the operator changes it
//! (the stored token remembers which seed it descends from). An
//! `invalid_grant` answer means the chain is broken (revoked, or a
//! rotation lost in a crash): the slot then fails at once with that error
//! until the seed changes, instead of asking the provider at every poll.
//!
//! Why a cache shared across instances: a source with 1,000 accounts must
//! not ask the identity provider for 1,000 tokens per poll round. One token
//! per (token URL, client id, scope, params) is fetched, reused until
//! shortly before it expires, and fetched again once when the API answers
//! 401 (revoked or rotated early). The key holds every field that can change
//! what a token is good for, the extra form `params` too (an `audience` or
//! `resource` names the API a token is for), so two connectors that differ
//! only there never share a token. A per-key async lock makes concurrent
//! instances wait for one fetch instead of stampeding the token endpoint.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use tokio::time::Instant;

use crate::connector::spec::ClientAuth;
use crate::connector::transport::{Purpose, ReadError, Transport};
use sha2::Digest;

/// A rendered token request.
pub struct TokenRequest {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub params: Vec<(String, String)>,
    pub client_auth: ClientAuth,
    /// The `refresh_token` grant's seed; `None`: client credentials.
    pub refresh_seed: Option<String>,
    /// The most bytes of an answer read (the connector's
    /// `request.max_response_bytes`, like every poll's body).
    pub max_body: u64,
}

impl TokenRequest {
    /// The cache key: everything sent to the token endpoint but the secret.
    /// `params` are sorted, so their order in the YAML does not split the
    /// cache. JSON keeps the parts apart whatever characters they hold.
    fn key(&self) -> String {
        let mut params: Vec<&(String, String)> = self.params.iter().collect();
        params.sort();
        serde_json::json!([
            self.token_url,
            self.client_id,
            self.scope.as_deref().unwrap_or(""),
            params,
            self.refresh_seed.as_deref().map(seed_id),
        ])
        .to_string()
    }

    /// Where the rotated refresh token of this client is stored (not the
    /// seed: a new seed must find the stored one and replace it).
    fn credential_key(&self) -> String {
        let d = sha2::Sha256::digest(
            serde_json::json!([self.token_url, self.client_id])
                .to_string()
                .as_bytes(),
        );
        format!("oauth2-refresh:{}", hex(&d[..16]))
    }
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

/// A short digest naming a seed without holding it.
fn seed_id(seed: &str) -> String {
    hex(&sha2::Sha256::digest(seed.as_bytes())[..12])
}

/// What the store keeps of a rotating refresh token.
#[derive(serde::Serialize, serde::Deserialize)]
struct Rotated {
    /// The seed it descends from (`seed_id`): another seed in the
    /// configuration replaces it.
    seed: String,
    token: String,
}

#[derive(Clone)]
struct Cached {
    token: String,
    /// When to stop using it: a margin before the real expiry, so a token
    /// never expires between being read and being checked by the API.
    refresh_at: Instant,
}

/// A slot of the cache: a token, or the error that stopped its grant.
#[derive(Clone)]
enum Slot {
    Token(Cached),
    /// `invalid_grant` on a refresh: no more requests until the seed
    /// changes (a new key).
    Broken(TokenError),
}

/// Tokens by (token URL, client, scope, params, seed).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Slot>>>>>,
    /// Where rotated refresh tokens are kept (the daemon's store); without
    /// one (`pollhook test`), a rotation lives as long as the process.
    store: Option<crate::store::Store>,
}

impl TokenCache {
    /// A cache that keeps rotated refresh tokens in `store`.
    pub fn with_store(store: crate::store::Store) -> TokenCache {
        TokenCache {
            store: Some(store),
            ..TokenCache::default()
        }
    }

    /// A valid token. `rejected` is a token the API just answered 401 to:
    /// if the cache still holds it, a new one is fetched (once, however many
    /// instances saw the 401 at the same time).
    pub async fn token(
        &self,
        transport: Transport<'_>,
        req: &TokenRequest,
        rejected: Option<&str>,
    ) -> Result<String, TokenError> {
        let slot = self.slots.lock().entry(req.key()).or_default().clone();
        let mut cached = slot.lock().await;
        match cached.as_ref() {
            Some(Slot::Broken(e)) => return Err(e.clone()),
            Some(Slot::Token(c))
                if Instant::now() < c.refresh_at && rejected != Some(c.token.as_str()) =>
            {
                return Ok(c.token.clone());
            }
            _ => {}
        }
        let Some(seed) = &req.refresh_seed else {
            let got = fetch_token(transport, req, None).await?;
            *cached = Some(Slot::Token(Cached {
                token: got.access.clone(),
                refresh_at: Instant::now() + refresh_after(got.lifetime),
            }));
            return Ok(got.access);
        };
        // The refresh token to use: the newest stored one descending from
        // this seed, else the seed.
        let key = req.credential_key();
        let stored: Option<Rotated> = match &self.store {
            Some(s) => s
                .load_credential(&key)
                .await
                .map_err(|e| TokenError::ReadStored(e.to_string()))?
                .and_then(|t| serde_json::from_str::<Rotated>(&t).ok()),
            None => None,
        };
        let current = match stored {
            Some(r) if r.seed == seed_id(seed) => {
                crate::connector::learn(&r.token);
                r.token
            }
            _ => seed.clone(),
        };
        let got = match fetch_token(transport, req, Some(&current)).await {
            Ok(g) => g,
            Err(e) if e.is_invalid_grant() => {
                let e = TokenError::GrantBroken(Box::new(e));
                *cached = Some(Slot::Broken(e.clone()));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Some(next) = got.refresh.as_ref().filter(|n| **n != current) {
            // Kept before the access token is used: the provider forgot
            // the old one already.
            if let Some(s) = &self.store {
                let record = serde_json::to_string(&Rotated {
                    seed: seed_id(seed),
                    token: next.clone(),
                })
                .expect("serializes");
                s.save_credential(&key, &record)
                    .await
                    .map_err(|e| TokenError::KeepRotated(e.to_string()))?;
            }
        }
        *cached = Some(Slot::Token(Cached {
            token: got.access.clone(),
            refresh_at: Instant::now() + refresh_after(got.lifetime),
        }));
        Ok(got.access)
    }
}

/// What a token endpoint gave.
struct Granted {
    access: String,
    lifetime: Duration,
    /// A new refresh token (rotation).
    refresh: Option<String>,
}

/// How long a token with this lifetime is used: up to 60 s (or a tenth of
/// the lifetime, for short ones) before it expires.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let margin = (lifetime / 10).min(Duration::from_secs(60));
    lifetime.saturating_sub(margin)
}

/// Why no token could be had. Each message names the token URL and what
/// the server said (`error`, `error_description`, masked), never the
/// client secret; it becomes the poll's `authentication failed: …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `token_url` rendered to something that is not a URL.
    #[error("token endpoint {url}: not a URL: {detail}")]
    NotAUrl { url: String, detail: String },
    /// The request could not be sent, or its answer not read.
    #[error("token endpoint {url}: {detail}")]
    Transport { url: String, detail: String },
    /// The answer was longer than `request.max_response_bytes`.
    #[error("token endpoint {url}: answer larger than the {limit}-byte cap (request.max_response_bytes)")]
    TooLarge { url: String, limit: u64 },
    /// A status other than 2xx; `why` is the server's `error` and
    /// `error_description` joined by `: ` (masked), or empty.
    #[error("token endpoint {url} answered HTTP {status}{}", parenthesized(why))]
    Refused {
        url: String,
        status: u16,
        why: String,
    },
    /// A 2xx answer without a token.
    #[error("token endpoint {url} answered without an `access_token`")]
    NoAccessToken { url: String },
    /// `invalid_grant` on a refresh: the slot keeps this error until the
    /// seed changes.
    #[error("{0}: the refresh token was revoked or its rotation lost; polls of this connector stop asking until a new `refresh_token` is given (a reload or restart)")]
    GrantBroken(Box<TokenError>),
    /// The store could not give the rotated refresh token back.
    #[error("cannot read the stored refresh token: {0}")]
    ReadStored(String),
    /// The store could not keep a rotated refresh token: the access token
    /// is not used, since the provider already forgot the old one.
    #[error("cannot keep the rotated refresh token: {0}")]
    KeepRotated(String),
    /// The token cannot be sent as an `Authorization` header.
    #[error("the token is not a valid header value")]
    NotAHeader,
}

impl TokenError {
    /// Whether the server refused the grant itself (`invalid_grant`): the
    /// refresh token is dead, asking again cannot help.
    fn is_invalid_grant(&self) -> bool {
        matches!(self, TokenError::Refused { why, .. } if why.contains("invalid_grant"))
    }
}

/// ` (why)`, or nothing for an empty `why`.
fn parenthesized(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

/// One token request. Errors name the token URL and what the server said
/// (`error`, `error_description`), never the client secret.
async fn fetch_token(
    transport: Transport<'_>,
    req: &TokenRequest,
    refresh: Option<&str>,
) -> Result<Granted, TokenError> {
    let http = token_request(req, refresh)?;
    let reply = transport
        .send_for(Purpose::Token, http, req.max_body)
        .await
        .map_err(|e| TokenError::Transport {
            url: req.token_url.clone(),
            detail: e.to_string(),
        })?;
    let status = reply.status();
    let bytes = reply.read_capped(req.max_body).await.map_err(|e| match e {
        ReadError::TooLarge => TokenError::TooLarge {
            url: req.token_url.clone(),
            limit: req.max_body,
        },
        ReadError::Network(detail) => TokenError::Transport {
            url: req.token_url.clone(),
            detail,
        },
    })?;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    // Every token the answer holds is a secret from this moment on, before
    // anything can say something about it.
    for key in ["access_token", "refresh_token", "id_token"] {
        if let Some(t) = body.get(key).and_then(Value::as_str) {
            crate::connector::learn(t);
        }
    }
    if !status.is_success() {
        return Err(TokenError::Refused {
            url: req.token_url.clone(),
            status: status.as_u16(),
            why: refusal_reason(&body, req, refresh),
        });
    }
    granted(&body, req)
}

/// The POST to the token endpoint: the grant's form (with the client's
/// credentials in it or in a Basic header, as `client_auth` says), a 30 s
/// timeout, JSON asked for.
fn token_request(
    req: &TokenRequest,
    refresh: Option<&str>,
) -> Result<reqwest::Request, TokenError> {
    let mut form = match refresh {
        Some(r) => vec![
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), r.to_string()),
        ],
        None => vec![("grant_type".to_string(), "client_credentials".to_string())],
    };
    if let Some(s) = req.scope.as_ref().filter(|s| !s.is_empty()) {
        form.push(("scope".into(), s.clone()));
    }
    form.extend(req.params.iter().cloned());
    let url = reqwest::Url::parse(&req.token_url).map_err(|e| TokenError::NotAUrl {
        url: req.token_url.clone(),
        detail: e.to_string(),
    })?;
    let mut http = reqwest::Request::new(reqwest::Method::POST, url);
    *http.timeout_mut() = Some(Duration::from_secs(30));
    let headers = http.headers_mut();
    match req.client_auth {
        ClientAuth::Basic => {
            headers.insert(
                AUTHORIZATION,
                basic_auth(&req.client_id, &req.client_secret),
            );
        }
        ClientAuth::Body => {
            form.push(("client_id".into(), req.client_id.clone()));
            form.push(("client_secret".into(), req.client_secret.clone()));
        }
    }
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    *http.body_mut() = Some(form_encode(&form).into());
    Ok(http)
}

/// What a refusing server said (`error`, `error_description`), masked:
/// it may echo what it was sent (the secret, the refresh token).
fn refusal_reason(body: &Value, req: &TokenRequest, refresh: Option<&str>) -> String {
    let sent: Vec<String> = std::iter::once(req.client_secret.clone())
        .chain(refresh.map(str::to_string))
        .chain(req.refresh_seed.clone())
        .collect();
    [body.get("error"), body.get("error_description")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|t| crate::connector::mask(t, &sent))
        .collect::<Vec<_>>()
        .join(": ")
}

/// The token of a 2xx answer, its lifetime and any rotated refresh token.
fn granted(body: &Value, req: &TokenRequest) -> Result<Granted, TokenError> {
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::NoAccessToken {
            url: req.token_url.clone(),
        })?;
    // RFC 6749 makes `expires_in` optional; without it, assume an hour and
    // rely on the 401 refresh if the server thought otherwise.
    let lifetime = body
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(3600);
    // Capped at a day: an absurd `expires_in` must not overflow a clock.
    Ok(Granted {
        access: token.to_string(),
        lifetime: Duration::from_secs(lifetime.min(86_400)),
        refresh: body
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    })
}

/// `Basic base64(client_id:client_secret)`, marked sensitive: what
/// reqwest's `basic_auth` sends. Pure.
fn basic_auth(user: &str, password: &str) -> HeaderValue {
    use base64::Engine as _;
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut v = HeaderValue::from_str(&format!("Basic {pair}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

/// `application/x-www-form-urlencoded`, by the URL crate's own serializer.
pub fn form_encode(pairs: &[(String, String)]) -> String {
    let mut u = reqwest::Url::parse("http://form.invalid/").expect("static URL");
    u.query_pairs_mut().extend_pairs(pairs);
    u.query().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(100)),
            Duration::from_secs(90)
        );
        assert_eq!(refresh_after(Duration::ZERO), Duration::ZERO);
    }

    fn request(params: &[(&str, &str)]) -> TokenRequest {
        TokenRequest {
            token_url: "https://idp/token".into(),
            client_id: "app".into(),
            client_secret: "s".into(),
            scope: Some("read".into()),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            client_auth: ClientAuth::Basic,
            refresh_seed: None,
            max_body: 1024,
        }
    }

    #[test]
    fn the_cache_key_holds_the_params_in_any_order() {
        let a = request(&[("audience", "billing"), ("resource", "r")]);
        assert_ne!(
            a.key(),
            request(&[("audience", "ledger"), ("resource", "r")]).key()
        );
        assert_ne!(a.key(), request(&[]).key());
        assert_eq!(
            a.key(),
            request(&[("resource", "r"), ("audience", "billing")]).key()
        );
    }

    /// The messages are the ones the `String` errors had: `last_error`
    /// and `pollhook test` show them.
    #[test]
    fn token_errors_read_as_the_text_they_replace() {
        let refused = TokenError::Refused {
            url: "https://idp/token".into(),
            status: 400,
            why: "invalid_grant: expired".into(),
        };
        assert_eq!(
            refused.to_string(),
            "token endpoint https://idp/token answered HTTP 400 (invalid_grant: expired)"
        );
        assert!(refused.is_invalid_grant());
        let bare = TokenError::Refused {
            url: "https://idp/token".into(),
            status: 500,
            why: String::new(),
        };
        assert_eq!(
            bare.to_string(),
            "token endpoint https://idp/token answered HTTP 500"
        );
        assert!(!bare.is_invalid_grant());
        assert_eq!(
            TokenError::GrantBroken(Box::new(refused)).to_string(),
            "token endpoint https://idp/token answered HTTP 400 (invalid_grant: expired): the refresh token was revoked or its rotation lost; polls of this connector stop asking until a new `refresh_token` is given (a reload or restart)"
        );
        assert_eq!(
            TokenError::TooLarge {
                url: "https://idp/token".into(),
                limit: 1024
            }
            .to_string(),
            "token endpoint https://idp/token: answer larger than the 1024-byte cap (request.max_response_bytes)"
        );
    }

    #[test]
    fn form_encoding_escapes() {
        assert_eq!(
            form_encode(&[("a b".into(), "x&y=z".into()), ("s".into(), "é".into())]),
            "a+b=x%26y%3Dz&s=%C3%A9"
        );
    }
}
