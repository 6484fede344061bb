//! `request:`: method, URL, query, headers, body and authentication.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Cx, REQUEST_BUILTINS};
use crate::config::error::key_in_node;
use crate::config::raw::{RawAuth, RawRequest, TemplateSrc};
use crate::connector::spec::{Auth, Body, KeyLocation, OAuth2, RequestSpec};
use crate::template;

/// The request of one poll; `None` when its URL does not compile (the
/// error is reported).
pub(super) fn resolve_request(cx: &mut Cx, req: &RawRequest) -> Option<RequestSpec> {
    let url = cx.template(&req.url, "request.url", REQUEST_BUILTINS);
    let mut query = Vec::new();
    for (k, v) in &req.query {
        if let Some(t) = cx.template(v, &format!("request.query.{k}"), REQUEST_BUILTINS) {
            query.push((k.clone(), t));
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &req.headers {
        let field = format!("request.headers.{k}");
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            cx.diag.at(
                v.referenced.line(),
                0,
                &field,
                format!("`{k}` is not a valid header name"),
            );
            continue;
        }
        if let Some(t) = cx.template(v, &field, REQUEST_BUILTINS) {
            headers.push((k.clone(), t));
        }
    }
    if let Some(ua) = &req.user_agent {
        if req
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("user-agent"))
        {
            cx.diag.at(
                ua.referenced.line(),
                0,
                "request.user_agent",
                "give the User-Agent once: `user_agent` or `headers.User-Agent`, not both",
            );
        } else if let Some(t) = cx.template(ua, "request.user_agent", REQUEST_BUILTINS) {
            headers.push(("User-Agent".to_string(), t));
        }
    }
    let body = body(cx, req);
    let method = method(cx, req);
    let auth = auth(cx, req);
    let mut spec = RequestSpec {
        method,
        url: url?,
        query,
        headers,
        body,
        auth,
        timeout: req.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
        max_response_bytes: req.max_response_bytes.unwrap_or(10 * 1024 * 1024),
        steady: false,
    };
    spec.steady = spec.reads_no_clock(&cx.engine);
    Some(spec)
}

/// At most one of `body` (raw text), `json` and `form`.
fn body(cx: &mut Cx, req: &RawRequest) -> Option<Body> {
    let bodies = [
        req.body.as_ref().map(|b| b.referenced.line()),
        req.json.as_ref().map(|b| b.referenced.line()),
        req.form.as_ref().map(|b| b.referenced.line()),
    ];
    if bodies.iter().flatten().count() > 1 {
        cx.diag.at(
            bodies.iter().flatten().copied().max().unwrap_or(0),
            0,
            "request",
            "give at most one of `body` (raw text), `json` and `form`",
        );
    }
    if let Some(b) = &req.body {
        cx.template(b, "request.body", REQUEST_BUILTINS)
            .map(Body::Raw)
    } else if let Some(j) = &req.json {
        cx.check_vars(
            &template::variables_of_value(&j.value.0),
            REQUEST_BUILTINS,
            j,
            "request.json",
        );
        match cx.engine.value_template(&j.value.0) {
            Ok(t) => Some(Body::Json(t)),
            Err(e) => {
                cx.diag.at_span(j, "request.json", e.to_string());
                None
            }
        }
    } else if let Some(f) = &req.form {
        let mut fields = Vec::new();
        for (k, v) in &f.value {
            let field = format!("request.form.{k}");
            if let Some(t) = cx.template_at_key(v, k, &field, REQUEST_BUILTINS) {
                fields.push((k.clone(), t));
            }
        }
        Some(Body::Form(fields))
    } else {
        None
    }
}

/// The HTTP method, `GET` by default.
fn method(cx: &mut Cx, req: &RawRequest) -> reqwest::Method {
    let Some(m) = &req.method else {
        return reqwest::Method::GET;
    };
    match reqwest::Method::from_bytes(m.value.to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            cx.diag.at_span(
                m,
                "request.method",
                format!("`{}` is not an HTTP method", m.value),
            );
            reqwest::Method::GET
        }
    }
}

/// The params a credential is made of (a bearer token, a basic password,
/// an API key, an OAuth2 client secret or refresh token): masked like
/// params marked `secret: true`, whether or not they are, since an API
/// that echoes a credential does not ask whether its param said so.
pub(super) fn credential_params(req: &RawRequest) -> BTreeSet<String> {
    let Some(auth) = &req.auth else {
        return BTreeSet::new();
    };
    let credentials: Vec<&TemplateSrc> = match &auth.value {
        RawAuth::Bearer { token } => vec![token],
        RawAuth::Basic { password, .. } => password.iter().collect(),
        RawAuth::ApiKey { value, .. } => vec![value],
        RawAuth::Oauth2 {
            client_secret,
            refresh_token,
            ..
        } => std::iter::once(client_secret)
            .chain(refresh_token.iter())
            .collect(),
    };
    credentials
        .into_iter()
        .flat_map(|t| template::variables_of_template(&t.0))
        .collect()
}

/// `request.auth`.
fn auth(cx: &mut Cx, req: &RawRequest) -> Option<Auth> {
    let spanned = req.auth.as_ref()?;
    // One of the auth's templates, reported at the line of its key.
    let tpl = |cx: &mut Cx, t: &TemplateSrc, key: &str| {
        cx.template_at_key(t, key, &format!("request.auth.{key}"), REQUEST_BUILTINS)
    };
    match &spanned.value {
        RawAuth::Bearer { token } => tpl(cx, token, "token").map(Auth::Bearer),
        RawAuth::Basic { username, password } => {
            let u = tpl(cx, username, "username");
            let p = password.as_ref().and_then(|p| tpl(cx, p, "password"));
            u.map(|u| Auth::Basic(u, p))
        }
        RawAuth::ApiKey {
            location,
            name,
            value,
        } => {
            if *location == KeyLocation::Header
                && reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            {
                // The auth block's own `name:`, not the file's first one
                // (the connector's name).
                let at = (spanned.referenced.line(), spanned.referenced.column());
                let (line, column) = key_in_node(cx.diag.text, at.0, at.1, "name").unwrap_or(at);
                cx.diag.at(
                    line,
                    column,
                    "request.auth.name",
                    format!("`{name}` is not a valid header name"),
                );
            }
            tpl(cx, value, "value").map(|value| Auth::ApiKey {
                location: *location,
                name: name.clone(),
                value,
            })
        }
        RawAuth::Oauth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            params,
            client_auth,
            refresh_token,
        } => {
            let token_url = tpl(cx, token_url, "token_url");
            let client_id = tpl(cx, client_id, "client_id");
            let client_secret = tpl(cx, client_secret, "client_secret");
            let scope = scope.as_ref().and_then(|s| tpl(cx, s, "scope"));
            let mut ps = Vec::new();
            for (k, v) in params {
                if let Some(t) = tpl(cx, v, k) {
                    ps.push((k.clone(), t));
                }
            }
            let refresh = match refresh_token {
                Some(r) => Some(tpl(cx, r, "refresh_token")?),
                None => None,
            };
            Some(Auth::OAuth2(OAuth2 {
                token_url: token_url?,
                client_id: client_id?,
                client_secret: client_secret?,
                scope,
                params: ps,
                client_auth: *client_auth,
                refresh_token: refresh,
            }))
        }
    }
}
