//! OAuth2 client-credentials tokens (RFC 6749 §4.4), shared by every
//! instance that uses the same token endpoint and client.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use serde_json::Value;
use tokio::time::Instant;

use crate::connector::spec::ClientAuth;

/// A rendered token request.
pub struct TokenRequest {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub params: Vec<(String, String)>,
    pub client_auth: ClientAuth,
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
        ])
        .to_string()
    }
}

#[derive(Clone)]
struct Cached {
    token: String,
    /// When to stop using it: a margin before the real expiry, so a token
    /// never expires between being read and being checked by the API.
    refresh_at: Instant,
}

/// Tokens by (token URL, client, scope, params).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

impl TokenCache {
    /// A valid token. `rejected` is a token the API just answered 401 to:
    /// if the cache still holds it, a new one is fetched (once, however many
    /// instances saw the 401 at the same time).
    pub async fn token(
        &self,
        client: &reqwest::Client,
        req: &TokenRequest,
        rejected: Option<&str>,
    ) -> Result<String, String> {
        let slot = self
            .slots
            .lock()
            .expect("token cache lock")
            .entry(req.key())
            .or_default()
            .clone();
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at && rejected != Some(c.token.as_str()) {
                return Ok(c.token.clone());
            }
        }
        let (token, lifetime) = fetch_token(client, req).await?;
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + refresh_after(lifetime),
        });
        Ok(token)
    }
}

/// How long a token with this lifetime is used: up to 60 s (or a tenth of
/// the lifetime, for short ones) before it expires.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let margin = (lifetime / 10).min(Duration::from_secs(60));
    lifetime.saturating_sub(margin)
}

/// One token request. Errors name the token URL and what the server said
/// (`error`, `error_description`), never the client secret.
async fn fetch_token(
    client: &reqwest::Client,
    req: &TokenRequest,
) -> Result<(String, Duration), String> {
    let mut form = vec![("grant_type".to_string(), "client_credentials".to_string())];
    if let Some(s) = req.scope.as_ref().filter(|s| !s.is_empty()) {
        form.push(("scope".into(), s.clone()));
    }
    form.extend(req.params.iter().cloned());
    let mut http = client.post(&req.token_url);
    match req.client_auth {
        ClientAuth::Basic => {
            http = http.basic_auth(&req.client_id, Some(&req.client_secret));
        }
        ClientAuth::Body => {
            form.push(("client_id".into(), req.client_id.clone()));
            form.push(("client_secret".into(), req.client_secret.clone()));
        }
    }
    let resp = http
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .body(form_encode(&form))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| {
            format!(
                "token endpoint {}: {}",
                req.token_url,
                crate::transport_detail(&e)
            )
        })?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| {
        format!(
            "token endpoint {}: {}",
            req.token_url,
            crate::transport_detail(&e)
        )
    })?;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let why = [body.get("error"), body.get("error_description")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(": ");
        return Err(format!(
            "token endpoint {} answered HTTP {}{}",
            req.token_url,
            status.as_u16(),
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        ));
    }
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            format!(
                "token endpoint {} answered without an `access_token`",
                req.token_url
            )
        })?;
    // RFC 6749 makes `expires_in` optional; without it, assume an hour and
    // rely on the 401 refresh if the server thought otherwise.
    let lifetime = body
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(3600);
    // Capped at a day: an absurd `expires_in` must not overflow a clock.
    Ok((token.to_string(), Duration::from_secs(lifetime.min(86_400))))
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

    #[test]
    fn form_encoding_escapes() {
        assert_eq!(
            form_encode(&[("a b".into(), "x&y=z".into()), ("s".into(), "é".into())]),
            "a+b=x%26y%3Dz&s=%C3%A9"
        );
    }
}
